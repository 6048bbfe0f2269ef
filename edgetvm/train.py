"""The project's one training loop: models as layer lists, steps compiled by TVM, fit / evaluate / checkpoints.

    model = train.lenet5()
    ds = data.load("mnist")
    trainer = train.fit(model, ds, epochs=5, batch=64, lr=0.01, checkpoint="lenet5.npz")
    print(train.evaluate(trainer, ds.test))          # {"loss": ..., "accuracy": ...}

A step is TVM's: tvm.relax.training.SetupTrainer appends the cross-entropy loss to the model's Relax
function, relax.transform.Gradient differentiates it, and a relax.training optimizer (SGD, momentum SGD or
Adam) updates the parameters. The gradient part and the optimizer are compiled as two modules, so that a
new learning rate recompiles only the (small, elementwise) optimizer. Convolutions and their gradients
are rewritten as im2col + matmul first (passes/conv_im2col.py), which made a small VGG's step 5.7x faster.

Parameters live on the device between steps; `Trainer.params` / `set_params` move them as numpy arrays
by name ("conv1.weight", "fc2.bias", ...), so other features can read and change them between steps
(quantise, mask, patch). Linear weights are (in, out): the step computes x @ W without a transpose.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import tvm
from tvm import relax

from edgetvm import data as data_mod
from edgetvm.errors import UserError
from edgetvm.runtime.tensors import native, to_tvm

# ---- models -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv:
    out: int
    kernel: int = 3
    pad: int = 0


@dataclass(frozen=True)
class Linear:
    out: int


@dataclass(frozen=True)
class ReLU:
    pass


@dataclass(frozen=True)
class MaxPool:
    size: int = 2


@dataclass(frozen=True)
class Flatten:
    pass


@dataclass(frozen=True)
class Model:
    name: str
    input_shape: tuple[int, int, int]   # (C, H, W) of one image
    layers: tuple

    @property
    def n_classes(self) -> int:
        return [layer for layer in self.layers if isinstance(layer, Linear)][-1].out


def lenet5(n_classes: int = 10, input_shape=(1, 28, 28), channels=(20, 50), hidden: int = 500) -> Model:
    """LeNet5 as compression papers use it (Caffe's 20-50-500, 431K parameters on 28x28; ALQ's too)."""
    c1, c2 = channels
    return Model("lenet5", tuple(input_shape), (
        Conv(c1, 5), ReLU(), MaxPool(2), Conv(c2, 5), ReLU(), MaxPool(2), Flatten(),
        Linear(hidden), ReLU(), Linear(n_classes)))


def vgg_small(n_classes: int = 10, input_shape=(1, 28, 28), channels=(32, 64), hidden: int = 256) -> Model:
    """A small VGG: two blocks of two 3x3 convs and a 2x2 pool, then two linear layers."""
    layers = []
    for c in channels:
        layers += [Conv(c, 3, 1), ReLU(), Conv(c, 3, 1), ReLU(), MaxPool(2)]
    layers += [Flatten(), Linear(hidden), ReLU(), Linear(n_classes)]
    return Model("vgg_small", tuple(input_shape), tuple(layers))


def mlp(n_classes: int = 10, input_shape=(1, 28, 28), hidden=(300, 100)) -> Model:
    """A multilayer perceptron (LeNet-300-100 by default: 266K parameters on 28x28), as DPU's MNIST runs use."""
    layers = [Flatten()]
    for h in hidden:
        layers += [Linear(h), ReLU()]
    return Model("mlp", tuple(input_shape), tuple(layers + [Linear(n_classes)]))


def conv4(n_classes: int = 5, input_shape=(1, 28, 28), channels: int = 32) -> Model:
    """Conv4, the few-shot backbone (MAML, ANIL, p-Meta): four blocks of a 3x3 conv (padding 1), ReLU and a
    2x2 max pool, then one linear layer; no batch norm (28x28 -> 1x1 x `channels`)."""
    layers = []
    for _ in range(4):
        layers += [Conv(channels, 3, 1), ReLU(), MaxPool(2)]
    return Model("conv4", tuple(input_shape), tuple(layers + [Flatten(), Linear(n_classes)]))


def param_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape, in the order the compiled step takes them."""
    shapes: dict[str, tuple[int, ...]] = {}
    c, h, w = model.input_shape
    flat = None
    n_conv = n_fc = 0
    for layer in model.layers:
        if isinstance(layer, Conv):
            n_conv += 1
            shapes[f"conv{n_conv}.weight"] = (layer.out, c, layer.kernel, layer.kernel)
            shapes[f"conv{n_conv}.bias"] = (layer.out,)
            c, h, w = layer.out, h + 2 * layer.pad - layer.kernel + 1, w + 2 * layer.pad - layer.kernel + 1
        elif isinstance(layer, MaxPool):
            h, w = h // layer.size, w // layer.size
        elif isinstance(layer, Flatten):
            flat = c * h * w
        elif isinstance(layer, Linear):
            if flat is None:
                raise ValueError(f"{model.name}: a Linear layer needs a Flatten before it")
            n_fc += 1
            shapes[f"fc{n_fc}.weight"] = (flat, layer.out)
            shapes[f"fc{n_fc}.bias"] = (layer.out,)
            flat = layer.out
        if min(h, w) < 1:
            raise ValueError(f"{model.name}: the image shrinks to nothing at {layer}")
    return shapes


def init_params(model: Model, seed: int = 0) -> dict[str, np.ndarray]:
    """He-uniform weights (the layers feed ReLUs), zero biases."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(model).items():
        if name.endswith(".bias"):
            out[name] = np.zeros(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if name.startswith("conv") else shape[0]
            bound = math.sqrt(6.0 / fan_in)
            out[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
    return out


def backbone(model: Model, batch: int) -> relax.Function:
    """The model as a Relax function (x, *parameters) -> logits, for a fixed batch."""
    op = relax.op
    shapes = param_shapes(model)
    x = relax.Var("x", relax.TensorType((batch, *model.input_shape), "float32"))
    params = {n: relax.Var(n, relax.TensorType(s, "float32")) for n, s in shapes.items()}
    bb = relax.BlockBuilder()
    n_conv = n_fc = 0
    with bb.function("backbone", [x, *params.values()]):
        with bb.dataflow():
            h = x
            for layer in model.layers:
                if isinstance(layer, Conv):
                    n_conv += 1
                    w, b = params[f"conv{n_conv}.weight"], params[f"conv{n_conv}.bias"]
                    h = bb.emit(op.nn.conv2d(h, w, padding=layer.pad))
                    h = bb.emit(op.add(h, op.reshape(b, (1, layer.out, 1, 1))))
                elif isinstance(layer, ReLU):
                    h = bb.emit(op.nn.relu(h))
                elif isinstance(layer, MaxPool):
                    h = bb.emit(op.nn.max_pool2d(h, layer.size, layer.size))
                elif isinstance(layer, Flatten):
                    h = bb.emit(op.reshape(h, (batch, -1)))
                elif isinstance(layer, Linear):
                    n_fc += 1
                    h = bb.emit(op.add(op.matmul(h, params[f"fc{n_fc}.weight"]), params[f"fc{n_fc}.bias"]))
                else:
                    raise ValueError(f"unknown layer {layer!r}")
            out = bb.emit_output(h)
        bb.emit_func_output(out)
    return bb.get()["backbone"]


# ---- compiled steps ---------------------------------------------------------------------------------


def make_optimizer(kind: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    from tvm.relax.training import optimizer as opt

    if kind == "sgd":
        return opt.SGD(lr, weight_decay=weight_decay)
    if kind == "momentum":
        return opt.MomentumSGD(lr, momentum, weight_decay=weight_decay)
    if kind == "adam":
        return opt.Adam(lr, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {kind!r}; use sgd, momentum or adam")


def trainer_module(function: relax.Function, n_params: int, batch: int, n_classes: int, optimizer,
                   legalize: bool = True) -> tvm.IRModule:
    """SetupTrainer around `function` (inputs, then its last `n_params` parameters, -> logits): the
    module with backbone, backbone_loss, backbone_loss_adjoint (mean cross-entropy and its gradient with
    respect to the parameters) and optimizer; the optimizer's initial state is its `optim_state` attr."""
    from tvm.relax.training import SetupTrainer
    from tvm.relax.training.loss import CrossEntropyLoss

    f = function.with_attr("global_symbol", "backbone")
    mod = tvm.IRModule({"backbone": f}).with_attr("param_num", n_params).with_attr("state_num", 0)
    setup = SetupTrainer(CrossEntropyLoss(reduction="mean"), optimizer,
                         [relax.TensorType((batch, n_classes), "float32"), relax.TensorType((batch,), "int64")],
                         legalize=legalize)
    return setup(mod)


def host_target() -> tvm.target.Target:
    from edgetvm.targets import load_board

    return load_board("host").target()


# Compiled executables by what determines them: tests and sweeps build the same step many times.
_EXECUTABLES: dict = {}


def _build(key, make_module: Callable[[], tvm.IRModule]):
    if key not in _EXECUTABLES:
        from edgetvm.passes import pipeline

        _EXECUTABLES[key] = pipeline.build(make_module(), host_target())
    return _EXECUTABLES[key]


@dataclass(frozen=True)
class OptimizerConfig:
    kind: str = "momentum"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0

    def make(self):
        return make_optimizer(self.kind, self.lr, self.momentum, self.weight_decay)


class Trainer:
    """One model's compiled step, forward pass and optimizer, with its parameters on the device."""

    def __init__(self, model: Model, batch: int = 64, optimizer: str | OptimizerConfig = "momentum",
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                 conv_as_matmul: bool = True):
        self.model, self.batch, self.seed = model, int(batch), seed
        self.conv_as_matmul = conv_as_matmul
        self.shapes = param_shapes(model)
        self.names = list(self.shapes)
        self.dev = tvm.cpu()
        step = _build(("step", model, self.batch, conv_as_matmul), self._step_module)
        self.vm = relax.VirtualMachine(step, self.dev)
        self._adjoint = self.vm["backbone_loss_adjoint"]
        self._forward = self.vm["backbone"]
        self._params = [tvm.runtime.tensor(a, self.dev) for a in init_params(model, seed).values()]
        cfg = optimizer if isinstance(optimizer, OptimizerConfig) else \
            OptimizerConfig(optimizer, float(lr), float(momentum), float(weight_decay))
        self.optimizer_config = cfg
        self._load_optimizer(cfg)
        self.optimizer_state = [s.numpy() for s in self._initial_state(cfg)]

    # The step's module does not depend on the optimizer: SetupTrainer needs one, any will do.
    def _step_module(self) -> tvm.IRModule:
        from tvm.relax.training.optimizer import SGD

        tm = trainer_module(backbone(self.model, self.batch), len(self.names), self.batch,
                            self.model.n_classes, SGD(0.1), legalize=False)
        step = tvm.IRModule({"backbone": tm["backbone"], "backbone_loss_adjoint": tm["backbone_loss_adjoint"]})
        if self.conv_as_matmul:
            from edgetvm.passes.conv_im2col import conv_as_matmul

            step = conv_as_matmul(step)
        return step

    def _optimizer_function(self, cfg: OptimizerConfig):
        params = [relax.Var(n, relax.TensorType(s, "float32")) for n, s in self.shapes.items()]
        opt = cfg.make().init(params)
        return opt, opt.get_function().with_attr("global_symbol", "optimizer")

    def _initial_state(self, cfg: OptimizerConfig) -> list:
        return list(self._optimizer_function(cfg)[0].state)

    def _load_optimizer(self, cfg: OptimizerConfig) -> None:
        ex = _build(("optimizer", tuple(self.shapes.items()), cfg),
                    lambda: tvm.IRModule({"optimizer": self._optimizer_function(cfg)[1]}))
        self._optimizer = relax.VirtualMachine(ex, self.dev)["optimizer"]
        self.optimizer_config = cfg

    def set_lr(self, lr: float) -> None:
        """A new learning rate (relax.training bakes it into the optimizer: its module is recompiled,
        the optimizer's state carries over)."""
        if float(lr) != self.optimizer_config.lr:
            c = self.optimizer_config
            self._load_optimizer(OptimizerConfig(c.kind, float(lr), c.momentum, c.weight_decay))

    @property
    def optimizer_state(self) -> list[np.ndarray]:
        return [s.numpy() for s in self._state]

    @optimizer_state.setter
    def optimizer_state(self, arrays) -> None:
        self._state = [tvm.runtime.tensor(np.asarray(a), self.dev) for a in arrays]

    @property
    def params(self) -> dict[str, np.ndarray]:
        """A copy of the parameters, by name."""
        return {n: p.numpy() for n, p in zip(self.names, self._params)}

    def set_params(self, params: dict[str, np.ndarray]) -> None:
        """Replace the named parameters (any subset)."""
        for name, value in params.items():
            if name not in self.shapes:
                raise KeyError(f"{self.model.name} has no parameter {name!r}; it has {', '.join(self.names)}")
            value = native(np.asarray(value, dtype=np.float32))
            if value.shape != self.shapes[name]:
                raise ValueError(f"{name}: shape {value.shape}, the model's is {self.shapes[name]}")
            self._params[self.names.index(name)] = tvm.runtime.tensor(value, self.dev)

    def _batch(self, x: np.ndarray, y: np.ndarray):
        if len(x) != self.batch or len(y) != self.batch:
            raise ValueError(f"the step is compiled for batches of {self.batch}, got {len(x)}")
        return (to_tvm(np.asarray(x, dtype=np.float32), self.dev), to_tvm(np.asarray(y, dtype=np.int64), self.dev))

    def gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """(mean cross-entropy, its gradient by parameter name) on one batch; the parameters stay."""
        xs, ys = self._batch(x, y)
        loss, grads = self._adjoint(xs, *self._params, ys)
        return float(loss.numpy()), {n: g.numpy() for n, g in zip(self.names, grads)}

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer step on one batch; returns the batch's loss before the step."""
        xs, ys = self._batch(x, y)
        loss, grads = self._adjoint(xs, *self._params, ys)
        new_params, new_state = self._optimizer(self._params, grads, self._state)
        self._params, self._state = list(new_params), list(new_state)
        return float(loss.numpy())

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for any number of images (the last chunk is padded up to the compiled batch)."""
        out = []
        for i in range(0, len(x), self.batch):
            chunk = native(np.asarray(x[i:i + self.batch], dtype=np.float32))
            n = len(chunk)
            if n < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - n, *chunk.shape[1:]), np.float32)])
            out.append(self._forward(tvm.runtime.tensor(chunk, self.dev), *self._params).numpy()[:n])
        return np.concatenate(out) if out else np.zeros((0, self.model.n_classes), np.float32)


def evaluate(trainer: Trainer, split: data_mod.Split) -> dict[str, float]:
    """Mean cross-entropy and accuracy of the current parameters on a split."""
    if len(split) == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    z = trainer.logits(split.x).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -log_p[np.arange(len(split)), split.y].mean()
    return {"loss": float(loss), "accuracy": float((z.argmax(axis=1) == split.y).mean())}


# ---- checkpoints ------------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, trainer: Trainer, epoch: int, history: list[dict]) -> None:
    """Parameters, optimizer state and progress after `epoch` epochs, written atomically (a crash leaves
    the previous checkpoint)."""
    path = Path(path)
    meta = {"model": repr(trainer.model), "batch": trainer.batch, "seed": trainer.seed,
            "optimizer": trainer.optimizer_config.kind, "lr": trainer.optimizer_config.lr,
            "epoch": epoch, "history": history}
    arrays = {f"param/{n}": a for n, a in trainer.params.items()}
    arrays |= {f"optim/{i}": a for i, a in enumerate(trainer.optimizer_state)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(path: str | Path) -> dict:
    """{"meta": {...}, "params": {name: array}, "optim": [arrays]} of a checkpoint file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            params = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
            optim = [z[f"optim/{i}"] for i in range(sum(k.startswith("optim/") for k in z.files))]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}); delete it to start over") from None
    return {"meta": meta, "params": params, "optim": optim}


def _resume(trainer: Trainer, path: Path) -> tuple[int, list[dict]]:
    ck = read_checkpoint(path)
    meta = ck["meta"]
    mine = {"model": repr(trainer.model), "batch": trainer.batch, "seed": trainer.seed,
            "optimizer": trainer.optimizer_config.kind}
    differ = [k for k, v in mine.items() if meta.get(k) != v]
    if differ:
        raise UserError(f"checkpoint {path} was written with another {', '.join(differ)}; "
                        "delete it or pass another checkpoint path")
    trainer.set_params(ck["params"])
    trainer.optimizer_state = ck["optim"]
    return int(meta["epoch"]), list(meta["history"])


# ---- the loop -----------------------------------------------------------------------------------------


class _Progress:
    """One line on stderr: rewritten in place on a terminal, one line per epoch otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.last = 0.0

    def update(self, text: str) -> None:
        if self.live and time.monotonic() - self.last > 0.25:
            self.last = time.monotonic()
            sys.stderr.write("\r" + text + "\033[K")
            sys.stderr.flush()

    def done(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(("\r" if self.live else "") + text + ("\033[K" if self.live else "") + "\n")
            sys.stderr.flush()


def fit(model: Model | Trainer, data: data_mod.DataSet, epochs: int, batch: int = 64,
        lr: float | Callable[[int], float] | None = None, optimizer: str = "momentum", seed: int = 0,
        checkpoint: str | Path | None = None, after_step: Callable[[Trainer], None] | None = None,
        progress: bool = True, **optimizer_args) -> Trainer:
    """Train for `epochs` epochs on data.train (seeded shuffles, one per epoch), validating on data.val.

    `lr` is a number or a function of the epoch (0-based); None: 0.01, or a Trainer's own. With
    `checkpoint`, the parameters and optimizer state are written there after every epoch and a run
    continues from it: the batches depend only on (seed, epoch), so a resumed run ends where an
    uninterrupted one would.
    `after_step(trainer)` runs after every step (masks, projections). The trainer's `history` lists
    the epochs: lr, mean training loss, validation loss and accuracy, seconds.
    A Trainer passed in is trained further with its own batch, optimizer and seed."""
    lr_at = lr if callable(lr) else (lambda epoch: lr)
    trainer = model if isinstance(model, Trainer) else Trainer(
        model, batch, optimizer, 0.01 if lr_at(0) is None else lr_at(0), seed=seed, **optimizer_args)
    start, history = 0, []
    if checkpoint is not None and Path(checkpoint).exists():
        start, history = _resume(trainer, Path(checkpoint))
    show = _Progress(progress)
    steps = data_mod.steps_per_epoch(data.train, trainer.batch)
    for epoch in range(start, epochs):
        if lr_at(epoch) is not None:
            trainer.set_lr(lr_at(epoch))
        t0, total = time.perf_counter(), 0.0
        for i, (x, y) in enumerate(data_mod.batches(data.train, trainer.batch, trainer.seed, epoch)):
            total += trainer.step(x, y)
            if after_step is not None:
                after_step(trainer)
            show.update(f"epoch {epoch + 1}/{epochs}  step {i + 1}/{steps}  loss {total / (i + 1):.4f}")
        val = evaluate(trainer, data.val)
        record = {"epoch": epoch + 1, "lr": trainer.optimizer_config.lr, "loss": total / max(steps, 1),
                  "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        if checkpoint is not None:
            save_checkpoint(checkpoint, trainer, epoch + 1, history)
        show.done(f"epoch {epoch + 1}/{epochs}  loss {record['loss']:.4f}  val loss {val['loss']:.4f}  "
                  f"val acc {100 * val['accuracy']:.2f}%  {record['seconds']:.1f} s")
    trainer.history = history
    return trainer


# ---- export -------------------------------------------------------------------------------------------


def to_onnx(model: Model, params: dict[str, np.ndarray], batch: int = 1, metadata: dict[str, str] | None = None):
    """The model with these parameters as a standard ONNX graph (input "x", output "logits"; initializers
    named as the parameters), so that `edgetvm compile` and onnxruntime take it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    for name in param_shapes(model):
        inits.append(numpy_helper.from_array(np.asarray(params[name], np.float32), name))
    x, n_conv, n_fc, i = "x", 0, 0, 0

    def node(op, inputs, **attrs):
        nonlocal i
        i += 1
        out = f"{op.lower()}{i}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    for layer in model.layers:
        if isinstance(layer, Conv):
            n_conv += 1
            x = node("Conv", [x, f"conv{n_conv}.weight", f"conv{n_conv}.bias"],
                     kernel_shape=[layer.kernel] * 2, pads=[layer.pad] * 4)
        elif isinstance(layer, ReLU):
            x = node("Relu", [x])
        elif isinstance(layer, MaxPool):
            x = node("MaxPool", [x], kernel_shape=[layer.size] * 2, strides=[layer.size] * 2)
        elif isinstance(layer, Flatten):
            x = node("Flatten", [x], axis=1)
        elif isinstance(layer, Linear):
            n_fc += 1
            x = node("Add", [node("MatMul", [x, f"fc{n_fc}.weight"]), f"fc{n_fc}.bias"])
    nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
    graph = helper.make_graph(
        nodes, model.name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *model.input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, model.n_classes])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgetvm")
    proto.ir_version = 8
    for k, v in (metadata or {}).items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    return proto
