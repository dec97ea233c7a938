"""The closed vocabulary of the nano model's world: what its clips show and the words its captions use.

One source of truth for the synthetic data generator (captions), the judge (verdicts) and prompt expansion
(mapping free text onto words the nano model knows). Each concept has a canonical name and the phrases that
captions may use for it.
"""

# name -> RGB in 0..1. Chosen far apart in hue so that a judge can tell them apart after VAE round trips.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.15, 0.85),
    "orange": (1.00, 0.55, 0.05),
    "cyan": (0.10, 0.85, 0.90),
    "white": (0.95, 0.95, 0.95),
}
# Colours the shipped DiT was not trained on, taught by LoRAs (weights/MODEL_CARD.md). The generator never draws
# them: it renders one when a caller pins it by name. The judge reads them with COLORS. Black is the dark
# background's colour, at least 0.75 in RGB from every colour above (the closest pair there, red and orange, is
# 0.46). (Magenta cannot be one: the shipped nano VAE decodes it, like every hue it was not trained on, as one of
# the eight.)
EXTRA_COLORS: dict[str, tuple[float, float, float]] = {
    "black": (0.06, 0.06, 0.08),
}
ALL_COLORS: dict[str, tuple[float, float, float]] = {**COLORS, **EXTRA_COLORS}

# background name -> RGB, and the caption phrases for it
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "dark": (0.06, 0.06, 0.08),
    "gray": (0.45, 0.45, 0.45),
    "light": (0.85, 0.85, 0.80),
}
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "dark": ("on a dark background", "against a black backdrop", "in the dark"),
    "gray": ("on a gray background", "against a grey backdrop"),
    "light": ("on a light background", "against a pale backdrop"),
}

SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ball", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
}

# direction -> unit motion (dx, dy) in image coordinates (y grows downward), and caption phrases
DIRECTIONS: dict[str, tuple[int, int]] = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
DIRECTION_PHRASES: dict[str, tuple[str, ...]] = {
    "right": ("moving to the right", "moving right", "drifting rightward", "sliding to the right", "heading right"),
    "left": ("moving to the left", "moving left", "drifting leftward", "sliding to the left", "heading left"),
    "up": ("moving up", "moving upward", "rising", "drifting upward", "floating up"),
    "down": ("moving down", "moving downward", "falling", "drifting downward", "sinking"),
}

SPEEDS: dict[str, tuple[str, ...]] = {
    "slow": ("slowly", "gently"),
    "normal": ("",),
    "fast": ("quickly", "fast", "rapidly"),
}

SIZES: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny"),
    "medium": ("",),
    "large": ("large", "big"),
}
