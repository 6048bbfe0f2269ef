"""Compiled adaptation steps (masked, passes/adapt_step.py; or full, TVM's Gradient) and their planned memory.

Masks: {parameter name: bool vector} over a weight's input channels (conv axis 1, linear axis 0) or a bias's
channels. `full_mask`, `bias_mask`, `last_layer_mask` give the baselines' masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from edgetvm import train
from edgetvm.errors import UserError
from edgetvm.runtime.tensors import to_tvm


def mask_axis(shape: tuple[int, ...]) -> int:
    """The axis a mask selects along: a conv weight's input channels (1), else axis 0."""
    return 1 if len(shape) == 4 else 0


def mask_len(shape: tuple[int, ...]) -> int:
    return shape[mask_axis(shape)]


def full_mask(model: train.Model) -> dict[str, np.ndarray]:
    """Everything (MAML / full fine-tuning)."""
    return {n: np.ones(mask_len(s), bool) for n, s in train.param_shapes(model).items()}


def bias_mask(model: train.Model) -> dict[str, np.ndarray]:
    """Every bias and the classifier's weight, no other weight (TinyTL's bias-only updating, which trains the
    new task's classifier too: with biases alone a new task's classes cannot be told apart)."""
    shapes = train.param_shapes(model)
    last = [n for n in shapes if n.startswith("fc")][-2]
    return {n: np.ones(mask_len(s), bool) for n, s in shapes.items() if n.endswith(".bias") or n == last}


def last_layer_mask(model: train.Model) -> dict[str, np.ndarray]:
    """The classifier's weight and bias only (ANIL)."""
    shapes = train.param_shapes(model)
    last = [n for n in shapes if n.startswith("fc")][-2:]
    return {n: np.ones(mask_len(shapes[n]), bool) for n in last}


def check_mask(model: train.Model, mask: dict) -> dict[str, np.ndarray]:
    """The mask as bool vectors of the right lengths; a one-line UserError if it is malformed or empty."""
    shapes = train.param_shapes(model)
    out = {}
    for name, m in mask.items():
        if name not in shapes:
            raise UserError(f"the mask names {name!r}, which {model.name} does not have; "
                            f"its parameters: {', '.join(shapes)}")
        m = np.asarray(m, bool).reshape(-1)
        if len(m) != mask_len(shapes[name]):
            raise UserError(f"the mask of {name} has {len(m)} entries, {name} has {mask_len(shapes[name])} "
                            "channels to select; rebuild the mask for this model")
        if m.any():
            out[name] = m
    if not out:
        raise UserError("the mask selects nothing to update; select at least one layer or channel "
                        "(or use full fine-tuning)")
    return out


def _mask_key(mask: dict) -> tuple:
    return tuple((n, np.asarray(m, bool).tobytes()) for n, m in sorted(mask.items()))


def step_module(model: train.Model, batch: int, mask: dict, lr: float | dict, output: str = "update",
                conv_as_matmul: bool = True, mask_bits: int = 1) -> tvm.IRModule:
    """The masked step as a module holding only `adapt_step` (ReLU / max-pool masks of `mask_bits` bits an
    element: 1, or 8 for the unpacked bool masks, kept for comparison)."""
    from edgetvm.passes.adapt_step import adapt_step

    mod = adapt_step(tvm.IRModule({"backbone": train.backbone(model, batch)}), mask, lr, output,
                     mask_bits=mask_bits)
    mod = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != "backbone"})
    if conv_as_matmul:
        from edgetvm.passes.conv_im2col import conv_as_matmul as rewrite

        mod = rewrite(mod)
    return mod


def full_step_module(model: train.Model, batch: int, conv_as_matmul: bool = True) -> tvm.IRModule:
    """TVM's own step (relax.training SetupTrainer + Gradient, as train.Trainer builds it): the full
    fine-tuning reference, holding only `backbone_loss_adjoint`."""
    from tvm.relax.training.optimizer import SGD

    tm = train.trainer_module(train.backbone(model, batch), len(train.param_shapes(model)), batch,
                              model.n_classes, SGD(0.1), legalize=False)
    mod = tvm.IRModule({"backbone_loss_adjoint": tm["backbone_loss_adjoint"]})
    if conv_as_matmul:
        from edgetvm.passes.conv_im2col import conv_as_matmul as rewrite

        mod = rewrite(mod)
    return mod


class MaskedStep:
    """The compiled masked step on this machine: run(x, y, params) -> (loss, {name: new slice or gradient})."""

    def __init__(self, model: train.Model, batch: int, mask: dict, lr: float | dict = 0.05, output: str = "update",
                 conv_as_matmul: bool = True, mask_bits: int = 1):
        self.model, self.batch, self.output = model, int(batch), output
        self.mask = check_mask(model, mask)
        self.rates_input = isinstance(lr, str)
        if self.rates_input:       # "input": run() takes the per-channel rates (one step for every task's rates)
            if lr != "input" or output != "update":
                raise ValueError(f"lr={lr!r}: a string lr must be 'input', with output='update'")
            self.lr = lr_key = "input"
        elif isinstance(lr, dict):   # per-channel rates: over the selected channels only
            lr = {n: np.asarray(lr[n], np.float32).reshape(-1)[self.mask[n]] for n in self.mask}
            self.lr = lr
            lr_key = tuple((n, v.tobytes()) for n, v in sorted(lr.items()))
        else:
            self.lr = float(lr)
            lr_key = self.lr
        self.shapes = train.param_shapes(model)
        self.names = list(self.shapes)
        self.updated = [n for n in self.names if n in self.mask]
        key = ("adapt", model, self.batch, _mask_key(self.mask), lr_key, output, conv_as_matmul, mask_bits)
        ex = train._build(key, lambda: step_module(model, self.batch, self.mask, self.lr, output, conv_as_matmul,
                                                   mask_bits))
        self.dev = tvm.cpu()
        self._f = relax.VirtualMachine(ex, self.dev)["adapt_step"]

    def run(self, x: np.ndarray, y: np.ndarray, params: dict, rates: dict | None = None
            ) -> tuple[float, dict[str, np.ndarray]]:
        """One step; `rates` ({name: a step size per channel of the whole parameter}) only for lr="input"."""
        if len(x) != self.batch:
            raise ValueError(f"the step is compiled for {self.batch} samples, got {len(x)}")
        if self.rates_input != (rates is not None):
            raise ValueError("rates are given to run() exactly when the step was built with lr='input'")
        args = [to_tvm(np.asarray(x, np.float32), self.dev), to_tvm(np.asarray(y, np.int64), self.dev)]
        args += [to_tvm(np.asarray(params[n], np.float32), self.dev) for n in self.names]
        if rates is not None:
            args += [to_tvm(np.ascontiguousarray(np.asarray(rates[n], np.float32).reshape(-1)[self.mask[n]]), self.dev)
                     for n in self.updated]
        out = self._f(*args)
        return float(out[0].numpy()), {n: out[i + 1].numpy() for i, n in enumerate(self.updated)}

    def apply(self, params: dict, slices: dict) -> dict[str, np.ndarray]:
        """`params` with the step's new slices written in (a new dict; the arrays changed are copies)."""
        out = dict(params)
        for name, value in slices.items():
            idx = np.flatnonzero(self.mask[name])
            w = np.array(params[name], np.float32, copy=True)
            if mask_axis(w.shape) == 1:
                w[:, idx] = value
            else:
                w[idx] = value
            out[name] = w
        return out

    def adapt(self, x, y, params: dict, steps: int, rates: dict | None = None) -> tuple[dict, list[float]]:
        """`steps` SGD steps on one batch (the support set); the adapted parameters and the losses."""
        losses = []
        for _ in range(steps):
            loss, slices = self.run(x, y, params, rates)
            params = self.apply(params, slices)
            losses.append(loss)
        return params, losses


# ---- planned memory ------------------------------------------------------------------------------

@dataclass
class Planned:
    """Bytes of one compiled step: its inputs (data + all parameters), the storage Relax's memory planner
    allocates for its intermediates and outputs, and the largest kernel scratch (buffers a kernel allocates
    itself, invisible to the planner: SwapNet counts it the same way)."""
    inputs: int
    planned: int
    scratch: int

    @property
    def total(self) -> int:
        return self.inputs + self.planned + self.scratch

    @property
    def dynamic(self) -> int:
        """What the step adds to the deployed model: everything but the inputs."""
        return self.planned + self.scratch


def planned_memory(mod: tvm.IRModule, func: str, target=None) -> Planned:
    """Planned bytes of `mod[func]` after the project's build pipeline (fusion, then Relax's lowering with
    StaticPlanBlockMemory), counted from the lowered module's alloc_storage / alloc_tensor calls."""
    from edgetvm.costmodels.roofline import nbytes
    from edgetvm.passes import pipeline
    from edgetvm.passes.swap import _alloc_bytes

    target = target or train.host_target()
    lowered = pipeline.lower(pipeline.fuse(mod, target), target)
    f = lowered[func]
    storage = (tvm.ir.Op.get("relax.memory.alloc_storage"), tvm.ir.Op.get("relax.vm.alloc_storage"))
    builtin = tvm.ir.Op.get("relax.builtin.alloc_tensor")
    call_tir_ops = {tvm.ir.Op.get("relax.call_tir")}
    counts = {"planned": 0, "scratch": 0}
    called = set()

    def visit(e):
        if isinstance(e, relax.Call):
            if any(e.op.same_as(o) for o in storage):
                counts["planned"] += int(e.args[0].values[0])
            elif e.op.same_as(builtin):
                shape = [int(v) for v in e.args[0].values]
                counts["planned"] += int(np.prod(shape)) * tvm.runtime.DataType(str(e.args[1].value)).bits // 8
            elif isinstance(e.op, tvm.ir.GlobalVar):
                called.add(e.op)
            elif e.op in call_tir_ops and isinstance(e.args[0], tvm.ir.GlobalVar):
                called.add(e.args[0])
            for a in e.args:
                if isinstance(a, tvm.ir.GlobalVar):
                    called.add(a)

    relax.analysis.post_order_visit(f.body, visit)
    scratch = 0
    for gv in called:
        try:
            prim = lowered[gv]
        except (KeyError, ValueError, tvm.TVMError):
            continue
        if isinstance(prim, tvm.tirx.PrimFunc):
            scratch = max(scratch, _alloc_bytes(prim.body))
    inputs = sum(nbytes(p.ty) for p in mod[func].params)
    return Planned(inputs, counts["planned"], scratch)
