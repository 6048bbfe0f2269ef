"""The baselines ALQ is measured against, trained the way such networks usually are: full-precision
shadow weights, the forward pass on their quantised form, and the gradient applied to the shadow weights
as if quantisation were the identity (the straight-through estimator).

  bwn       BWN (Rastegari et al., XNOR-Net, 2016): w ~ alpha * sign(w), alpha = mean |w| of the group;
            one basis per group, 1 bit per weight.
  uniform2  symmetric uniform 2-bit: levels s * {-1.5, -0.5, 0.5, 1.5} per group, s by least squared
            error over a grid; the same as two bases with alphas s/2 and s.

Both use the groups of multibit.py, so they compile into the same bit-packed kernels as ALQ.
"""

from __future__ import annotations

import numpy as np

from edgetvm.quant.alq import AMSGrad
from edgetvm.quant.multibit import MultiBit, from_levels, grouped, rows_of, valid_mask

KINDS = ("bwn", "uniform2")


def quantise(kind: str, name: str, w: np.ndarray, group: int) -> MultiBit:
    rows = grouped(rows_of(name, w), group)                   # (R, G, n)
    valid = valid_mask(rows_of(name, w).shape[1], group)      # (G, n)
    count = valid.sum(axis=1)[None, :]
    sign = np.where(rows >= 0, 1, -1).astype(np.int8)
    if kind == "bwn":
        alpha = (np.abs(rows) * valid).sum(axis=2) / count
        return from_levels(name, w, group, alpha[..., None], sign[:, :, None, :])
    if kind == "uniform2":
        top = np.abs(rows).max(axis=2) / 1.5 + 1e-12          # s at which the largest weight is a level
        best_err, best = None, None
        for f in np.linspace(0.3, 1.0, 15):
            s = (top * f)[..., None]
            q = s * np.clip(np.floor(rows / s) + 0.5, -1.5, 1.5)
            err = (((q - rows) * valid) ** 2).sum(axis=2)
            if best is None:
                best_err, best = err, np.broadcast_to(s, rows.shape).copy()
            else:
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best = np.where(better[..., None], s, best)
        s = best[..., 0]
        q = best * np.clip(np.floor(rows / best) + 0.5, -1.5, 1.5)
        hi = np.where(q >= 0, 1, -1).astype(np.int8)                       # the s basis
        lo = np.where(q - s[..., None] * hi >= 0, 1, -1).astype(np.int8)   # the s/2 basis
        return from_levels(name, w, group, np.stack([s / 2, s], axis=2), np.stack([lo, hi], axis=2))
    raise ValueError(f"unknown baseline {kind!r}; one of {', '.join(KINDS)}")


def train_ste(kind: str, model, params: dict[str, np.ndarray], ds, epochs: int, group: int = 64,
              lr: float = 1e-3, batch: int = 64, seed: int = 0, progress: bool = True):
    """Straight-through training of baseline `kind` from float `params`; returns (multibit layers, biases)."""
    from edgetvm import data as data_mod, train

    shadow = {n: np.asarray(p, np.float32).copy() for n, p in params.items()}
    quant = [n for n, p in shadow.items() if n.endswith(".weight") and p.ndim in (2, 4)]
    states = {n: AMSGrad.like(p) for n, p in shadow.items()}
    trainer = train.Trainer(model, batch, seed=seed)
    show = train._Progress(progress)

    def forward_params():
        return {n: (quantise(kind, n, p, group).weight() if n in quant else p) for n, p in shadow.items()}

    steps = data_mod.steps_per_epoch(ds.train, batch)
    for epoch in range(epochs):
        step_lr = lr * 0.9 ** epoch
        total = 0.0
        for i, (x, y) in enumerate(data_mod.batches(ds.train, batch, seed, 20_000 + epoch)):
            trainer.set_params(forward_params())
            loss, grads = trainer.gradients(x, y)
            total += loss
            for n in shadow:
                pg, ph = states[n].update(grads[n], step_lr)
                shadow[n] = (shadow[n] - pg / ph).astype(np.float32)
            show.update(f"{kind} epoch {epoch + 1}/{epochs}  step {i + 1}/{steps}  loss {total / (i + 1):.4f}")
        trainer.set_params(forward_params())
        val = train.evaluate(trainer, ds.val)
        show.done(f"{kind} epoch {epoch + 1}/{epochs}  loss {total / steps:.4f}  val acc {100 * val['accuracy']:.2f}%")
    layers = {n: quantise(kind, n, shadow[n], group) for n in quant}
    biases = {n: p for n, p in shadow.items() if n not in quant}
    return layers, biases
