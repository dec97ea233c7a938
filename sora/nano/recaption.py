"""Re-captioning for the nano model: a prompt in the user's own words -> a caption in the words it was trained on.

Each concept a caption holds (colour, shape, direction; size, speed and background when the prompt names them) is
found in up to three passes, and the result says which pass found it:

1. read: the hand-written tables of `sora.prompt_expansion` (synonyms, the vocabulary's own phrases, colour
   names by hue) with a little grammar over them ("from east to west", "away from the left edge").
2. guessed: word forms ("reddish", "plunges"), misspellings ("rigth"), colour mixtures ("blue-green" -> cyan),
   a colour name from the published list of `sora.color_names` where English puts the colour ("a paprika ball":
   red by its hue), then, for colour, shape and direction still open, the nearest table phrase in the MiniLM
   embedding space when the cosine similarity of the pooled embeddings reaches the concept's threshold
   (`THRESHOLDS`, calibrated on tests/data/nano_dev_paraphrases.json; the held-out tests/data/nano_paraphrases.json
   is never used to tune).
3. seed: colour, shape and direction are in every training caption, so one still open is drawn from the seed.

Every guess and every seeded pick gets a note. MiniLM is needed only in pass 2's similarity step, that is when a
concept is still open and the prompt has words no table knows; it is the encoder the main job loads anyway (pass
it, or one instance per process comes from the model cache). The caption is at most 16 MiniLM tokens whatever
the prompt's length: it is built from vocabulary phrases only.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import color_names
from .. import prompt_expansion as pe
from ..errors import InputError
from . import vocabulary as vocab
from .data import MIN_CONTRAST, contrast

# Cosine similarity a prompt phrase needs to its nearest table phrase before that phrase's concept is taken.
# Calibrated on the development set (benchmarks/nano_quality.py --only calibrate prints the sweep).
# "color slot": the unknown word just before the shape noun (or marked "-coloured"), compared with colour phrases
# only, since English puts the colour there.
THRESHOLDS: dict[str, float] = {"color": 0.55, "color slot": 0.4, "shape": 0.6, "direction": 0.5}
GUESSED = ("color", "shape", "direction")  # concepts a similarity guess may fill; the others only absorb words
LABELS = {"color": "colour", "shape": "shape", "direction": "direction", "speed": "speed", "size": "size",
          "background": "background"}
MAX_WORDS = 120  # words of a prompt the similarity step compares (the tables read them all)

# Words that say nothing about colour, shape or direction: never compared with the tables.
STOPWORDS = frozenset("""
a an the and or of in on at to toward towards into onto from with without by for as its it is are was were be
been being this that these those which who while then than very so just one some no not across through over
under around along out off there here watch see shows showing show make makes made video clip scene frame
screen image picture view shot shots camera lens film filmed filming cinematic style styled render rendered
animation animated motion graphics lighting light lit shadow shadows focus detail detailed details high highly
quality resolution look looks looking composition centered centred background backdrop studio edge side border
margin corner end wall part half direction way path middle centre center top bottom left right hand
moving moves move drifting drifts drift sliding slides slide heading heads head floating floats float travelling
traveling travels travel going goes go gliding glides glide rolling rolls roll flying flies fly bouncing bounces
passing passes crossing crosses sweeping sweeps journeying wandering wanders sailing sails bobbing bobs coming
comes come setting sets starting starts start ending ends finishing finishes leaving leaves object thing shape
item something steadily smoothly slowly quickly while whole calm quiet still perfectly even clean natural soft
colour colours color colors coloured colored hue hues tone tones shade shades tint tints ultra extremely
""".split())

# Generic prompt words with no nano concept: a phrase nearest to one of these is not taken for any concept.
ABSORBERS = ("camera", "lighting", "cinematic", "render", "style", "photograph", "texture", "material", "detail",
             "focus", "lens", "film", "scene", "animation", "atmosphere", "mood", "quality", "wood", "metal",
             "glass", "plastic", "stone", "paper", "shiny", "matte", "spinning", "rotating", "wobbling", "pulsing",
             "shaking", "still", "happy", "beautiful", "dreamy", "realistic", "minimalist", "abstract", "empty",
             "space", "people", "text", "breeze", "water")

PLACE_DIRECTION = {"left": "left", "west": "left", "right": "right", "east": "right", "top": "up", "north": "up",
                   "roof": "up", "sky": "up", "bottom": "down", "south": "down", "ground": "down"}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
_DET = r"(?:(?:the|a|an|its)\s+)?"
_PLACE_NOUN = r"(?:\s+hand)?(?:\s+(?:edge|side|border|margin|corner|end|wall|part|half|area))?"


def _place(name: str) -> str:
    return rf"(?P<{name}>{'|'.join(PLACE_DIRECTION)}){_PLACE_NOUN}"


# Grammar over place words. Decisive patterns say where the motion ends even when a place word comes first.
_DECISIVE = [
    (re.compile(rf"\b{_place('a')}\s+(?:\S+\s+){{0,5}}?(?:to|toward|towards|into|onto|until|till)\s+{_DET}"
                rf"{_place('b')}"), "to"),
    (re.compile(rf"\b(?:start|starts|started|starting|begin|begins|began|beginning)\s+(?:out\s+)?"
                rf"(?:at|on|from|in)\s+{_DET}{_place('a')}.{{0,60}}?\b(?:end|ends|ended|ending|finish|finishes|"
                rf"finished|finishing|stop|stops|stopped|stopping|arrive|arrives|arrived|arriving)\s+(?:up\s+)?"
                rf"(?:(?:at|on|in|by)\s+)?{_DET}{_place('b')}"), "to"),
    (re.compile(rf"\baway\s+from\s+{_DET}{_place('b')}"), "from"),
    (re.compile(rf"\bleav(?:e|es|ing)\s+{_DET}{_place('b')}\s+(?:\S+\s+)?behind"), "from"),
]
# Positional patterns compete with the table phrases: the first mention wins.
_POSITIONAL = [
    (re.compile(rf"\bfrom\s+{_DET}{_place('b')}"), "from"),
    (re.compile(rf"\b(?:to|toward|towards|into)\s+{_DET}{_place('b')}"), "to"),
]
_COLOR_SUFFIX = re.compile(r"^(.+?)-?(?:coloured|colored|colour|color|hued|tinted|toned|tone|shaded)$")


# ---------------------------------------------------------------------------------------------------------------
# What the recaption returns
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """How one concept of the caption was found: read from the tables, guessed, or drawn from the seed."""

    concept: str  # "color", "shape", "direction", "speed", "size" or "background"
    value: str  # the vocabulary name
    how: str  # "read", "guessed" or "seed"
    phrase: str = ""  # the prompt's words it came from (empty for the seed)
    reason: str = ""  # for a guess: "similarity 0.71", "spelling of 'right'", "between blue and green", ...
    score: float | None = None  # the cosine similarity of a similarity guess


@dataclass(frozen=True)
class Recaption:
    """A prompt rewritten for the nano model: the caption, what it means, how each part was found, and notes (one
    short sentence per guessed or seeded concept, for the node to show)."""

    caption: str
    attributes: pe.NanoAttributes
    findings: dict[str, Finding]
    notes: tuple[str, ...]

    def concepts(self, how: str) -> list[str]:
        """The concepts found one way: "read", "guessed" or "seed"."""
        return [c for c, f in self.findings.items() if f.how == how]


@dataclass(frozen=True)
class _Rewrite:
    """Prompt words replaced by a table phrase before reading, and why."""

    phrase: str
    reason: str
    score: float | None = None


@dataclass
class _Word:
    text: str
    origin: _Rewrite | None = None
    colour_word: bool = False  # followed by "-coloured" / "-hued" in the prompt


@dataclass
class _Match:
    value: str
    start: int  # word index
    end: int
    words: list[_Word] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# The tables, as the reader sees them
# ---------------------------------------------------------------------------------------------------------------

def _tables() -> dict[str, list[tuple[str, str]]]:
    return pe._TABLES


@functools.cache
def _known_words() -> frozenset[str]:
    """Every word of every table phrase, the background words and the place words."""
    words = set(PLACE_DIRECTION)
    for table in _tables().values():
        words |= {w for phrase, _ in table for w in phrase.split()}
    words |= {w for phrases in pe.BACKGROUND_SYNONYMS.values() for w in phrases}
    words |= {w for phrases in vocab.BACKGROUND_PHRASES.values() for p in phrases for w in p.split()}
    return frozenset(words)


@functools.cache
def _single_words() -> dict[str, tuple[str, str]]:
    """One-word table phrases (and place words) -> (concept, value)."""
    out = {}
    for concept in ("color", "shape", "direction", "speed", "size"):
        for phrase, value in _tables()[concept]:
            if " " not in phrase:
                out.setdefault(phrase, (concept, value))
    for place, direction in PLACE_DIRECTION.items():
        out.setdefault(place, ("direction", direction))
    return out


def _stem(word: str) -> str:
    """A crude inflection stem: "plunges", "plunging", "plunged" -> "plung"; "dropped" -> "drop"."""
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    word = word[:-1] if word.endswith("e") and len(word) > 3 else word
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouls":
        word = word[:-1]
    return word


def _spellings(word: str) -> set[str]:
    """Words one slip away: two neighbouring letters swapped, or a letter typed twice."""
    swaps = {word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(len(word) - 1) if word[i] != word[i + 1]}
    doubles = {word[:i] + word[i + 1:] for i in range(1, len(word)) if word[i] == word[i - 1]}
    return swaps | doubles


def _colour_form(word: str, colours: dict[str, str]) -> str | None:
    """The table colour word a derived form stands for: "reddish" -> "red", "bluish" -> "blue", "orangey" ->
    "orange"."""
    for suffix in ("ish", "ey", "y"):
        if word.endswith(suffix):
            stem = word[: -len(suffix)]
            for candidate in (stem, stem + "e", stem[:-1] if len(stem) > 2 and stem[-1] == stem[-2] else stem):
                if candidate in colours:
                    return candidate
    return None


def _mixture(first: str, second: str) -> str:
    """The nano colour between two others on the hue circle ("blue" + "green" -> "cyan"); with none between them
    (or white), the second, as in "yellowish green"."""
    if "white" in (first, second) or first == second:
        return second
    hues = {name: pe._hsv(rgb)[0] for name, rgb in vocab.COLORS.items() if name != "white"}
    a, b = hues[first], hues[second]
    span = (b - a) % 360
    if span > 180:  # walk the short way round
        a, b, span = b, a, 360 - span
    middle = (a + span / 2) % 360
    between = [n for n, h in hues.items() if 0 < (h - a) % 360 < span]
    if not between:
        return second
    return min(between, key=lambda n: min(abs(hues[n] - middle), 360 - abs(hues[n] - middle)))


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------

def _normalise(prompt: str) -> tuple[str, str | None]:
    """Lower-case words with the shot size and the backdrop taken out, and the backdrop's colour."""
    text = " ".join(re.sub(r"[^a-z\- ]", " ", prompt.lower()).split())
    text = pe._NOT_A_DIRECTION.sub(" ", text)
    background = None
    backdrop = pe._BACKDROP.search(text)
    if backdrop:  # read the backdrop's colour, then hide it from the object's colour
        background = pe._first_match(backdrop.group(1), pe._phrase_table({}, pe.BACKGROUND_SYNONYMS))
        text = text[:backdrop.start()] + " " + text[backdrop.end():]
    if background is None and pe._DARK_SCENE.search(text):
        background = "dark"
    text = pe._DARK_SCENE.sub(" ", text)
    return " ".join(text.split()), background


def _split(text: str, *, forms: bool) -> list[_Word]:
    """Words, hyphenated ones split ("left-to-right"); with `forms`, colour words derived or mixed ("reddish",
    "blue-green", "greenish blue") and misspelt or inflected table words are rewritten to the table's word."""
    colours = {phrase: value for phrase, value in _tables()["color"] if " " not in phrase}
    known = _known_words()
    singles = _single_words()
    stems = {}
    for word, (concept, _) in singles.items():
        if concept != "color" and len(word) >= 4:
            stems.setdefault(_stem(word), word)
    words: list[_Word] = []
    for token in text.split():
        suffix = _COLOR_SUFFIX.match(token) if "-" in token or token.endswith(("coloured", "colored")) else None
        marked = bool(suffix) and suffix.group(1) not in ("", "multi", "many", "two", "brightly")
        if marked:
            token = suffix.group(1)
        parts = [p for p in token.split("-") if p]
        if forms and len(parts) == 2:  # "blue-green", "greenish-blue"
            a, b = (colours.get(p) or colours.get(_colour_form(p, colours) or "") for p in parts)
            if a and b:
                mixed = _mixture(a, b)
                words.append(_Word(mixed, _Rewrite(token, f"between {a} and {b}")))
                continue
        for part in parts:
            words.append(_Word(part, colour_word=marked))
    if not forms:
        return words
    out: list[_Word] = []
    for word in words:
        text_ = word.text
        if word.origin or text_ in known or len(text_) < 3:
            out.append(word)
            continue
        base = _colour_form(text_, colours)
        if base:
            out.append(_Word(base, _Rewrite(text_, f"word form of '{base}'")))
            continue
        slips = [w for w in _spellings(text_) if w in singles and len(w) >= 4]
        if slips and len(text_) >= 4:
            out.append(_Word(slips[0], _Rewrite(text_, f"spelling of '{slips[0]}'")))
            continue
        stem = _stem(text_)
        if stem in stems and stems[stem] != text_:
            out.append(_Word(stems[stem], _Rewrite(text_, f"word form of '{stems[stem]}'")))
            continue
        out.append(word)
    # "greenish blue", "bluish green": a derived colour word before another colour word mixes with it
    merged: list[_Word] = []
    for word in out:
        previous = merged[-1] if merged else None
        if (previous is not None and previous.origin is not None and previous.origin.reason.startswith("word form")
                and previous.text in colours and word.text in colours and word.origin is None):
            a, b = colours[previous.text], colours[word.text]
            phrase = f"{previous.origin.phrase} {word.text}"
            merged[-1] = _Word(_mixture(a, b), _Rewrite(phrase, f"between {a} and {b}"))
            continue
        merged.append(word)
    return merged


def _char_spans(words: list[_Word]) -> tuple[str, list[int]]:
    starts, position = [], 0
    for word in words:
        starts.append(position)
        position += len(word.text) + 1
    return " ".join(w.text for w in words), starts


def _word_range(starts: list[int], start: int, end: int) -> tuple[int, int]:
    first = max(i for i, s in enumerate(starts) if s <= start)
    last = max(i for i, s in enumerate(starts) if s < end)
    return first, last + 1


def _table_matches(text: str, table: list[tuple[str, str]], plurals: bool = False) -> list[tuple[int, int, str]]:
    suffix = r"(?:e?s)?" if plurals else ""
    found = []
    for phrase, concept in table:
        for match in re.finditer(rf"\b{re.escape(phrase)}{suffix}\b", text):
            found.append((match.start(), match.end(), concept))
    return found


def _grammar_matches(text: str, patterns) -> list[tuple[int, int, str]]:
    found = []
    for pattern, kind in patterns:
        for match in pattern.finditer(text):
            b = PLACE_DIRECTION[match.group("b")]
            if "a" in match.groupdict() and PLACE_DIRECTION[match.group("a")] == b:
                continue  # "from the left edge to the left side": no motion named
            found.append((match.start(), match.end(), b if kind == "to" else OPPOSITE[b]))
    return found


def _first(matches: list[tuple[int, int, str]]) -> tuple[int, int, str] | None:
    """The match that starts first, the longest of those that start together."""
    return min(matches, key=lambda m: (m[0], -(m[1] - m[0]), m[2]), default=None)


def _read(words: list[_Word]) -> dict[str, _Match]:
    """The concepts the words name, each with the words it was read from."""
    text, starts = _char_spans(words)
    tables = _tables()
    best: dict[str, tuple[int, int, str] | None] = {
        "color": _first(_table_matches(text, tables["color"])),
        "shape": _first(_table_matches(text, tables["shape"], plurals=True)),
        "speed": _first(_table_matches(text, tables["speed"])),
        "size": _first(_table_matches(text, tables["size"])),
    }
    decisive = _first(_grammar_matches(text, _DECISIVE))
    best["direction"] = decisive or _first(_table_matches(text, tables["direction"])
                                           + _grammar_matches(text, _POSITIONAL))
    found = {}
    for concept, match in best.items():
        if match is not None and text:
            first, last = _word_range(starts, match[0], match[1])
            found[concept] = _Match(match[2], first, last, words[first:last])
    return found


def read_tables(prompt: str) -> pe.NanoAttributes:
    """What the tables (and their grammar) read in a prompt, with nothing guessed; None where it says nothing."""
    text, background = _normalise(prompt)
    found = _read(_split(text, forms=False))
    return pe.NanoAttributes(**{c: m.value for c, m in found.items()}, background=background)


# ---------------------------------------------------------------------------------------------------------------
# Nearest concept in MiniLM space
# ---------------------------------------------------------------------------------------------------------------

def _load_minilm(folder: Path):
    from ..text import load_minilm
    return load_minilm()


def default_encoder():
    """The embedded MiniLM encoder, one instance per process (the model cache's)."""
    from .. import model_cache
    from ..text import minilm_folder
    return model_cache.load(_load_minilm, minilm_folder())


def embed(encoder, texts: list[str]) -> torch.Tensor:
    """Unit-length sentence embeddings [N, D]: MiniLM token states mean-pooled over each text's tokens, as
    sentence-transformers pools all-MiniLM-L6-v2."""
    states, lengths = encoder.encode(texts)
    mask = (torch.arange(states.shape[1])[None] < lengths[:, None]).to(states.dtype)
    pooled = (states * mask[..., None]).sum(dim=1) / lengths[:, None].to(states.dtype)
    return torch.nn.functional.normalize(pooled, dim=1)


@functools.cache
def anchors() -> tuple[tuple[str, str | None, str | None], ...]:
    """(phrase, concept, value) the prompt's unknown phrases are compared with: every table phrase, the place
    words, and generic prompt words (concept None) that absorb what is no nano concept."""
    out = []
    for concept in ("color", "shape", "direction", "speed", "size"):
        out += [(phrase, concept, value) for phrase, value in _tables()[concept]]
    out += [(place, "direction", place) for place in PLACE_DIRECTION]
    out += [(word, None, None) for word in ABSORBERS]
    seen, unique = set(), []
    for phrase, concept, value in out:
        if phrase not in seen:
            seen.add(phrase)
            unique.append((phrase, concept, value))
    return tuple(unique)


_ANCHOR_EMBEDDINGS: dict[tuple, torch.Tensor] = {}


def _anchor_embeddings(encoder) -> torch.Tensor:
    key = (getattr(encoder, "identity", id(encoder)), len(anchors()))
    if key not in _ANCHOR_EMBEDDINGS:
        _ANCHOR_EMBEDDINGS[key] = embed(encoder, [phrase for phrase, _, _ in anchors()])
    return _ANCHOR_EMBEDDINGS[key]


def _candidates(words: list[_Word], known: frozenset[str]) -> list[tuple[int, int]]:
    """Word ranges worth comparing: single unknown words, and runs of two or three ("gaining altitude", "higher
    and higher") whose outer words are unknown."""
    def unknown(w: _Word) -> bool:
        return (w.origin is None and w.text not in known and w.text not in STOPWORDS
                and len(w.text) >= 3 and w.text.isalpha())
    spans = []
    for i, word in enumerate(words[:MAX_WORDS]):
        if not unknown(word):
            continue
        spans.append((i, i + 1))
        for n in (2, 3):
            j = i + n
            if j <= len(words) and unknown(words[j - 1]) and all(
                    unknown(w) or w.text in ("and", "of") for w in words[i + 1:j - 1]):
                spans.append((i, j))
    return spans


@dataclass(frozen=True)
class _Guess:
    start: int
    end: int
    phrase: str  # the prompt's words
    anchor: str  # the nearest table phrase
    concept: str | None
    value: str | None
    score: float
    limit: float = 0.0  # the threshold it was held against


def nearest_concepts(phrases: list[str], encoder) -> list[tuple[str, str | None, str | None, float]]:
    """For each phrase, its nearest anchor phrase, that phrase's concept and value, and the cosine similarity."""
    if not phrases:
        return []
    table = anchors()
    similarity = embed(encoder, phrases) @ _anchor_embeddings(encoder).T
    scores, index = similarity.max(dim=1)
    return [(table[i][0], table[i][1], table[i][2], float(s)) for s, i in zip(scores.tolist(), index.tolist())]


def _similar(words: list[_Word], open_concepts: set[str], encoder, thresholds: dict[str, float]
             ) -> tuple[list[_Guess], list[_Guess]]:
    """The best guess per open concept that reaches its threshold (non-overlapping), and the best rejected phrase
    of each concept left open."""
    spans = _candidates(words, _known_words())
    if not spans:
        return [], []
    phrases = [" ".join(w.text for w in words[a:b]) for a, b in spans]
    nearest = nearest_concepts(phrases, encoder)
    guesses = [_Guess(a, b, phrase, anchor, concept, value, score)
               for (a, b), phrase, (anchor, concept, value, score) in zip(spans, phrases, nearest)]
    taken, rejected, used = {}, {}, set()
    for guess in sorted(guesses, key=lambda g: -g.score):  # one guess per concept: its best phrase
        if guess.concept not in open_concepts or guess.concept in taken:
            continue
        if guess.score < thresholds[guess.concept]:
            rejected.setdefault(guess.concept, dataclasses.replace(guess, limit=thresholds[guess.concept]))
        elif used.isdisjoint(range(guess.start, guess.end)):
            taken[guess.concept] = guess
            used.update(range(guess.start, guess.end))
    return list(taken.values()), [g for c, g in rejected.items() if c not in taken]


def _colour_slot(words: list[_Word], shape: _Match | None) -> list[int]:
    """Indices of words that stand where English puts a colour: marked "-coloured", or just before the shape noun
    (size words and articles skipped)."""
    slots = [i for i, w in enumerate(words) if w.colour_word and w.origin is None]
    if shape is not None:
        i = shape.start - 1
        sizes = {p for p, _ in _tables()["size"]} | {p for p, _ in _tables()["speed"]}
        while i >= 0 and words[i].text in sizes:
            i -= 1
        if i >= 0 and words[i].origin is None and words[i].text not in STOPWORDS and words[i].text.isalpha() \
                and words[i].text not in _known_words():
            slots.append(i)
    return sorted(set(slots))


def _extra_colour(words: list[_Word], shape: _Match | None) -> _Match | None:
    """A colour of `vocab.EXTRA_COLORS` (one a LoRA teaches, e.g. "black") just before the shape noun."""
    if shape is None:
        return None
    i = shape.start - 1
    sizes = {p for p, _ in _tables()["size"]} | {p for p, _ in _tables()["speed"]}
    while i >= 0 and words[i].text in sizes:
        i -= 1
    if i >= 0 and words[i].text in vocab.EXTRA_COLORS:
        return _Match(words[i].text, i, i + 1, [words[i]])
    return None


def _named_colour(words: list[_Word], shape: _Match | None) -> _Match | None:
    """A word where English puts the colour that the published colour-name list knows ("cardinal", "carrot"
    as in "carrot orange"), read as the nano colour of its hue (the majority of its names); None where no word is
    in the list, or its names are greys or disagree."""
    for i in _colour_slot(words, shape):
        entries = color_names.named_colors(words[i].text)
        votes = collections.Counter(None if name.split()[-1] in color_names.GREYS
                                    else pe.nearest_nano_color(tuple(c / 255 for c in rgb)) for name, rgb in entries)
        value, count = votes.most_common(1)[0] if votes else (None, 0)
        if value is None or 2 * count <= len(entries):  # a grey, or no majority ("steel blue", "steel gray")
            continue
        names = ", ".join(f"'{name}' #{r:02x}{g:02x}{b:02x}" for name, (r, g, b) in entries[:3])
        rewrite = _Rewrite(words[i].text, f"colour name {names} in the Name that Color list")
        return _Match(value, i, i + 1, [_Word(value, rewrite)])
    return None


def _slot_colour(words: list[_Word], slots: list[int], encoder, threshold: float
                 ) -> tuple[_Guess | None, _Guess | None]:
    """The best colour guess for the slot words (None below `threshold`, or where a generic word is nearer), and
    the best rejected one."""
    if not slots:
        return None, None
    table = anchors()
    similarity = embed(encoder, [words[i].text for i in slots]) @ _anchor_embeddings(encoder).T
    colour = torch.tensor([concept == "color" for _, concept, _ in table])
    generic = torch.tensor([concept is None for _, concept, _ in table])
    best = None
    for row, i in zip(similarity, slots):
        j = int(torch.where(colour, row, -2.0).argmax())
        score, nearest_generic = float(row[j]), float(torch.where(generic, row, -2.0).max())
        guess = _Guess(i, i + 1, words[i].text, table[j][0], "color", table[j][2], score, threshold)
        if score >= nearest_generic and (best is None or score > best.score):
            best = guess
    if best is None or best.score < threshold:
        return None, best
    return best, None


def _apply(words: list[_Word], guesses: list[_Guess]) -> list[_Word]:
    """The words with each guessed range replaced by its table phrase."""
    out, by_start = [], {g.start: g for g in guesses}
    i = 0
    while i < len(words):
        guess = by_start.get(i)
        if guess is None:
            out.append(words[i])
            i += 1
            continue
        rewrite = _Rewrite(guess.phrase, f"similarity {guess.score:.2f}", guess.score)
        out += [_Word(w, rewrite) for w in guess.anchor.split()]
        i = guess.end
    return out


# ---------------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------------

def _finding(concept: str, match: _Match) -> Finding:
    rewrites = [w.origin for w in match.words if w.origin is not None]
    if not rewrites:
        return Finding(concept, match.value, "read", " ".join(w.text for w in match.words))
    rewrite = rewrites[0]
    return Finding(concept, match.value, "guessed", rewrite.phrase, rewrite.reason, rewrite.score)


def recaption_nano(prompt: str, *, seed: int = 0, encoder=None, guess: bool = True,
                   thresholds: dict[str, float] | None = None) -> Recaption:
    """Rewrite a prompt as a nano caption, saying how each part of it was found.

    seed: picks the colour, shape or direction the prompt leaves open (a colour that stays visible on a named
    background). encoder: the MiniLM text encoder for similarity guesses; None loads the embedded one when a
    guess needs it (once per process). guess=False reads the tables only. thresholds: per-concept similarity
    thresholds instead of `THRESHOLDS`.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty; type a few words describing the video")
    thresholds = {**THRESHOLDS, **(thresholds or {})}
    text, background = _normalise(prompt)
    words = _split(text, forms=guess)
    found = _read(words)
    if "color" not in found and (extra := _extra_colour(words, found.get("shape"))) is not None:
        found["color"] = extra
    if guess and "color" not in found and (named := _named_colour(words, found.get("shape"))) is not None:
        found["color"] = named
    rejected: list[_Guess] = []
    open_concepts = {c for c in GUESSED if c not in found}
    if guess and open_concepts and _candidates(words, _known_words()):
        if encoder is None:
            encoder = default_encoder()
        elif getattr(encoder, "name", None) != "minilm-l6":
            raise InputError(f"nano recaption compares phrases in MiniLM space; got the {encoder.name} encoder. "
                             "Pass the embedded MiniLM (sora.text.load_minilm()) or None")
        slots = _colour_slot(words, found.get("shape"))
        if slots:  # a word where English puts the colour is the colour, or nothing else in the prompt is
            open_concepts.discard("color")
        guesses, rejected = _similar(words, open_concepts, encoder, thresholds)
        if guesses:
            words = _apply(words, guesses)
            again = _read(words)
            found.update({c: again[c] for c in open_concepts if c in again})
        if "color" not in found:
            slot, near = _slot_colour(words, _colour_slot(words, found.get("shape")), encoder,
                                      thresholds["color slot"])
            slot_match = _read(_apply(words, [slot])).get("color") if slot is not None else None
            if slot_match is not None:
                found["color"] = slot_match
            elif near is not None:
                rejected = [near] + [g for g in rejected if g.concept != "color"]
    findings = {concept: _finding(concept, match) for concept, match in found.items()}
    if background is not None:
        findings["background"] = Finding("background", background, "read")

    rng = random.Random(seed)  # the same draws, in the same order, as the tables-only mapper made
    seeded = {}
    if "color" not in findings:
        visible = [c for c in sorted(vocab.COLORS) if background is None or contrast(c, background) >= MIN_CONTRAST]
        seeded["color"] = rng.choice(visible)
    if "shape" not in findings:
        seeded["shape"] = rng.choice(sorted(vocab.SHAPES))
    if "direction" not in findings:
        seeded["direction"] = rng.choice(sorted(vocab.DIRECTIONS))
    findings.update({c: Finding(c, v, "seed") for c, v in seeded.items()})

    values = {c: f.value for c, f in findings.items()}
    attributes = pe.NanoAttributes(**values)
    notes = []
    if attributes.color in vocab.EXTRA_COLORS:
        notes.append(f"'{attributes.color}' is not one of the nano model's eight colours; it makes it with the "
                     f"embedded LoRA \"nano {attributes.color}\" (Sora Load LoRA)")
    for concept in ("color", "shape", "direction", "speed", "size"):
        f = findings.get(concept)
        if f is not None and f.how == "guessed":
            notes.append(f"guessed {LABELS[concept]} '{f.value}' from '{f.phrase}' ({f.reason})")
        elif f is not None and f.how == "seed":
            near = next((g for g in rejected if g.concept == concept), None)
            why = (f" ('{near.phrase}' is nearest to '{near.anchor}', similarity {near.score:.2f}, below "
                   f"{near.limit:.2f})" if near else "")
            notes.append(f"no {LABELS[concept]} in the prompt{why}: '{f.value}' chosen by the seed")
    return Recaption(caption=_caption(attributes), attributes=attributes, findings=findings, notes=tuple(notes))


def _caption(found: pe.NanoAttributes) -> str:
    words = [vocab.SIZES[found.size][0] if found.size else "", found.color, vocab.SHAPES[found.shape][0],
             vocab.SPEEDS[found.speed][0] if found.speed else "", vocab.DIRECTION_PHRASES[found.direction][0]]
    if found.background:
        words.append(vocab.BACKGROUND_PHRASES[found.background][0])
    words = [w for w in words if w]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)
