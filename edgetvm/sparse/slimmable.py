"""The slimmable-width baseline for DRESS: one set of weights, K widths, each the first channels of every
hidden layer, trained jointly with DRESS's weighted loss; each width sized to the MACs of a DRESS subnet.

Width k of a network keeps the first c_k output channels (units) of every hidden conv and linear layer;
the input and the output layer stay full. A parameter of the narrow network is then the prefix of the
full one along every axis (a conv weight (O, I, kh, kw) -> [:O_k, :I_k]; the linear layer after the
flatten (C*H*W, U) -> [:C_k*H*W, :U_k], a prefix because NCHW flattens channel-major), so one store holds
every width and a narrower width's weights are a prefix of a wider one's (nested, as DRESS's masks are).

Joint training is DRESS's loop (edgetvm/sparse/train.py `weighted_descent`): per batch every width's loss
and gradient from its own TVM-compiled step (a Trainer for the narrow network), the gradient padded back
onto the full weights with zeros, the shared weights moved along the weighted sum. No switchable batch
norm: the project's networks have none.

Sizing: MACs at batch 1 (the multiply-adds of conv and linear layers; DRESS subnet k does n_k of every
row's K multiply-adds at every output position, its first layer dense). Width k is chosen so that its MACs
are closest to DRESS subnet k's among networks whose hidden layers each keep floor or ceil of the same
fraction f of their channels (f on a grid of 1/1000), never wider than the previous width in any layer
(so the widths stay nested). One uniform fraction is what slimmable networks use; the floor/ceil choice
per layer is what lets integer channel counts get close to a MAC target (LeNet5's conv1 alone moves in
5% steps).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np

from edgetvm import data as data_mod
from edgetvm import train
from edgetvm.sparse import masks
from edgetvm.sparse import train as st


def weight_work(model: train.Model) -> dict[str, tuple[int, int, int]]:
    """Per conv and linear weight: (rows, entries per row, output positions) at batch 1; its MACs are
    the product."""
    out = {}
    c, h, w = model.input_shape
    flat = None
    n_conv = n_fc = 0
    for layer in model.layers:
        if isinstance(layer, train.Conv):
            n_conv += 1
            h, w = h + 2 * layer.pad - layer.kernel + 1, w + 2 * layer.pad - layer.kernel + 1
            out[f"conv{n_conv}.weight"] = (layer.out, c * layer.kernel * layer.kernel, h * w)
            c = layer.out
        elif isinstance(layer, train.MaxPool):
            h, w = h // layer.size, w // layer.size
        elif isinstance(layer, train.Flatten):
            flat = c * h * w
        elif isinstance(layer, train.Linear):
            n_fc += 1
            out[f"fc{n_fc}.weight"] = (layer.out, flat, 1)
            flat = layer.out
    return out


def macs(model: train.Model) -> int:
    return sum(r * k * p for r, k, p in weight_work(model).values())


def dress_macs(model: train.Model, levels) -> list[int]:
    """MACs of each DRESS subnet: every sparse weight's rows do n_k (masks.keep_counts) of their entries."""
    sparse = set(st.sparse_weights(model))
    work = weight_work(model)
    out = []
    for i in range(len(levels)):
        out.append(sum(r * (int(masks.keep_counts(k, levels)[i]) if n in sparse else k) * p
                       for n, (r, k, p) in work.items()))
    return out


def hidden_layers(model: train.Model) -> list[int]:
    """Indices in model.layers of the layers a width narrows: every conv and linear layer but the last."""
    idx = [i for i, layer in enumerate(model.layers) if isinstance(layer, (train.Conv, train.Linear))]
    return idx[:-1]


def full_width(model: train.Model) -> tuple[int, ...]:
    return tuple(model.layers[i].out for i in hidden_layers(model))


def narrow(model: train.Model, width) -> train.Model:
    """The network with hidden layers of `width` channels/units (one count per hidden layer)."""
    layers = list(model.layers)
    idx = hidden_layers(model)
    if len(width) != len(idx):
        raise ValueError(f"{model.name} has {len(idx)} hidden layers, width {tuple(width)} gives {len(width)}")
    for i, c in zip(idx, width):
        if not 1 <= c <= layers[i].out:
            raise ValueError(f"width {tuple(width)}: layer {i} has {layers[i].out} channels")
        layers[i] = replace(layers[i], out=int(c))
    return replace(model, layers=tuple(layers))


def take(params: dict, model: train.Model) -> dict:
    """The narrow network's parameters: the prefix of every full parameter along every axis."""
    return {n: params[n][tuple(slice(0, d) for d in s)] for n, s in train.param_shapes(model).items()}


def give(grads: dict, full: dict) -> dict:
    """A narrow network's gradient as full-shape arrays, zero where the width reads nothing."""
    out = {}
    for n, g in grads.items():
        z = np.zeros(full[n].shape, np.float32)
        z[tuple(slice(0, d) for d in g.shape)] = g
        out[n] = z
    return out


def match_widths(model: train.Model, targets) -> list[tuple[int, ...]]:
    """Per target MAC count (descending), the nested width closest to it (see the module docstring)."""
    full = full_width(model)
    cache: dict[tuple, int] = {}

    def cost(width):
        if width not in cache:
            cache[width] = macs(narrow(model, width))
        return cache[width]

    out, prev = [], full
    for t in targets:
        best = None
        for f in np.arange(1, 1001) / 1000:
            options = [sorted({min(p, max(1, int(np.floor(f * c)))), min(p, max(1, int(np.ceil(f * c))))})
                       for c, p in zip(full, prev)]
            for width in itertools.product(*options):
                d = abs(cost(width) - t)
                if best is None or d < best[0]:
                    best = (d, width)
        out.append(best[1])
        prev = best[1]
    return out


@dataclass
class Widths:
    """A trained slimmable network: full weights, the widths, per width its MACs and test accuracy."""
    widths: list
    params: dict
    macs: list
    accuracy: list
    history: list = field(default_factory=list)

    def model(self, base: train.Model, k: int) -> train.Model:
        return narrow(base, self.widths[k])

    def width_params(self, base: train.Model, k: int) -> dict:
        return take(self.params, self.model(base, k))


def joint_train(model: train.Model, ds: data_mod.DataSet, widths, params: dict, epochs: int,
                loss_weights=None, lr: float = 0.01, momentum: float = 0.9, batch: int = 64, seed: int = 0,
                progress: bool = True) -> Widths:
    """Train the widths of `params` (the full network, e.g. pretrained dense) jointly; the module docstring."""
    widths = [tuple(int(c) for c in wd) for wd in widths]
    for a, b in zip(widths, widths[1:]):
        if any(y > x for x, y in zip(a, b)):
            raise ValueError(f"widths {a} then {b} are not nested: list them widest first")
    c = st.check_loss_weights(loss_weights, len(widths))
    models = [narrow(model, wd) for wd in widths]
    trainers = [train.Trainer(m, batch, seed=seed) for m in models]
    w = {n: np.array(p, np.float32) for n, p in params.items()}
    views = [st.View(t, lambda w, m=m: take(w, m), lambda g: give(g, w)) for t, m in zip(trainers, models)]
    history = st.weighted_descent(ds, w, lambda epoch, w: views, c, epochs, lr, momentum, batch, seed, progress,
                                  label="slimmable")
    acc = []
    for t, m in zip(trainers, models):
        t.set_params(take(w, m))
        acc.append(train.evaluate(t, ds.test)["accuracy"])
    return Widths(widths, w, [macs(m) for m in models], acc, history)
