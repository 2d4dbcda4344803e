"""GenEval-like rewards of the tiny text-to-image task: check each clause of a composition prompt
(``critic_align.tasks.composition``) on the decoded image.

Samples are ``(B, 3, 32, 32)`` RGB images in ``[-1, 1]``: a 2x2 grid of 16x16 cells.  Per cell:

* **occupancy**: the cell's mean ink (max over the colour channels, in [0, 1]); every scikit-learn digit has
  a mean ink >= 0.18 and an empty cell 0, so a cell is occupied when its ink exceeds ``ink_threshold``
  (0.09); its soft occupancy is ``sigmoid((ink - ink_threshold) / ink_scale)``.
* **digit**: the shipped digit classifier on the cell's ink (``2 * ink - 1``, exactly its 16x16 input),
  ``softmax(logits / temperature)``.
* **colour**: the ink-weighted mean RGB of the cell divided by its largest channel (for a pure tint this
  is the tint itself), compared with each of ``COLOURS`` by squared distance: ``softmax(-d / colour_scale)``.
* **centroid**: the ink-weighted centroid of the cell, in canvas pixels.

Clauses of a prompt and how each is judged:

* ``count``: the number of occupied cells equals the prompt's count (1-3, or 2 for a relation prompt);
  its probability is the Poisson-binomial probability of exactly that many occupied cells.
* ``digit`` / ``colour``: count prompts judge the ``count`` cells with the most ink, relation prompts the
  ordered pair of distinct cells (i, j) that best explains the two named digits (largest
  occ_i P_i(d0) + occ_j P_j(d1), among pairs of occupied cells first).  Right when every judged cell is
  occupied and its argmax is the named digit / colour; the probability is the mean over judged cells of
  occupancy x P(named digit / colour).
* ``position`` (relation prompts): with (dx, dy) the displacement from the first object's centroid to the
  second's (x to the right, y down), 'left of' means the second object is to the right: along = dx,
  across = |dy| (similarly for the others); right when along > across, probability
  ``sigmoid((along - across) / position_scale)``.

``composition`` (:class:`CompositionScore`) is the mean of the clause probabilities (dense, for training);
``composition_correct`` (:class:`CompositionCorrect`) is 1 when every clause is right (GenEval's metric).
:func:`judge_compositions` returns the per-clause results (what the model card's per-attribute accuracy
counts).  It is :func:`pixel_features` (the non-neural measurements), the digit classifier on each cell's ink, and
:func:`judge_cells` (the clause read-out from those cell features and the prompts' clauses): the grafted critic
(``critic_align.grafted.composition_graft``) calls the same two functions around its own digit logits.
``composition_correct`` is not differentiable; ``composition``'s score is, almost everywhere, in the cell features
(the cell assignment is discrete: piecewise constant).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from critic_align.rewards.digits import _DigitClassifierReward
from critic_align.tasks.composition import (
    CANVAS,
    CELL,
    CELLS,
    COLOURS,
    Composition,
    cell_views,
    composition_from_metadata,
    parse_prompt,
)

__all__ = ["ATTRIBUTES", "CellFeatures", "CompositionCorrect", "CompositionScore", "Judgement", "cell_features",
           "judge_cells", "judge_compositions", "pixel_features", "with_digit_logits"]

ATTRIBUTES = ("count", "digit", "colour", "position")


@dataclass
class Judgement:
    """Per-clause results for B images.

    prob: {attribute: (B,) float} clause probabilities; NaN where the prompt has no such clause
        (position for count prompts).
    correct: {attribute: (B,) float} 1.0 / 0.0 whether the clause holds; NaN where not applicable.
    all_correct: (B,) float, 1.0 where every applicable clause holds.
    score: (B,) float, the mean of the applicable clause probabilities.
    """

    prob: dict[str, torch.Tensor]
    correct: dict[str, torch.Tensor]
    all_correct: torch.Tensor
    score: torch.Tensor


@dataclass
class CellFeatures:
    """Per-cell measurements of B images (4 cells in ``CELLS`` order).

    ink: (B, 4) mean ink; occ: (B, 4) soft occupancy; digit_prob: (B, 4, 10) (None from :func:`pixel_features`,
    before the digit classifier ran); colour_prob: (B, 4, K) over
    ``COLOURS``; centroid: (B, 4, 2) ink centroid (x, y) in canvas pixels."""

    ink: torch.Tensor
    occ: torch.Tensor
    digit_prob: torch.Tensor | None
    colour_prob: torch.Tensor
    centroid: torch.Tensor


def pixel_features(images: torch.Tensor, ink_threshold: float = 0.09, ink_scale: float = 0.02,
                   colour_scale: float = 0.05) -> tuple[CellFeatures, torch.Tensor]:
    """The non-neural measurements of each cell of ``images`` (B, 3, 32, 32) in [-1, 1], computed in the images'
    dtype: a :class:`CellFeatures` whose ``digit_prob`` is None, and the digit classifier's input of every cell
    (B, 4, 1, 16, 16) (the cell's ink ``2 * ink - 1``)."""
    cells = (cell_views(images) + 1) / 2  # (B, 4, 3, 16, 16) in [0, 1]
    cells = cells.clamp(0, 1)
    intensity = cells.amax(dim=2)  # (B, 4, 16, 16)
    ink = intensity.mean(dim=(2, 3))
    occ = torch.sigmoid((ink - ink_threshold) / ink_scale)
    w = intensity.unsqueeze(2)  # ink-weighted mean colour
    mean_rgb = (cells * w).sum(dim=(3, 4)) / w.sum(dim=(3, 4)).clamp_min(1e-6)  # (B, 4, 3)
    chroma = mean_rgb / mean_rgb.amax(dim=-1, keepdim=True).clamp_min(1e-6)
    tints = torch.tensor(list(COLOURS.values()), dtype=chroma.dtype, device=chroma.device)  # (K, 3)
    dist = ((chroma.unsqueeze(2) - tints) ** 2).sum(-1)  # (B, 4, K)
    colour_prob = (-dist / colour_scale).softmax(dim=-1)
    coords = torch.arange(CELL, dtype=intensity.dtype, device=intensity.device) + 0.5
    mass = intensity.sum(dim=(2, 3)).clamp_min(1e-6)
    cx = (intensity.sum(dim=2) * coords).sum(-1) / mass  # within the cell
    cy = (intensity.sum(dim=3) * coords).sum(-1) / mass
    offsets = torch.tensor([(c * CELL, r * CELL) for r, c in CELLS], dtype=cx.dtype, device=cx.device)  # (4, 2) x, y
    centroid = torch.stack([cx, cy], dim=-1) + offsets
    return CellFeatures(ink, occ, None, colour_prob, centroid), (intensity * 2 - 1).unsqueeze(2)


def with_digit_logits(f: CellFeatures, logits: torch.Tensor, temperature: float = 1.0) -> CellFeatures:
    """``f`` with its ``digit_prob`` = softmax(logits / temperature) of the cells' digit logits (B, 4, 10) (computed
    in float32 at least)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return replace(f, digit_prob=(logits / temperature).softmax(dim=-1))


def cell_features(images: torch.Tensor, classifier: torch.nn.Module, temperature: float = 1.0,
                  ink_threshold: float = 0.09, ink_scale: float = 0.02, colour_scale: float = 0.05) -> CellFeatures:
    """Measure each cell of ``images`` (B, 3, 32, 32) in [-1, 1] (see the module docstring), in float32."""
    f, digit_input = pixel_features(images.float(), ink_threshold, ink_scale, colour_scale)
    b = images.shape[0]
    logits = classifier(digit_input.reshape(b * 4, 1, CELL, CELL)).reshape(b, 4, -1)
    return with_digit_logits(f, logits, temperature)


def exactly_k_prob(p: torch.Tensor, k: int) -> torch.Tensor:
    """Poisson-binomial P(exactly k of the independent events with probabilities p (B, n) happen): (B,)."""
    dist = torch.zeros(p.shape[0], p.shape[1] + 1, dtype=p.dtype, device=p.device)
    dist[:, 0] = 1
    for i in range(p.shape[1]):
        pi = p[:, i:i + 1]
        dist = torch.cat([dist[:, :1] * (1 - pi), dist[:, 1:] * (1 - pi) + dist[:, :-1] * pi], dim=1)
    return dist[:, k]


def _direction(relation: str, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(along, across) of the displacement d = (dx, dy) from the first object to the second for a relation."""
    dx, dy = d[0], d[1]
    along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    across = dy.abs() if relation in ("left of", "right of") else dx.abs()
    return along, across


def judge_compositions(images: torch.Tensor, prompts: Sequence[str], classifier: torch.nn.Module,
                       temperature: float = 1.0, ink_threshold: float = 0.09, ink_scale: float = 0.02,
                       colour_scale: float = 0.05, position_scale: float = 2.0,
                       compositions: Sequence[Composition] | None = None) -> Judgement:
    """Judge every clause of each prompt on its image (see the module docstring); ``compositions``, when given,
    are the prompts' clauses (e.g. from their metadata) and the prompts are not parsed."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError("composition rewards expect a float (B, 3, 32, 32) tensor in [-1, 1]")
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, CANVAS, CANVAS):
        raise ValueError(f"composition rewards expect images of shape (B, 3, {CANVAS}, {CANVAS}) in [-1, 1], got "
                         f"{tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
    comps = list(compositions) if compositions is not None else [parse_prompt(p) for p in prompts]
    f = cell_features(images, classifier, temperature, ink_threshold, ink_scale, colour_scale)
    return judge_cells(f, comps, ink_threshold, position_scale)


def judge_cells(f: CellFeatures, comps: Sequence[Composition], ink_threshold: float = 0.09,
                position_scale: float = 2.0) -> Judgement:
    """The clause read-out: judge each composition ``comps[i]`` on the cells ``f`` of image i (see the module
    docstring).  Probabilities in ``f``'s dtype, differentiable in ``f`` (the cell assignment is not)."""
    if len(comps) != f.ink.shape[0]:
        raise ValueError(f"got {len(comps)} compositions for {f.ink.shape[0]} images")
    dtype = f.occ.dtype
    colour_index = {c: k for k, c in enumerate(COLOURS)}
    nan = float("nan")
    prob = {a: [] for a in ATTRIBUTES}
    correct = {a: [] for a in ATTRIBUTES}
    occupied = f.ink > ink_threshold
    digit_arg, colour_arg = f.digit_prob.argmax(-1), f.colour_prob.argmax(-1)
    for i, comp in enumerate(comps):
        prob["count"].append(exactly_k_prob(f.occ[i:i + 1], comp.count)[0])
        correct["count"].append(float(int(occupied[i].sum()) == comp.count))
        cells, wanted = _assign(comp, f, i, ink_threshold)
        d_prob = torch.stack([f.occ[i, k] * f.digit_prob[i, k, d] for k, (d, _) in zip(cells, wanted)]).mean()
        c_prob = torch.stack([f.occ[i, k] * f.colour_prob[i, k, colour_index[c]] for k, (_, c) in zip(cells, wanted)]).mean()
        prob["digit"].append(d_prob)
        prob["colour"].append(c_prob)
        correct["digit"].append(float(all(bool(occupied[i, k]) and int(digit_arg[i, k]) == d
                                           for k, (d, _) in zip(cells, wanted))))
        correct["colour"].append(float(all(bool(occupied[i, k]) and int(colour_arg[i, k]) == colour_index[c]
                                           for k, (_, c) in zip(cells, wanted))))
        if comp.relation is None:
            prob["position"].append(torch.tensor(nan))
            correct["position"].append(nan)
        else:
            along, across = _direction(comp.relation, f.centroid[i, cells[1]] - f.centroid[i, cells[0]])
            prob["position"].append(torch.sigmoid((along - across) / position_scale))
            correct["position"].append(float(bool(along > across)))
    prob_t = {a: torch.stack([torch.as_tensor(v, dtype=dtype, device=f.occ.device) for v in vals])
              for a, vals in prob.items()}
    correct_t = {a: torch.tensor(vals, dtype=torch.float32) for a, vals in correct.items()}
    stacked_p = torch.stack([prob_t[a] for a in ATTRIBUTES], dim=1)
    stacked_c = torch.stack([correct_t[a] for a in ATTRIBUTES], dim=1)
    score = stacked_p.nanmean(dim=1)
    all_correct = torch.where(torch.isnan(stacked_c), torch.ones_like(stacked_c), stacked_c).amin(dim=1)
    return Judgement(prob_t, correct_t, all_correct, score)


def _assign(comp: Composition, f: CellFeatures, i: int, ink_threshold: float) -> tuple[list[int], list[tuple[int, str]]]:
    """The cells judged for each named object of image i, and the (digit, colour) wanted in each."""
    if comp.relation is None:
        top = torch.argsort(f.ink[i], descending=True)[:comp.count].tolist()
        return top, [comp.objects[0]] * comp.count
    (d0, _), (d1, _) = comp.objects
    # a sum, not a product: with one digit wrong, the pair that matches the other one is chosen
    score = (f.occ[i] * f.digit_prob[i, :, d0])[:, None] + (f.occ[i] * f.digit_prob[i, :, d1])[None, :]
    # pairs of occupied cells come first (a shown digit of the wrong class is judged, not an empty cell)
    occupied = (f.ink[i] > ink_threshold).float()
    score = score + 4.0 * (occupied[:, None] + occupied[None, :])
    score = score.masked_fill(torch.eye(4, dtype=torch.bool, device=score.device), -1.0)
    flat = int(score.argmax())
    return [flat // 4, flat % 4], list(comp.objects)


class _CompositionReward(_DigitClassifierReward):
    """Shared options: ``classifier`` / ``path`` (the digit classifier, default the shipped one, loaded on first
    use), ``temperature`` of its softmax, and the thresholds of :func:`judge_compositions`."""

    def __init__(self, classifier=None, path=None, temperature: float = 1.0, ink_threshold: float = 0.09,
                 ink_scale: float = 0.02, colour_scale: float = 0.05, position_scale: float = 2.0):
        super().__init__(classifier, path)
        opts = dict(temperature=temperature, ink_threshold=ink_threshold, ink_scale=ink_scale,
                    colour_scale=colour_scale, position_scale=position_scale)
        for k, v in opts.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v:
                raise ValueError(f"{self.name}: {k} must be a number > 0, got {v!r}")
        self.opts = {k: float(v) for k, v in opts.items()}

    def compositions(self, prompts: Sequence[str]) -> list[Composition]:
        """The clauses of each prompt: a JSONL prompt file's GenEval-style metadata when it has them, else the
        prompt's parse."""
        prompts = list(prompts)
        metas = self.metadata(prompts)
        if metas is None:
            return [parse_prompt(p) for p in prompts]
        comps = []
        for p, m in zip(prompts, metas):
            c = composition_from_metadata(m, p) if m is not None else None
            comps.append(c if c is not None else parse_prompt(p))
        return comps

    def judge(self, samples, prompts) -> Judgement:
        if not isinstance(samples, torch.Tensor):
            raise TypeError(f"composition rewards expect a (B, 3, 32, 32) tensor, got {type(samples).__name__}")
        prompts = list(prompts)
        return judge_compositions(samples, prompts, self._classifier_for(samples.float()), **self.opts,
                                  compositions=self.compositions(prompts))


class CompositionScore(_CompositionReward):
    """Mean probability of the prompt's clauses (count, digit, colour, position) in [0, 1]: the dense
    GenEval-like reward for training.  ``CompositionScore(classifier=None, path=None, temperature=1.0, ...)``."""

    name = "composition"

    def compute(self, samples, prompts):
        return self.judge(samples, prompts).score


class CompositionCorrect(_CompositionReward):
    """1.0 when every clause of the prompt holds on the image, else 0.0 (GenEval's metric)."""

    name = "composition_correct"

    def compute(self, samples, prompts):
        return self.judge(samples, prompts).all_correct
