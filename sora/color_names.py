"""Colour names people use, looked up in a published list: a word -> the RGB colours it names.

The list is Chirag Mehta's "Name that Color" (ntc.js, 1,566 names: "cardinal", "persimmon", "shamrock",
"carrot orange"), shipped as data by the PyPI package `pycolornames` (MIT). A word names a colour when the list has it
alone, or as the first word of a two-word name whose second word is a basic colour term ("carrot" in "carrot
orange", "steel" in "steel blue" and "steel gray"). A word that only follows a colour term ("blue lagoon", "black
pearl") or a modifier ("bright", "dark") names none: there the word is the thing, not its colour.
"""
from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

RGB = tuple[int, int, int]

# Second words of two-word names that say which colour the first word is.
BASIC_TERMS = frozenset("red orange yellow green blue cyan teal purple violet pink white black grey gray brown".split())
# Basic terms that are no hue: a name ending in one is a grey ("steel gray", "slate gray").
GREYS = frozenset("black grey gray".split())
# Words that shade a colour without naming one ("bright red", "deep teal", "dark blue").
MODIFIERS = frozenset("bright dark deep light pale vivid soft hot electric neon dull dusty medium rich strong".split())


@functools.cache
def _names() -> dict[str, RGB]:
    try:
        import colornames  # pycolornames: its table of name -> (r, g, b), names capitalised
    except ImportError:
        log.warning("colour names are not read: the package pycolornames is missing (pip install pycolornames, or "
                    "pip install -r requirements.txt in this pack's folder)")
        return {}
    return {name.lower(): tuple(rgb) for name, rgb in colornames._colors.items()}


def named_colors(word: str) -> list[tuple[str, RGB]]:
    """The (name, RGB 0..255) entries of the list that `word` names: its own entry, or else every two-word name
    "<word> <basic term>"; empty when the word names no colour."""
    word = word.lower().strip()
    if not word or word in MODIFIERS:
        return []
    names = _names()
    if word in names:
        return [(word, names[word])]
    return [(name, rgb) for name, rgb in names.items()
            if name.startswith(word + " ") and name.count(" ") == 1 and name.split()[1] in BASIC_TERMS]
