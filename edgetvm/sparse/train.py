"""DRESS training: all subnets of one backbone trained together with a weighted loss; and the baseline of
independently pruned and retrained networks.

Joint step (per batch): for every subnet k, the backbone's weights under its nested row masks give a loss
L_k and its gradient (TVM-compiled, edgetvm/train.py's `Trainer.gradients`); the backbone moves along
sum_k c_k * dL_k/dW * M_k (the gradient of the weighted loss sum_k c_k L_k with respect to the shared
weights: a weight a subnet does not use gets none of its gradient). Momentum SGD on the sum, in numpy.
The rows are re-ranked by magnitude at the start of every epoch after the first, so the nesting follows
the weights as they train; the last epoch's ranking is the one the artifact stores (the subnets are
exactly what that epoch trained). The loop itself (`weighted_descent`) also trains the slimmable-width
baseline (sparse/slimmable.py), where a subnet is a narrower network instead of a mask, so that the two
differ only in what a subnet is.

Which weights are sparse: every conv and linear weight but the first layer's (it reads the raw pixels
and holds a tiny share of the weights and work; pruning it hurts most for least gain).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgetvm import data as data_mod
from edgetvm import train
from edgetvm.errors import UserError
from edgetvm.sparse import masks


def sparse_weights(model: train.Model) -> list[str]:
    names = [n for n in train.param_shapes(model) if n.endswith(".weight")]
    return names[1:]


def check_loss_weights(loss_weights, n_levels: int) -> np.ndarray:
    c = np.asarray(loss_weights if loss_weights is not None else [1.0] * n_levels, np.float64)
    if len(c) != n_levels or (c < 0).any() or c.sum() <= 0:
        raise UserError(f"loss weights {','.join(f'{v:g}' for v in c)}: give {n_levels} non-negative numbers, "
                        "one per sparsity level, not all 0")
    # normalised to sum 1: the shared weights take one step, not K (measured: unnormalised weights, a
    # K-fold step for the weights every subnet keeps, trained worse at every level)
    return c / c.sum()


def masked(params: dict, mks: dict, level: int) -> dict:
    return {n: (p * mks[n][level] if n in mks else p) for n, p in params.items()}


@dataclass
class Subnets:
    """A trained DRESS backbone: weights (zero outside the densest subnet), rankings, test accuracies."""
    levels: tuple
    params: dict
    orders: dict
    accuracy: list
    history: list = field(default_factory=list)

    def masks(self) -> dict:
        return {n: masks.masks(n, self.params[n], self.levels, o) for n, o in self.orders.items()}

    def subnet_params(self, level: int) -> dict:
        return masked(self.params, self.masks(), level)


def accuracies(trainer: train.Trainer, params: dict, mks: dict, levels, split) -> list[float]:
    out = []
    for k in range(len(levels)):
        trainer.set_params(masked(params, mks, k))
        out.append(train.evaluate(trainer, split)["accuracy"])
    return out


@dataclass
class View:
    """One subnet's view of the shared weights: the trainer that computes its loss and gradient, the
    parameters it takes from the shared weights, and its gradient carried back onto them (zero where the
    subnet reads nothing)."""
    trainer: train.Trainer
    take: Callable[[dict], dict]
    give: Callable[[dict], dict]


def weighted_descent(ds: data_mod.DataSet, w: dict, views_at: Callable[[int, dict], list], c: np.ndarray,
                     epochs: int, lr: float, momentum: float, batch: int, seed: int, progress: bool,
                     label: str = "joint") -> list[dict]:
    """Train the shared weights `w` (in place) along sum_k c_k * give_k(dL_k/dtheta_k), momentum SGD in numpy:
    the one loop behind DRESS's sparse subnets and the slimmable widths. `views_at(epoch, w)` gives the
    subnets' views for an epoch (DRESS re-ranks its rows there). Returns the per-epoch history."""
    vel = {n: np.zeros_like(p) for n, p in w.items()}
    history = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        views = views_at(epoch, w)
        losses = np.zeros(len(views))
        steps = 0
        for x, y in data_mod.batches(ds.train, batch, seed, epoch):
            total = {n: np.zeros_like(p) for n, p in w.items()}
            for k, v in enumerate(views):
                if c[k] == 0:
                    continue
                v.trainer.set_params(v.take(w))
                loss, g = v.trainer.gradients(x, y)
                losses[k] += loss
                for n, gn in v.give(g).items():
                    total[n] += c[k] * gn
            for n in w:
                vel[n] = momentum * vel[n] + total[n]
                w[n] -= lr * vel[n]
            steps += 1
        record = {"epoch": epoch + 1, "loss": (losses / max(steps, 1)).tolist(),
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        if progress:
            import sys
            print(f"{label} epoch {epoch + 1}/{epochs}  losses {' '.join(f'{v:.3f}' for v in record['loss'])}  "
                  f"{record['seconds']:.1f} s", file=sys.stderr)
    return history


def joint_train(model: train.Model, ds: data_mod.DataSet, levels, params: dict, epochs: int,
                loss_weights=None, lr: float = 0.01, momentum: float = 0.9, batch: int = 64, seed: int = 0,
                progress: bool = True) -> Subnets:
    """Train all subnets of `params` (a pretrained dense network) jointly; see the module docstring."""
    levels = masks.check_levels(levels)
    c = check_loss_weights(loss_weights, len(levels))
    names = sparse_weights(model)
    trainer = train.Trainer(model, batch, seed=seed)
    w = {n: np.array(p, np.float32) for n, p in params.items()}
    orders = {n: masks.ranking(n, w[n]) for n in names}

    def views_at(epoch, w):
        nonlocal orders
        if epoch > 0:
            orders = {n: masks.ranking(n, w[n]) for n in names}
        mks = {n: masks.masks(n, w[n], levels, orders[n]) for n in names}
        return [View(trainer, lambda w, k=k: masked(w, mks, k),
                     lambda g, k=k: {n: (g[n] * mks[n][k] if n in mks else g[n]) for n in g})
                for k in range(len(levels))]

    history = weighted_descent(ds, w, views_at, c, epochs, lr, momentum, batch, seed, progress)
    # the subnets are the masks the last epoch trained (re-ranking now would hand the sparse subnets
    # weights they were not trained with)
    mks = {n: masks.masks(n, w[n], levels, orders[n]) for n in names}
    w = masked(w, mks, 0)   # what the densest subnet does not keep is not stored
    acc = accuracies(trainer, w, mks, levels, ds.test)
    return Subnets(levels, w, orders, acc, history)


def pruned_retrained(model: train.Model, ds: data_mod.DataSet, sparsity: float, params: dict, epochs: int,
                     lr: float = 0.01, batch: int = 64, seed: int = 0, progress: bool = True) -> tuple[dict, float]:
    """The baseline: the dense network pruned once to `sparsity` with the same row-balanced masks (by
    magnitude), then retrained alone with the mask held (re-applied after every step). Returns
    (parameters, test accuracy)."""
    names = sparse_weights(model)
    mks = {n: masks.masks(n, params[n], (sparsity,)) for n in names}
    trainer = train.Trainer(model, batch, lr=lr, seed=seed)
    trainer.set_params(masked(params, mks, 0))

    def hold(t):
        t.set_params({n: p * mks[n][0] for n, p in t.params.items() if n in mks})

    if epochs > 0:
        train.fit(trainer, ds, epochs, lr=lr, after_step=hold, progress=progress)
    return trainer.params, train.evaluate(trainer, ds.test)["accuracy"]
