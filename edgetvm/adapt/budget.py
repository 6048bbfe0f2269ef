"""A memory budget for p-Meta's selection: drop the least important channels and layers of a learned mask
until the compiled step's planned memory fits.

    fit = fit_budget(model, rates, budget=6 << 20, batch=25)      # rates: p-Meta's learned step sizes
    fit.mask, fit.planned, fit.dropped

The memory-aware L1 weight of meta-training only steers the selection toward cheap layers; it cannot promise
a figure. Here the figure is the project's own planner (step.planned_memory: Relax's memory planning plus
the largest kernel scratch) on the memory-lean build of the masked step, and the selection is greedy: each
round tries, for every updated parameter, dropping the quarter of its selected channels with the smallest
learned step size (at least one), and dropping the lowest updated layer whole (what ends the backward pass
higher, the largest saving), and takes the candidate that saves the most planned bytes per unit of
importance given up (the sum of the dropped channels' step sizes). The classifier's bias is never dropped:
it is the cheapest step there is (no backward pass below the top), so a budget it does not fit is unreachable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgetvm import train
from edgetvm.adapt import step as st
from edgetvm.errors import UserError

MIB = 1 << 20


@dataclass
class Fit:
    mask: dict            # {name: bool vector}: what the step updates now (a subset of the mask given)
    planned: int          # planned dynamic bytes of its step
    dropped: list = field(default_factory=list)   # what was dropped, in order: "conv2.weight 7 channels", ...
    evaluated: int = 0    # planner calls made


class Planner:
    """Planned dynamic bytes of the masked step for a model and support size, cached by mask."""

    def __init__(self, model: train.Model, batch: int):
        self.model, self.batch, self._cache = model, int(batch), {}

    def __call__(self, mask: dict) -> int:
        key = st._mask_key(mask)
        if key not in self._cache:
            mod = st.step_module(self.model, self.batch, mask, 0.1, conv_as_matmul=False)
            self._cache[key] = st.planned_memory(mod, "adapt_step").dynamic
        return self._cache[key]

    @property
    def calls(self) -> int:
        return len(self._cache)


def floor_name(model: train.Model) -> str:
    """The classifier's bias: never dropped, the smallest step."""
    return list(train.param_shapes(model))[-1]


def floor_bytes(model: train.Model, batch: int, planner: Planner | None = None) -> int:
    """Planned bytes of the smallest step (the classifier's bias only)."""
    name = floor_name(model)
    return (planner or Planner(model, batch))({name: np.ones(train.param_shapes(model)[name][0], bool)})


def _layer(name: str) -> str:
    return name.split(".")[0]


def fit_budget(model: train.Model, importance: dict, budget: int, batch: int, mask: dict | None = None,
               planner: Planner | None = None) -> Fit:
    """The largest-importance subset of `mask` (default: importance > 0) whose step's planned memory at
    `batch` support images is at most `budget` bytes; a one-line UserError if no subset fits."""
    planner = planner or Planner(model, batch)
    names = list(train.param_shapes(model))
    keep = floor_name(model)
    imp = {n: np.asarray(importance[n], np.float64).reshape(-1) for n in names if n in importance}
    if mask is None:
        mask = {n: v > 0 for n, v in imp.items()}
    mask = {n: np.asarray(m, bool).copy() for n, m in mask.items() if np.asarray(m, bool).any()}
    if not mask:
        raise UserError("the mask selects nothing to update; nothing to fit into the memory budget")
    before = planner.calls
    current = planner(mask)
    dropped = []
    while current > budget:
        candidates = []
        for n in [n for n in names if n in mask]:
            sel = np.flatnonzero(mask[n])
            if n == keep:
                continue
            k = max(1, math.ceil(len(sel) / 4))
            order = sel[np.argsort(imp[n][sel], kind="stable")]
            m = {**mask, n: mask[n].copy()}
            m[n][order[:k]] = False
            candidates.append((f"{n} {k} channel{'s' if k > 1 else ''}", m, float(imp[n][order[:k]].sum())))
        lowest = min((names.index(n) for n in mask), default=None)
        layer = _layer(names[lowest])
        whole = [n for n in mask if _layer(n) == layer and n != keep]
        if whole:
            m = {n: v for n, v in mask.items() if n not in whole}
            candidates.append((f"{layer} (the lowest updated layer)", m,
                               float(sum(imp[n][mask[n]].sum() for n in whole))))
        best = None
        for what, m, lost in candidates:
            m = {n: v for n, v in m.items() if v.any()}
            if not m:
                continue
            saved = current - planner(m)
            if saved <= 0:
                continue
            score = saved / max(lost, 1e-12)
            if best is None or score > best[0]:
                best = (score, what, m)
        if best is None:
            floor = floor_bytes(model, batch, planner)
            raise UserError(f"a memory budget of {budget / MIB:.2f} MiB cannot be met: the smallest step "
                            f"({keep} only) plans {floor / MIB:.2f} MiB at {batch} support images; raise the budget")
        _, what, mask = best
        dropped.append(what)
        current = planner(mask)
    return Fit(mask, current, dropped, planner.calls - before)
