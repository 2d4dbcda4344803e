"""Compositional prompts over scikit-learn's digits: the grammar, the layout and the renderer of the tiny
text-to-image task (a GenEval analogue on a CPU).

An image is a 32x32 RGB canvas (float in [-1, 1], black background) cut into a 2x2 grid of 16x16 cells;
each digit fills one cell (a scikit-learn digit upsampled to 16x16, exactly the digit classifier's input,
tinted with one of ``COLOURS``).  Prompts name which digits, how many (1-3), their colour and, for two
digits, their relative position:

    "a red 3"                        count prompt, one digit
    "two blue 7s" / "three green 0s" count prompt: 2 or 3 digits of the same class and colour, in random cells
    "a red 3 left of a blue 7"       relation prompt: "left of" | "right of" | "above" | "below"

``parse_prompt`` turns a prompt into a :class:`Composition` (and names what is wrong with one it cannot
parse); ``render`` draws a composition.  The held-out prompt set is defined by ``is_held_out``: prompts
whose *primary triple* (first colour, first digit, arrangement) is in a fixed 1-in-8 subset of the triples;
their words and every colour-digit pair still occur in training, in other combinations.  The image of a
held-out relation prompt can occur in training under the converse phrasing ("a blue 7 right of a red 3"):
what is held out is the text composition, as in GenEval's novel attribute bindings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

CANVAS = 32
CELL = 16
# tints (R, G, B) in [0, 1]; every tint has its largest channel at 1, so max over channels recovers the ink
# intensity that the digit classifier was trained on
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 1.0, 0.15),
    "blue": (0.25, 0.4, 1.0),
    "yellow": (1.0, 1.0, 0.15),
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
RELATIONS = ("left of", "right of", "above", "below")
ARRANGEMENTS = ("one", "two", "three") + RELATIONS  # the third element of a prompt's primary triple
# cells are (row, col) in the 2x2 grid; cell k is row k // 2, col k % 2
CELLS = ((0, 0), (0, 1), (1, 0), (1, 1))


@dataclass(frozen=True)
class Composition:
    """A parsed prompt.

    objects: ((digit, colour), ...): one entry for a count prompt, two for a relation prompt.
    count: how many digits the image shows (1-3 for count prompts, 2 for relation prompts).
    relation: None, or where objects[0] is relative to objects[1] ('left of', 'right of', 'above', 'below').
    """

    objects: tuple[tuple[int, str], ...]
    count: int
    relation: str | None = None

    @property
    def arrangement(self) -> str:
        return self.relation if self.relation is not None else ARRANGEMENTS[self.count - 1]

    @property
    def primary(self) -> tuple[str, int, str]:
        """(colour, digit, arrangement) of the first object: the triple that decides held-out membership."""
        digit, colour = self.objects[0]
        return colour, digit, self.arrangement

    def prompt(self) -> str:
        (d0, c0) = self.objects[0]
        if self.relation is None:
            noun = f"{d0}" if self.count == 1 else f"{d0}s"
            return f"{COUNT_WORDS[self.count]} {c0} {noun}"
        d1, c1 = self.objects[1]
        return f"a {c0} {d0} {self.relation} a {c1} {d1}"


_COLOUR_RE = "|".join(COLOURS)
_COUNT_RE = re.compile(rf"^(a|two|three) ({_COLOUR_RE}) ([0-9])(s?)$")
_REL_RE = re.compile(rf"^a ({_COLOUR_RE}) ([0-9]) (left of|right of|above|below) a ({_COLOUR_RE}) ([0-9])$")
_COUNT_OF = {"a": 1, "two": 2, "three": 3}
GRAMMAR = ("'<a|two|three> <colour> <digit>[s]' (plural 's' exactly when the count is two or three) or "
           "'a <colour> <digit> <left of|right of|above|below> a <colour> <digit>', colours "
           f"{list(COLOURS)}, digits 0-9, lower case, single spaces")


def parse_prompt(prompt: str) -> Composition:
    """Parse a prompt of the grammar (see the module docstring); a ValueError names what does not parse."""
    if not isinstance(prompt, str):
        raise TypeError(f"a composition prompt must be a string, got {type(prompt).__name__}")
    text = prompt.strip()
    m = _COUNT_RE.match(text)
    if m:
        count = _COUNT_OF[m.group(1)]
        if (count > 1) != (m.group(4) == "s"):
            raise ValueError(f"prompt {prompt!r}: write 'a red 3' for one digit and 'two red 3s' for several")
        return Composition(objects=((int(m.group(3)), m.group(2)),), count=count)
    m = _REL_RE.match(text)
    if m:
        return Composition(objects=((int(m.group(2)), m.group(1)), (int(m.group(5)), m.group(4))), count=2,
                           relation=m.group(3))
    raise ValueError(f"prompt {prompt!r} is not a composition prompt; the grammar is {GRAMMAR}")


def composition_from_metadata(meta: dict, prompt: str = "") -> Composition | None:
    """The composition a GenEval-style metadata entry describes, or None when it has no ``include`` list.

    ``include``: one object ``{"class": "3", "count": 2, "color": "red"}`` for a count prompt ('two red 3s'), or two
    for a relation prompt, the second placed relative to the first as GenEval writes it:
    ``[{"class": "7", "count": 1, "color": "blue"}, {"class": "3", "count": 1, "color": "red",
    "position": ["left of", 0]}]`` is 'a red 3 left of a blue 7'.  A malformed entry is a ValueError naming it."""
    include = meta.get("include") if isinstance(meta, dict) else None
    if include is None:
        return None
    where = f"metadata of prompt {prompt!r}"

    def obj(o):
        if not isinstance(o, dict):
            raise ValueError(f"{where}: each include entry is an object, got {o!r}")
        try:
            digit = int(o["class"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: include entry {o} needs a digit 'class' '0'-'9'") from None
        colour = o.get("color")
        if not 0 <= digit <= 9 or colour not in COLOURS:
            raise ValueError(f"{where}: include entry {o} needs a digit class 0-9 and a color among {list(COLOURS)}")
        count = o.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 3:
            raise ValueError(f"{where}: include entry {o}: count must be 1, 2 or 3")
        return (digit, colour), count

    if not isinstance(include, list) or len(include) not in (1, 2):
        raise ValueError(f"{where}: include must list one object (a count prompt) or two (a relation prompt)")
    if len(include) == 1:
        if "position" in include[0]:
            raise ValueError(f"{where}: a position needs a second object to refer to")
        o, count = obj(include[0])
        return Composition(objects=(o,), count=count)
    (ref, n0), (o, n1) = obj(include[0]), obj(include[1])
    pos = include[1].get("position")
    if not (isinstance(pos, (list, tuple)) and len(pos) == 2 and pos[0] in RELATIONS and pos[1] == 0) or n0 != 1 \
            or n1 != 1:
        raise ValueError(f"{where}: a relation prompt's second object needs \"position\": [<one of {list(RELATIONS)}>, "
                         "0] and both objects count 1")
    return Composition(objects=(o, ref), count=2, relation=pos[0])


def is_held_out(comp: Composition) -> bool:
    """Whether a composition belongs to the held-out prompt set: its primary triple (colour, digit,
    arrangement) is in a fixed 1-in-8 subset; single-digit prompts ('a red 3') are never held out."""
    colour, digit, arrangement = comp.primary
    if arrangement == "one":
        return False
    return (digit + 3 * list(COLOURS).index(colour) + 5 * ARRANGEMENTS.index(arrangement)) % 8 == 0


def all_compositions() -> list[Composition]:
    """Every composition of the grammar: 120 count prompts and 6400 relation prompts, in a fixed order."""
    out = []
    for count in (1, 2, 3):
        for colour in COLOURS:
            for d in range(10):
                out.append(Composition(((d, colour),), count))
    for rel in RELATIONS:
        for c0 in COLOURS:
            for d0 in range(10):
                for c1 in COLOURS:
                    for d1 in range(10):
                        out.append(Composition(((d0, c0), (d1, c1)), 2, rel))
    return out


def prompt_split() -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts) over every composition of the grammar."""
    train, held = [], []
    for comp in all_compositions():
        (held if is_held_out(comp) else train).append(comp.prompt())
    return train, held


def vocabulary_words() -> list[str]:
    """The words (pre-tokens of CLIP's tokenizer) of every prompt of the grammar: CLIP's pre-tokenizer splits
    digits one by one, so '3s' is the two words '3' and 's'."""
    words = set(COUNT_WORDS.values()) | set(COLOURS) | {str(d) for d in range(10)} | {"s"}
    for rel in RELATIONS:
        words.update(rel.split())
    return sorted(words)


# ------------------------------------------------------------------------------------------------------
# layout and rendering
def layout(comp: Composition, rng: np.random.Generator) -> list[tuple[int, str, int]]:
    """Place a composition on the 2x2 grid: a list of (digit, colour, cell index).

    Count prompts take ``count`` distinct random cells; 'left of' / 'right of' put the two digits in the
    same random row, 'above' / 'below' in the same random column."""
    if comp.relation is None:
        cells = rng.choice(4, size=comp.count, replace=False)
        (d, c) = comp.objects[0]
        return [(d, c, int(k)) for k in cells]
    (d0, c0), (d1, c1) = comp.objects
    line = int(rng.integers(2))
    if comp.relation in ("left of", "right of"):
        a, b = (line, 0), (line, 1)
    else:
        a, b = (0, line), (1, line)
    if comp.relation in ("right of", "below"):
        a, b = b, a
    return [(d0, c0, CELLS.index(a)), (d1, c1, CELLS.index(b))]


def load_digit_glyphs() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ink intensities: (N, 16, 16) float32 in [0, 1] (the digits task's upsampling)
    and their labels (N,)."""
    from .digits import load_digits_dataset

    images, labels = load_digits_dataset()
    return (images[:, 0] + 1) / 2, labels


class Renderer:
    """Draws compositions with randomly drawn glyphs of each digit class.

    glyphs: (N, 16, 16) ink in [0, 1]; labels: (N,) digit classes (default: all of scikit-learn's digits)."""

    def __init__(self, glyphs: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        if glyphs is None:
            glyphs, labels = load_digit_glyphs()
        self.glyphs = glyphs
        self.by_class = [torch.nonzero(labels == d).flatten().numpy() for d in range(10)]
        if any(len(ix) == 0 for ix in self.by_class):
            raise ValueError("Renderer needs at least one glyph of every digit class")

    def draw(self, placed: list[tuple[int, str, int]], rng: np.random.Generator) -> torch.Tensor:
        """(3, 32, 32) float32 image in [-1, 1] with each (digit, colour, cell) of ``placed``."""
        img = torch.zeros(3, CANVAS, CANVAS)
        for digit, colour, cell in placed:
            ink = self.glyphs[int(rng.choice(self.by_class[digit]))]
            r, c = CELLS[cell]
            tint = torch.tensor(COLOURS[colour]).view(3, 1, 1)
            img[:, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = ink * tint
        return img * 2 - 1

    def render(self, comp: Composition, rng: np.random.Generator) -> torch.Tensor:
        return self.draw(layout(comp, rng), rng)


def cell_views(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) images -> (B, 4, 3, 16, 16): the four grid cells in ``CELLS`` order."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, CANVAS, CANVAS):
        raise ValueError(f"composition images are (B, 3, {CANVAS}, {CANVAS}) in [-1, 1], got {tuple(images.shape)}")
    b = images.shape[0]
    x = images.reshape(b, 3, 2, CELL, 2, CELL).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, 4, 3, CELL, CELL)

