"""p-Meta's task-conditioned meta attention (numpy): per task, layer and channel scores in [0, 1] computed from
the support set's first-step gradients, scaling the inner loop's step sizes; a layer whose score is 0 is left
out of that task's compiled step (no weight gradients, no activations kept for it).

    att = TaskAttention.init(model)
    stats = att.features(grads, weights, union)     # union slices of the first step's gradients and weights
    scores = att.scores(stats)                      # {"layer": {l: s_l}, "channel": {name: a over the union}}
    rates = att.rates(static, union, scores)        # static[n][c] * s_layer(n) * a_n[c]; 0 outside the union
    mask = att.task_mask(union, scores)             # the union minus the layers scored 0

The union is the static method's learned selection (meta.py: channels whose learned step size, kept sparse by
the memory-weighted proximal L1 and an optional budget fit, is above 0): meta-training fixes which structures
any task may update, so every step a device may need is known in advance (one per subset of the union's
layers; Conv4 has 5 layers, so at most 31, compiled or cached by mask), and the attention only picks
and scales inside it. Per task, whole layers drop out of the step (what lowers memory: the lowest updated
layer sets how deep the backward pass goes and which inputs are kept); a channel scored 0 inside a kept layer
gets step size 0 (no update) but stays in the compiled step: dropping single channels per task would
need a compiled step per channel pattern (a new one for almost every task).

The networks (tiny, one per parameter tensor and one per layer, linear with a clipped output):
  channel c of parameter n:  a = T(1 + b_n[c] + v_n . f_n[c]),  f_n[c] = (relative log mean |g| of the
                             channel's slice within n, cosine of the slice's gradient and weight)
  layer l:                   s = T(1 + b_l + u_l . h_l),  h_l = (log(|g_l| / |w_l|) minus its mean over the
                             union's layers, cosine of the layer's gradient and weight)
  T(z) = min(z, 1) if z >= threshold else 0: a hard threshold, so scores are exactly 0 below it.
Features are clipped to [-3, 3]. The weights at the first step are the meta-learned initialisation, the same
for every task, so weight-only statistics would be constants: only features involving the task's gradient
make the attention differ between tasks.

The meta-gradient (`backward`) is first-order and analytic: given dL/d rate (meta.py: minus the sum over
inner steps of query gradient x support gradient per channel), the chain rule through
rate = static x s x a, with the features held constant (stop-gradient: their dependence on the backbone's
weights would be a second-order term) and T's derivative taken as 1 (straight-through, as a projected
gradient step: a structure scored 0 keeps a meta-gradient and can come back, as the static step sizes
clipped at 0 do).
"""

from __future__ import annotations

import numpy as np

from edgetvm import train
from edgetvm.adapt import step as st

CHANNEL_FEATURES = 2
LAYER_FEATURES = 2
_CLIP = 3.0
_EPS = 1e-12


def layer_of(name: str) -> str:
    return name.split(".")[0]


def _channel_view(a: np.ndarray) -> np.ndarray:
    """(channels, rest): a parameter (or its union slice) by the channels the mask selects along."""
    axis = st.mask_axis(a.shape)
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def _cos(g: np.ndarray, w: np.ndarray, axis=None) -> np.ndarray:
    num = (g * w).sum(axis=axis)
    den = np.sqrt((g * g).sum(axis=axis) * (w * w).sum(axis=axis))
    return np.where(den > _EPS, num / np.maximum(den, _EPS), 0.0)


def union_slices(arrays: dict, union: dict) -> dict:
    """{name: the union's channels of arrays[name]} (what the masked gradient step returns)."""
    out = {}
    for n, m in union.items():
        idx = np.flatnonzero(m)
        a = np.asarray(arrays[n])
        out[n] = a[:, idx] if st.mask_axis(a.shape) == 1 else a[idx]
    return out


class TaskAttention:
    """The attention networks' parameters `theta` ({key: array}, saved in the artifact) and their maths."""

    def __init__(self, theta: dict, threshold: float = 0.05):
        self.theta = theta
        self.threshold = float(threshold)

    @classmethod
    def init(cls, model: train.Model, threshold: float = 0.05) -> "TaskAttention":
        """Every score starts at 1 for every task (b = 0, v = 0): the static method's step sizes, which the
        meta-gradient then makes task-dependent."""
        theta = {}
        for n, s in train.param_shapes(model).items():
            theta[f"chan_b/{n}"] = np.zeros(st.mask_len(s), np.float32)
            theta[f"chan_v/{n}"] = np.zeros(CHANNEL_FEATURES, np.float32)
        for l in dict.fromkeys(layer_of(n) for n in train.param_shapes(model)):
            theta[f"layer_b/{l}"] = np.zeros(1, np.float32)
            theta[f"layer_u/{l}"] = np.zeros(LAYER_FEATURES, np.float32)
        return cls(theta, threshold)

    # ---- statistics of the first step ---------------------------------------------------------------
    @staticmethod
    def features(grads: dict, weights: dict, union: dict) -> dict:
        """Per-channel and per-layer features of one task from the union slices of its first-step gradients
        `grads` and of the weights (both {name: slice}, as union_slices gives)."""
        chan, per_layer = {}, {}
        for n in union:
            g, w = _channel_view(np.asarray(grads[n], np.float64)), _channel_view(np.asarray(weights[n], np.float64))
            mag = np.abs(g).mean(1)
            rel = np.log((mag + _EPS) / (mag.mean() + _EPS))
            chan[n] = np.clip(np.stack([rel, _cos(g, w, axis=1)], 1), -_CLIP, _CLIP)
            acc = per_layer.setdefault(layer_of(n), [0.0, 0.0, 0.0])
            acc[0] += float((g * g).sum())
            acc[1] += float((w * w).sum())
            acc[2] += float((g * w).sum())
        ratio = {l: np.log((np.sqrt(gg) + _EPS) / (np.sqrt(ww) + _EPS)) for l, (gg, ww, _) in per_layer.items()}
        mean = float(np.mean(list(ratio.values()))) if ratio else 0.0
        layer = {}
        for l, (gg, ww, gw) in per_layer.items():
            cos = gw / np.sqrt(gg * ww) if gg * ww > _EPS else 0.0
            layer[l] = np.clip(np.array([ratio[l] - mean, cos]), -_CLIP, _CLIP)
        return {"channel": chan, "layer": layer}

    # ---- scores, rates, the task's mask ---------------------------------------------------------------
    def _gate(self, z: np.ndarray) -> np.ndarray:
        return np.where(z >= self.threshold, np.minimum(z, 1.0), 0.0)

    def scores(self, feats: dict, union: dict) -> dict:
        """{"layer": {l: s}, "channel": {name: a over the union's channels}}, every score 0 or in
        [threshold, 1]."""
        t = self.theta
        zc = {n: 1.0 + t[f"chan_b/{n}"][np.flatnonzero(union[n])] + f @ t[f"chan_v/{n}"]
              for n, f in feats["channel"].items()}
        zl = {l: float(1.0 + t[f"layer_b/{l}"][0] + h @ t[f"layer_u/{l}"]) for l, h in feats["layer"].items()}
        return {"channel": {n: self._gate(z) for n, z in zc.items()},
                "layer": {l: float(self._gate(np.float64(z))) for l, z in zl.items()}}

    @staticmethod
    def _scored(scores: dict) -> list[str]:
        """The layers with a positive layer score and some positive channel score."""
        return [l for l, s in scores["layer"].items()
                if s > 0 and any(a.any() for n, a in scores["channel"].items() if layer_of(n) == l)]

    def task_layers(self, scores: dict) -> list[str]:
        """The union's layers this task updates: a positive layer score and some positive channel score.
        Never none: if no layer is scored, the top one of the union (the cheapest step) is kept, at its
        static step sizes."""
        return self._scored(scores) or [list(scores["layer"])[-1]]

    def task_mask(self, union: dict, scores: dict) -> dict:
        """The union restricted to `task_layers` (a layer's channels as the union has them)."""
        keep = set(self.task_layers(scores))
        return {n: np.asarray(m, bool).copy() for n, m in union.items() if layer_of(n) in keep}

    def rates(self, static: dict, union: dict, scores: dict) -> dict:
        """{name: a step size per channel}: static x layer score x channel score inside the union's
        channels of the task's layers, 0 elsewhere. A layer kept only by task_layers' fallback uses
        its static step sizes."""
        keep, scored = set(self.task_layers(scores)), set(self._scored(scores))
        out = {}
        for n, r in static.items():
            rate = np.zeros_like(np.asarray(r, np.float32))
            l = layer_of(n)
            if n in union and l in keep:
                idx = np.flatnonzero(union[n])
                rate[idx] = r[idx] * (scores["layer"][l] * scores["channel"][n] if l in scored else 1.0)
            out[n] = rate.astype(np.float32)
        return out

    # ---- the meta-gradient -------------------------------------------------------------------------------
    def backward(self, d_rate: dict, static: dict, union: dict, feats: dict, scores: dict) -> tuple[dict, dict]:
        """(d static, d theta) from d_rate = dL/d(this task's rates), first-order: features constant,
        the threshold's derivative taken as 1 (straight-through)."""
        d_static = {n: np.zeros_like(np.asarray(r, np.float32)) for n, r in static.items()}
        d_theta = {k: np.zeros_like(v) for k, v in self.theta.items()}
        d_layer = {}
        keep, scored = set(self.task_layers(scores)), set(self._scored(scores))
        for n, m in union.items():
            idx = np.flatnonzero(m)
            l = layer_of(n)
            s = scores["layer"][l]
            a = scores["channel"][n]
            dr, r = np.asarray(d_rate[n], np.float64)[idx], np.asarray(static[n], np.float64)[idx]
            if l in keep:     # the rates' own factors (a fallback layer runs at its static step sizes)
                d_static[n][idx] = (dr * (s * a if l in scored else 1.0)).astype(np.float32)
            dz = dr * r * s                                 # d L / d (channel pre-threshold), straight-through
            d_theta[f"chan_b/{n}"][idx] += dz.astype(np.float32)
            d_theta[f"chan_v/{n}"] += (feats["channel"][n].T @ dz).astype(np.float32)
            d_layer[l] = d_layer.get(l, 0.0) + float((dr * r * a).sum())
        for l, dz in d_layer.items():
            d_theta[f"layer_b/{l}"] += np.float32(dz)
            d_theta[f"layer_u/{l}"] += (dz * feats["layer"][l]).astype(np.float32)
        return d_static, d_theta

    # ---- saving -------------------------------------------------------------------------------------------
    def arrays(self) -> dict:
        return {f"attn/{k}": v for k, v in self.theta.items()}

    @classmethod
    def from_arrays(cls, arrays: dict, threshold: float) -> "TaskAttention | None":
        theta = {k[5:]: np.asarray(v, np.float32) for k, v in arrays.items() if k.startswith("attn/")}
        return cls(theta, threshold) if theta else None


def task_attention(att: TaskAttention, static: dict, union: dict, grads: dict, weights: dict) -> dict:
    """One task's attention from its first-step gradients (union slices): its features, scores, mask and
    rates, as the device computes them before its first update."""
    feats = att.features(grads, union_slices(weights, union), union)
    scores = att.scores(feats, union)
    return {"features": feats, "scores": scores, "mask": att.task_mask(union, scores),
            "rates": att.rates(static, union, scores)}
