"""Training steps compiled by TVM: ONNX model -> SetupTrainer (cross-entropy + SGD) -> one library.

`compile_trainer` writes, per (architecture, width), a shared library and `meta.json`: parameter
shapes, the optimizer state and the static features of every TIR kernel of the step (op kind, FLOPs,
bytes, loop structure), which costmodels/latte.py joins with measured per-kernel times.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from edgetvm.latte import models

BATCH = 32
LR = 0.05
CACHE = Path(os.environ.get("EDGETVM_CACHE", Path.home() / ".cache" / "edgetvm")) / "latte"


def host_target():
    import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def train_module(arch: dict, batch: int = BATCH, lr: float = LR):
    """The SetupTrainer module (backbone, backbone_loss, backbone_loss_adjoint, optimizer) and the initial params."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.training import SetupTrainer
    from tvm.relax.training.loss import CrossEntropyLoss
    from tvm.relax.training.optimizer import SGD

    mod = from_onnx(models.to_onnx(arch, batch), keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    f = mod["main"]
    f = f.without_attr("num_input").with_attr("global_symbol", "backbone")
    backbone = tvm.IRModule({"backbone": f}).with_attr("param_num", len(f.params) - 1).with_attr("state_num", 0)
    setup = SetupTrainer(CrossEntropyLoss(reduction="mean"), SGD(lr),
                         [relax.TensorType((batch, models.N_CLASSES), "float32"),
                          relax.TensorType((batch,), "int64")])
    return setup(backbone), [p.numpy() for p in params["main"]]


FEATURE_VERSION = 2


def cache_geometry() -> dict:
    """L1 data and L2 cache geometry of the CPU the kernels are compiled for and run on (sysfs; typical
    x86 figures when it cannot be read). Used for cache-conflict features of kernels."""
    geo = {"l1": {"size": 32768, "ways": 8, "line": 64}, "l2": {"size": 524288, "ways": 8, "line": 64}}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in base.glob("index*"):
            level = int((idx / "level").read_text())
            kind = (idx / "type").read_text().strip()
            if level in (1, 2) and kind in ("Data", "Unified"):
                size = (idx / "size").read_text().strip()
                mult = {"K": 1024, "M": 1 << 20}.get(size[-1], 1)
                geo[f"l{level}"] = {"size": int(size.rstrip("KM")) * mult,
                                    "ways": int((idx / "ways_of_associativity").read_text()),
                                    "line": int((idx / "coherency_line_size").read_text())}
    except (OSError, ValueError):
        pass
    return geo


def stream_overflow(extent: int, stride: int, cache: dict) -> float:
    """How many times over an access stream of `extent` elements `stride` bytes apart overflows the cache
    lines it can use: a stride that is a multiple of a large power of two maps every element into a few
    sets (set-associative conflicts), so a column walk of a 256-wide fp32 matrix thrashes L1 where a
    320-wide one does not. > 1: the stream cannot stay cached between sweeps."""
    import math

    line, ways = cache["line"], cache["ways"]
    sets = max(1, cache["size"] // (line * ways))
    if extent <= 1 or stride <= 0:
        return 0.0
    if stride < line:
        return extent * stride / line / (sets * ways)
    span = sets * line  # bytes after which the set index repeats
    touched = min(extent, span // math.gcd(stride, span))
    return extent / (ways * touched)


def _loop_features(func) -> dict:
    """Loop structure of a kernel's TIR: loops, nesting, blocks, spatial/reduction extents, annotations,
    and the access pattern of the innermost loop of its biggest block: extent, largest stride of a read
    along it, and how far that strided stream overflows L1 and L2 (set conflicts included)."""
    import tvm

    feats = {"n_loops": 0, "loop_depth": 0, "n_blocks": 0, "spatial_extent": 0.0, "reduce_extent": 0.0,
             "max_extent": 1, "n_parallel": 0, "n_vectorized": 0,
             "inner_extent": 0, "inner_reduce": 0, "inner_stride": 0, "inner_l1_overflow": 0.0,
             "inner_l2_overflow": 0.0}
    geo = cache_geometry()
    biggest = [0.0]

    def ext_of(e) -> int:
        try:
            return int(e)
        except (TypeError, ValueError):
            return 1

    def uses(expr, var) -> bool:
        return any(v.same_as(var) for v in tvm.tirx.analysis.undefined_vars(expr))

    def access(block, size: float) -> None:
        ivs = list(block.iter_vars)
        if not ivs or size < biggest[0]:
            return
        biggest[0] = size
        inner = ivs[-1]  # the default schedule nests loops in the block's iter-var order
        ext = ext_of(inner.dom.extent)
        stride = 0
        for region in block.reads:
            buf = getattr(region, "buffer", None) or region.source
            shape = [ext_of(s) for s in buf.shape]
            item = max(1, tvm.runtime.DataType(buf.dtype).bits // 8)
            for d, rng in enumerate(region.region):
                if uses(rng.min, inner.var):
                    stride = max(stride, int(np.prod(shape[d + 1:], dtype=np.int64)) * item)
        feats.update(inner_extent=ext, inner_reduce=int(int(inner.iter_type) == 2), inner_stride=stride,
                     inner_l1_overflow=stream_overflow(ext, stride, geo["l1"]),
                     inner_l2_overflow=stream_overflow(ext, stride, geo["l2"]))

    def walk(stmt, d=0):
        cls = type(stmt).__name__
        if cls == "For":
            feats["n_loops"] += 1
            ext = ext_of(stmt.extent)
            feats["max_extent"] = max(feats["max_extent"], ext)
            kind = str(stmt.kind)
            feats["n_parallel"] += "parallel" in kind.lower()
            feats["n_vectorized"] += "vectori" in kind.lower()
            feats["loop_depth"] = max(feats["loop_depth"], d + 1)
            walk(stmt.body, d + 1)
        elif cls == "SeqStmt":
            for x in stmt.seq:
                walk(x, d)
        elif cls == "SBlockRealize":
            walk(stmt.block, d)
        elif cls == "SBlock":
            if stmt.name_hint != "root":
                feats["n_blocks"] += 1
                sp, rd = 1.0, 1.0
                for iv in stmt.iter_vars:
                    e = ext_of(iv.dom.extent)
                    if int(iv.iter_type) == 2:  # CommReduce
                        rd *= e
                    else:
                        sp *= e
                feats["spatial_extent"] = max(feats["spatial_extent"], sp)
                feats["reduce_extent"] = max(feats["reduce_extent"], rd if rd > 1 else 0.0)
                access(stmt, sp * rd)
            walk(stmt.body, d)
        elif hasattr(stmt, "body") and isinstance(getattr(stmt, "body"), tvm.runtime.Object):
            walk(stmt.body, d)

    walk(func.body)
    return feats


def _buffer_bytes(func) -> tuple[int, int, list]:
    shapes, total, outb = [], 0, 0
    params = list(func.params)
    for i, p in enumerate(params):
        ty = p.ty
        if not hasattr(ty, "shape"):
            continue
        shape = [int(s) for s in ty.shape]
        dt = str(ty.dtype)
        item = 1 if dt == "bool" else np.dtype(dt).itemsize
        nb = int(np.prod(shape)) * item
        shapes.append(shape)
        total += nb
        if i == len(params) - 1:
            outb = nb
    return total, outb, shapes


def op_kind(symbol: str) -> tuple[str, int]:
    """(the main operator, how many operators were fused) from a kernel's name, e.g. fused_conv2d1_add1_relu1 -> (conv2d, 3)."""
    if symbol.startswith("vm.builtin."):
        return "builtin", 1
    name = symbol[len("fused_"):] if symbol.startswith("fused_") else symbol
    toks = [re.sub(r"\d+$", "", t) for t in name.split("_")]
    ops, i = [], 0
    joined = {"max_pool2d_backward", "max_pool2d", "conv2d_transpose", "collapse_sum", "log_softmax",
              "nll_loss_without_weight", "te_nll_loss_backward_no_weight", "tir_exp"}
    while i < len(toks):
        for n in (5, 4, 3, 2):
            cand = "_".join(toks[i:i + n])
            if cand in joined:
                ops.append(cand)
                i += n
                break
        else:
            ops.append(toks[i])
            i += 1
    return ops[0], len(ops)


def kernel_features(lowered) -> dict[str, dict]:
    """Static features of every TIR kernel in a lowered module."""
    import tvm
    from tvm.s_tir.analysis import estimate_tir_flops

    out = {}
    for gv, func in lowered.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gv.name_hint
        try:
            flops = float(estimate_tir_flops(tvm.IRModule({gv: func})))
        except Exception:  # noqa: BLE001 - kernels without arithmetic (copies, reshapes)
            flops = 0.0
        total, outb, shapes = _buffer_bytes(func)
        kind, nfused = op_kind(name)
        out[name] = {"kind": kind, "n_fused": nfused, "flops": flops, "bytes": total, "out_bytes": outb,
                     "n_args": len(shapes), "shapes": shapes, **_loop_features(func)}
    return out


def cache_dir(arch: dict, width: float, batch: int = BATCH) -> Path:
    import tvm

    key = json.dumps({"arch": models.sub_arch(arch, width), "batch": batch, "lr": LR, "tvm": tvm.__version__,
                      "cpu": tvm.target.codegen.llvm_get_system_cpu(), "v": 3}, sort_keys=True)
    return CACHE / hashlib.sha256(key.encode()).hexdigest()[:16]


def compile_trainer(arch: dict, width: float, batch: int = BATCH) -> Path:
    """Compile (or reuse) the training step of `arch` at `width`; returns the directory."""
    import tvm
    from tvm import relax

    d = cache_dir(arch, width, batch)
    if (d / "meta.json").exists():
        return d
    sub = models.sub_arch(arch, width)
    tm, params = train_module(sub, batch)
    target = host_target()
    lowered = relax.get_default_pipeline(target)(tm.without_attr("optim_state"))
    ex = tvm.compile(lowered, target, relax_pipeline=None)
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(tmp / "train.so"))
    np.savez(tmp / "init.npz", *params)
    np.savez(tmp / "optim.npz", *[s.numpy() for s in tm.attrs["optim_state"]])
    meta = {"arch": sub, "batch": batch, "lr": LR, "n_params": len(params),
            "param_bytes": models.param_bytes(sub), "flops_per_sample": models.flops_per_sample(sub),
            "kernels": kernel_features(lowered), "feature_version": FEATURE_VERSION}
    (tmp / "meta.json").write_text(json.dumps(meta))
    meta["calls"] = count_calls(tmp)
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        tmp.rename(d)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return d


def lowered_module(arch: dict, batch: int = BATCH):
    """The training module after the default pipeline: what compile_trainer builds, kernels named alike."""
    from tvm import relax

    tm, _ = train_module(arch, batch)
    return relax.get_default_pipeline(host_target())(tm.without_attr("optim_state"))


def load_meta(d: Path) -> dict:
    """meta.json of a compiled step; kernel features written by an older version are recomputed (the
    kernels and their names come from the same lowering, so the library itself is kept)."""
    d = Path(d)
    meta = json.loads((d / "meta.json").read_text())
    if meta.get("feature_version") != FEATURE_VERSION:
        meta["kernels"] = kernel_features(lowered_module(meta["arch"], meta["batch"]))
        meta["feature_version"] = FEATURE_VERSION
        tmp = d / f"meta.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(meta))
        tmp.rename(d / "meta.json")
    return meta


def count_calls(d: Path) -> dict[str, float]:
    """Kernel and VM-builtin calls one training step makes (counted with vm.set_instrument)."""
    r = StepRunner(d)
    shape = (r.meta["batch"], 1, 8, 8) if r.meta["arch"]["kind"] == "cnn" else (r.meta["batch"], models.N_IN)
    r.set_batch(np.zeros(shape, "float32"), np.zeros(r.meta["batch"], "int64"))
    r.step()
    calls: dict[str, float] = {}

    def instrument(func, symbol, before, ret, *args):
        if before:
            calls[symbol] = calls.get(symbol, 0.0) + 1.0
        return 0

    r.vm.set_instrument(instrument)
    r.step()
    r.vm.set_instrument(None)
    return calls


class StepRunner:
    """Runs compiled training steps (adjoint + SGD) from a compile_trainer directory; no compiler needed."""

    def __init__(self, d: Path):
        import tvm
        from tvm import relax

        self.meta = json.loads((Path(d) / "meta.json").read_text())
        self.dev = tvm.cpu()
        lib = tvm.runtime.load_module(str(Path(d) / "train.so"))
        self.vm = relax.VirtualMachine(lib, self.dev)
        init = np.load(Path(d) / "init.npz")
        self.params = [tvm.runtime.tensor(init[f"arr_{i}"], self.dev) for i in range(len(init.files))]
        optim = np.load(Path(d) / "optim.npz")
        self.optim = [tvm.runtime.tensor(optim[f"arr_{i}"], self.dev) for i in range(len(optim.files))]
        self.adjoint = self.vm["backbone_loss_adjoint"]
        self.optimizer = self.vm["optimizer"]
        self.n_params = len(self.params)

    def set_batch(self, x: np.ndarray, y: np.ndarray) -> None:
        import tvm

        self.x = tvm.runtime.tensor(x.astype("float32"), self.dev)
        self.y = tvm.runtime.tensor(y.astype("int64"), self.dev)

    def step(self) -> float:
        loss, grads = self.adjoint(self.x, *self.params, self.y)
        new_params, self.optim = self.optimizer(self.params, grads, self.optim)
        self.params = list(new_params)
        self.optim = list(self.optim)
        return float(loss.numpy())
