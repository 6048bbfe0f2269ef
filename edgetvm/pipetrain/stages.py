"""A model's training step as consecutive compiled stages (passes/train_stages.py), and one stage's state.

    plan = StagePlan(model, bounds=(0, 6, 13, len(model.layers)), micro_batch=16)
    ex = plan.executable()                    # one library with every stage's forward, backward, optimizer
    stage = Stage(ex, plan, s, weights, optimizer_state)   # here, or inside a device's RPC session

A stage keeps its weights, optimizer state, the input activation of every micro-batch in flight (its
backward recomputes the forward from it) and the gradients accumulated over the step's micro-batches;
`step()` applies its optimizer to them. Every call's compute time is added to `busy_s`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from edgetvm import train
from edgetvm.errors import UserError

# Relax bindings train.backbone emits per layer (a conv: conv2d, bias reshape, add; a linear: matmul, add).
BINDINGS = {train.Conv: 3, train.ReLU: 1, train.MaxPool: 1, train.Flatten: 1, train.Linear: 2}


def alexnet(n_classes: int = 10, input_shape=(1, 28, 28), width: float = 1.0) -> train.Model:
    """AlexNet's shape for 28x28 images: five convs (the first 5x5, then 3x3), three max-pools, three linear
    layers (no dropout, no LRN; stride 1 so convs run as im2col + matmul). `width` scales the channels."""
    c = [max(4, int(round(k * width))) for k in (32, 64, 96, 96, 64)]
    h = max(8, int(round(256 * width)))
    T = train
    return T.Model("alexnet", tuple(input_shape), (
        T.Conv(c[0], 5, 2), T.ReLU(), T.MaxPool(2),
        T.Conv(c[1], 3, 1), T.ReLU(), T.MaxPool(2),
        T.Conv(c[2], 3, 1), T.ReLU(), T.Conv(c[3], 3, 1), T.ReLU(), T.Conv(c[4], 3, 1), T.ReLU(), T.MaxPool(2),
        T.Flatten(), T.Linear(h), T.ReLU(), T.Linear(h), T.ReLU(), T.Linear(n_classes)))


MODELS = {"alexnet": alexnet, "lenet5": train.lenet5, "vgg_small": train.vgg_small, "mlp": train.mlp}


def load_model(name: str) -> train.Model:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; use one of {', '.join(MODELS)}")
    return MODELS[name]()


def layer_names(model: train.Model) -> list[str]:
    return [type(layer).__name__.lower() for layer in model.layers]


def activation_shapes(model: train.Model, micro_batch: int) -> list[tuple[int, ...]]:
    """The activation after each layer (index i: the output of layer i), for one micro-batch."""
    c, h, w = model.input_shape
    flat, out = None, []
    for layer in model.layers:
        if isinstance(layer, train.Conv):
            c, h, w = layer.out, h + 2 * layer.pad - layer.kernel + 1, w + 2 * layer.pad - layer.kernel + 1
        elif isinstance(layer, train.MaxPool):
            h, w = h // layer.size, w // layer.size
        elif isinstance(layer, train.Flatten):
            flat = c * h * w
        elif isinstance(layer, train.Linear):
            flat = layer.out
        out.append((micro_batch, flat) if flat is not None else (micro_batch, c, h, w))
    return out


def check_bounds(model: train.Model, bounds) -> tuple[int, ...]:
    bounds = tuple(int(b) for b in bounds)
    n = len(model.layers)
    stages = len(bounds) - 1
    if stages > n:
        raise UserError(f"{stages} partitions but {model.name} has only {n} layers; use at most {n} partitions")
    if stages < 1 or bounds[0] != 0 or bounds[-1] != n or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise UserError(f"stage bounds {list(bounds)} must rise strictly from 0 to {n} (the layer count)")
    return bounds


def even_bounds(model: train.Model, stages: int) -> tuple[int, ...]:
    n = len(model.layers)
    if stages > n:
        raise UserError(f"{stages} partitions but {model.name} has only {n} layers; use at most {n} partitions")
    return tuple(round(i * n / stages) for i in range(stages + 1))


@dataclass(frozen=True)
class StagePlan:
    model: train.Model
    bounds: tuple            # layer indices: stage s has layers bounds[s]..bounds[s+1]-1
    micro_batch: int
    optimizer: train.OptimizerConfig = train.OptimizerConfig()

    def __post_init__(self):
        object.__setattr__(self, "bounds", check_bounds(self.model, self.bounds))

    @property
    def n_stages(self) -> int:
        return len(self.bounds) - 1

    def cuts(self) -> list[int]:
        per = [BINDINGS[type(layer)] for layer in self.model.layers]
        return [sum(per[:b]) for b in self.bounds[1:-1]]

    def stage_weights(self) -> list[list[str]]:
        names = list(train.param_shapes(self.model))
        out, n_conv, n_fc = [[] for _ in range(self.n_stages)], 0, 0
        for i, layer in enumerate(self.model.layers):
            s = max(k for k in range(self.n_stages) if self.bounds[k] <= i)
            if isinstance(layer, train.Conv):
                n_conv += 1
                out[s] += [f"conv{n_conv}.weight", f"conv{n_conv}.bias"]
            elif isinstance(layer, train.Linear):
                n_fc += 1
                out[s] += [f"fc{n_fc}.weight", f"fc{n_fc}.bias"]
        assert sorted(sum(out, [])) == sorted(names)
        return out

    def boundary_shapes(self) -> list[tuple[int, ...]]:
        """The activation sent from stage s to s+1 (and its gradient back), for s < n_stages - 1."""
        acts = activation_shapes(self.model, self.micro_batch)
        return [acts[b - 1] for b in self.bounds[1:-1]]

    def module(self) -> tvm.IRModule:
        from edgetvm.passes.conv_im2col import conv_as_matmul
        from edgetvm.passes.train_stages import train_stages

        mod = tvm.IRModule({"backbone": train.backbone(self.model, self.micro_batch)})
        return conv_as_matmul(train_stages(mod, self.cuts(), optimizer=self.optimizer.make()))

    def executable(self):
        """The compiled stages (cached per plan, as train.Trainer's steps are)."""
        return train._build(("pipetrain", self), self.module)

    def initial_state(self, s: int) -> list[np.ndarray]:
        shapes = train.param_shapes(self.model)
        names = self.stage_weights()[s]
        if not names:
            return []
        opt = self.optimizer.make().init([relax.Var(n, relax.TensorType(shapes[n], "float32")) for n in names])
        return [t.numpy() for t in opt.state]


def _tensor(a, dev):
    from edgetvm.runtime.tensors import native

    if isinstance(a, tvm.runtime.Tensor):
        return a
    a = np.asarray(a)
    return tvm.runtime.tensor(native(a if a.flags.c_contiguous else a.copy()), dev)


class Stage:
    """Stage `s` of a plan with its weights and optimizer state, on this process's CPU."""

    def __init__(self, ex, n_stages: int, s: int, weights: list[np.ndarray], state: list[np.ndarray]):
        self.dev = tvm.cpu()
        self.vm = relax.VirtualMachine(ex, self.dev)
        self.s, self.last = s, s == n_stages - 1
        self._fwd = self.vm[f"stage{s}_forward"]
        self._bwd = self.vm[f"stage{s}_backward"]
        self._opt = self.vm[f"stage{s}_optimizer"] if weights else None
        self.weights = [_tensor(w, self.dev) for w in weights]
        self.state = [_tensor(a, self.dev) for a in state]
        self.stash: dict[int, object] = {}
        self.grads: list[np.ndarray] | None = None
        self.losses: dict[int, float] = {}
        self.busy_s = 0.0      # wall seconds computing (on a device under a CPU quota: throttling included)
        self.cpu_s = 0.0       # CPU seconds of this process while computing
        self.peak_stash = 0

    # Arguments are numpy arrays or TVM tensors (a device's session passes what it received as is);
    # raw=True returns TVM tensors, not numpy copies.

    def forward(self, mb: int, a, keep: bool = True, raw: bool = False):
        t0, c0 = time.perf_counter(), time.process_time()
        x = _tensor(a, self.dev)
        y = self._fwd(x, *self.weights)
        y = y if raw else y.numpy()
        if keep:
            self.stash[mb] = x
            self.peak_stash = max(self.peak_stash, len(self.stash))
        self._count(t0, c0)
        return y

    def _count(self, t0: float, c0: float) -> None:
        self.busy_s += time.perf_counter() - t0
        self.cpu_s += time.process_time() - c0

    def _accumulate(self, gw) -> None:
        gw = [g.numpy() for g in gw]
        self.grads = gw if self.grads is None else [a + b for a, b in zip(self.grads, gw)]

    def backward(self, mb: int, g, raw: bool = False):
        """Gradient of this stage's output for micro-batch mb -> gradient of its input (None on stage 0)."""
        t0, c0 = time.perf_counter(), time.process_time()
        x = self.stash.pop(mb)
        _, grads = self._bwd(x, *self.weights, _tensor(g, self.dev))
        grads = list(grads)
        ga = grads.pop(0) if self.s > 0 else None
        self._accumulate(grads)
        self._count(t0, c0)
        return ga if raw or ga is None else ga.numpy()

    def backward_last(self, mb: int, labels, gl: float, raw: bool = False):
        t0, c0 = time.perf_counter(), time.process_time()
        x = self.stash.pop(mb)
        labels = labels if isinstance(labels, tvm.runtime.Tensor) else np.asarray(labels, np.int64)
        (_, loss), grads = self._bwd(x, *self.weights, _tensor(labels, self.dev),
                                     _tensor(np.array(gl, np.float32), self.dev))
        grads = list(grads)
        ga = grads.pop(0) if self.s > 0 else None
        self._accumulate(grads)
        self.losses[mb] = float(loss.numpy())
        self._count(t0, c0)
        return ga if raw or ga is None else ga.numpy()

    def step(self) -> None:
        """The optimizer on the accumulated gradients; the accumulators start again from zero."""
        t0, c0 = time.perf_counter(), time.process_time()
        if self._opt is not None:
            if self.grads is None:
                raise RuntimeError(f"stage {self.s}: step without gradients")
            new_w, new_s = self._opt(self.weights, [_tensor(g, self.dev) for g in self.grads], self.state)
            self.weights, self.state = list(new_w), list(new_s)
        self.grads = None
        self.stash.clear()
        self._count(t0, c0)

    def take_losses(self) -> dict[int, float]:
        out, self.losses = self.losses, {}
        return out

    def get_grads(self) -> list[np.ndarray]:
        return list(self.grads or [])

    def set_grads(self, grads: list[np.ndarray]) -> None:
        self.grads = [np.asarray(g, np.float32) for g in grads] if grads else None

    def stats(self, refresh: bool = True) -> dict:
        return {"busy_s": self.busy_s, "cpu_s": self.cpu_s, "peak_stash": self.peak_stash}

    def params(self) -> list[np.ndarray]:
        return [w.numpy() for w in self.weights]

    def optimizer_state(self) -> list[np.ndarray]:
        return [a.numpy() for a in self.state]
