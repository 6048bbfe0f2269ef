"""The build pipeline: imported Relax module -> weights transformed once on the host + a library for the board."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu

from edgetvm.passes import schedule
from edgetvm.passes import conv_im2col
from edgetvm.passes.conv_im2col import narrow_conv_as_matmul
from edgetvm.passes.fold_bn import fold_batchnorm_into_conv
from edgetvm.passes.pack_matmul import pack_weight_matmuls


@tvm.transform.module_pass(opt_level=0, name="ClipTakeIndices")
def clip_take_indices(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """take(mode="fast") reads out of bounds on a bad index (TVM warns so on stderr at each build): clip it."""
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.take")(wildcard(), wildcard())

    def rewriter(expr, _matches):
        if expr.attrs.mode != "fast":
            return expr
        return relax.op.take(expr.args[0], expr.args[1], expr.attrs.axis, mode="clip")

    out = mod.clone()
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            out[gv] = rewrite_call(pattern, rewriter, func)
    return out


_STACKED = {"relax.sum": relax.op.add, "relax.mean": relax.op.add, "relax.max": relax.op.maximum,
            "relax.min": relax.op.minimum}


@relax.expr_functor.mutator
class _StackedAsChain(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        name = getattr(call.op, "name", "")
        if name not in _STACKED or call.attrs.keepdims or call.attrs.axis is None or len(call.attrs.axis) != 1 \
                or not isinstance(call.args[0], relax.Var):
            return call
        stack = self.lookup_binding(call.args[0])
        if not (isinstance(stack, relax.Call) and getattr(stack.op, "name", "") == "relax.stack"
                and int(stack.attrs.axis) == int(call.attrs.axis[0])):
            return call
        parts = stack.args[0]
        if isinstance(parts, relax.Var):
            parts = self.lookup_binding(parts)
        if not isinstance(parts, relax.Tuple):
            return call
        # the importer broadcast every input to the output's shape first; the binary ops broadcast alike
        items = []
        for v in parts.fields:
            b = self.lookup_binding(v) if isinstance(v, relax.Var) else None
            items.append(b.args[0] if isinstance(b, relax.Call) and getattr(b.op, "name", "") == "relax.broadcast_to" else v)
        out = items[0]
        for v in items[1:]:
            out = self.builder_.emit(_STACKED[name](out, v))
        if name == "relax.mean":
            out = self.builder_.emit(relax.op.divide(out, relax.const(len(items), call.ty.dtype)))
        if [int(d) for d in out.ty.shape] != [int(d) for d in call.ty.shape]:
            out = self.builder_.emit(relax.op.broadcast_to(out, call.ty.shape))
        return out


@tvm.transform.module_pass(opt_level=0, name="StackedReductionsAsChains")
def stacked_reductions_as_chains(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """sum/mean/max/min over a stack of inputs (ONNX Sum, Mean, Max, Min as imported) -> a chain of binary ops.

    The importer stacks broadcast copies of the inputs and reduces the new axis: three kernels and a copy of
    every input for a residual add (ShuffleNet's Sum: 0.48 ms of 7 calls where an add fused into the conv
    before it costs nothing). The chain adds in the reduction's order: the same values."""
    mutator = _StackedAsChain(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return relax.transform.DeadCodeElimination()(mutator.builder_.get())


def lift_weight_transforms(mod: tvm.IRModule, pack_matmuls: bool = True,
                           target: tvm.target.Target | None = None,
                           channels_last: bool = True) -> tuple[tvm.IRModule, tvm.IRModule]:
    """Split `main` into `main_transform_params` (weight-only work: transposes, reshapes, folds) and the rest.

    The first runs once, at compile time on the host; the board only ever runs the second, so an ONNX
    Gemm(transB=1) no longer transposes its weight on every call, and matmul weights are packed in
    column strips there (pack_matmul.py; not for a swapping build, which splits weights by columns).
    With the board's `target`, convolutions with rows narrower than its vector registers (16 floats on
    AVX-512, else 8) keep their output channels innermost (conv_im2col.py); without, 8. With
    `channels_last`, a CNN whose convolutions nearly all have narrower or odd rows runs channels-last
    (conv_im2col.channels_last).
    """
    native = schedule._native_lanes(target)[0] if target is not None else 0
    direct_below = max(8, native)
    row_tiles = schedule.matmul_row_tiles(target) if target is not None else (8, 6, 4)
    columns = schedule.matmul_columns(target) if target is not None else 16
    lifted = tvm.transform.Sequential([
        clip_take_indices,
        stacked_reductions_as_chains,
        fold_batchnorm_into_conv,
        # Batch norm that did not fold (not after a conv) becomes elementwise math, whose
        # weight-only half (sqrt(var + eps), the divide) is then lifted too.
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        *([conv_im2col.channels_last()] if pack_matmuls and channels_last else []),
        *([narrow_conv_as_matmul(direct_below, native), pack_weight_matmuls(row_tiles, columns)] if pack_matmuls else []),
        relax.transform.LiftTransformParams(),
    ])(mod)

    def keep(entry: str, drop: str) -> tvm.IRModule:
        # The importer emits some operators as PrimFuncs beside main: keep those each side still calls.
        part = tvm.IRModule({gv: f for gv, f in lifted.functions.items() if gv.name_hint != drop})
        part = relax.transform.DeadCodeElimination(entry_functions=[entry])(part)
        # DeadCodeElimination keeps every PrimFunc with a global symbol; a kernel only `main` calls may need
        # the board's target (passes/sparse.py's AVX-512 kernel), and the host compiles this side generically
        called = {gv for f in part.functions.values() if isinstance(f, relax.Function)
                  for gv in relax.analysis.all_global_vars(f)}
        return tvm.IRModule({gv: f for gv, f in part.functions.items()
                             if isinstance(f, relax.Function) or gv in called}, attrs=part.attrs)

    return keep("main_transform_params", "main"), keep("main", "main_transform_params")


def transform_weights(transform: tvm.IRModule, weights: list[np.ndarray]) -> list[np.ndarray]:
    """Run `main_transform_params` on the host and return the weights `main` takes, in its order."""
    ex = tvm.compile(transform, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main_transform_params"]([tvm.runtime.tensor(w) for w in weights])
    return [t.numpy() for t in out]


def weight_names(deploy: tvm.IRModule) -> list[str]:
    """Names of `main`'s weight parameters (those after its `num_input` data inputs), made unique."""
    main = deploy["main"]
    num_input = int(main.attrs["num_input"])
    names, seen = [], set()
    for i, p in enumerate(main.params[num_input:]):
        name = p.name if p.name not in seen else f"{p.name}.{i}"
        seen.add(name)
        names.append(name)
    return names


def _fast_erf(bb, call):
    from tvm import topi

    x = call.args[0]
    if x.ty.dtype != "float32":
        return call  # the default legalization takes it
    return bb.call_te(topi.fast_erf, x, primfunc_name_hint="fast_erf")


def fast_erf() -> tvm.transform.Pass:
    """Legalize float32 erf (ONNX's GELU) as TOPI's fast_erf, a vectorisable rational approximation (max abs
    error 3.5e-7 here): LLVM calls libm's erff once per element otherwise, 2/3 of a transformer block's MLP."""
    return relax.transform.LegalizeOps(customize_legalize_map={"relax.erf": _fast_erf})


def fusion_passes(target: tvm.target.Target, database=None) -> list[tvm.transform.Pass]:
    """Legalize and fuse, with batch norm decomposed first so that FuseOps folds it into the conv."""
    passes = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()]
    passes += cpu.library_dispatch_passes(target) + [fast_erf()] + cpu.legalize_passes(target)
    if database is not None:
        passes.append(relax.transform.MetaScheduleApplyDatabase(enable_warning=False))
    return passes


def fuse(deploy: tvm.IRModule, target: tvm.target.Target, database=None) -> tvm.IRModule:
    """`main` as fused, scheduled kernels: tuned schedules from the database, the CPU default for the rest."""
    with target:  # MetaScheduleApplyDatabase reads the target when it is constructed
        seq = tvm.transform.Sequential(fusion_passes(target, database) + [schedule.default_schedule()])
        if database is None:
            return seq(deploy)
        with database:
            return seq(deploy)


def lower(fused: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """A fused module as VM code and lowered kernels, before code generation."""
    with target:
        return tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(fused)


def finish(fused: tvm.IRModule, target: tvm.target.Target):
    """Lower a fused module to VM code and compile it for the target."""

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        return lower(mod, target)

    return tvm.compile(fused, target=target, relax_pipeline=_pipeline)


def build(deploy: tvm.IRModule, target: tvm.target.Target, database=None):
    """Compile `main` for the target."""
    return finish(fuse(deploy, target, database), target)


def export(ex, path: str, cross_compiler: str = "") -> None:
    """Write the executable as a shared library, linked by the board's cross compiler."""
    if cross_compiler:
        import subprocess

        from tvm.support import cc

        # TVM asks the compiler for its triple to pack a library without kernels (a split's empty part);
        # cross_compiler's own answer comes from the host's compiler.
        def triple():
            return subprocess.run([cross_compiler, "-dumpmachine"], capture_output=True, text=True,
                                  check=True).stdout.strip()

        ex.export_library(path, fcompile=cc.cross_compiler(cross_compiler, get_target_triple=triple))
    else:
        ex.export_library(path)
