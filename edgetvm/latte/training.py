"""Training steps compiled by TVM: ONNX model -> SetupTrainer (cross-entropy + SGD) -> one library.

`compile_trainer` writes, per (architecture, width, schedule), a shared library and `meta.json`:
parameter shapes, the optimizer state and the static features of every TIR kernel of the step (op kind,
FLOPs, bytes, loop structure, default or tuned schedule), which costmodels/latte.py joins with measured
per-kernel times.

Two schedules: "default" is TVM's default CPU pipeline (kernels lowered as legalized, no schedule);
"tuned" tunes the step's matmul and conv kernels with MetaSchedule on this host first (the database is
kept beside the library) and applies the best schedules found, the rest as in "default".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError
from edgetvm.latte import models

BATCH = 32
LR = 0.05
SCHEDULES = ("default", "tuned")
# Trials per tuned kernel. 8 trials of the evolutionary search already take mlp-a's training matmuls
# to 30-80 GFLOP/s (its whole step 3.5 -> 0.3 ms, this host); more trials change which tuned schedule
# wins, not that the kernel is tuned, and cost about 3 s per batch of 8 per kernel.
TUNE_TRIALS = 8
TUNED_KINDS = ("matmul", "conv2d", "conv2d_transpose")
CACHE = Path(os.environ.get("EDGETVM_CACHE", Path.home() / ".cache" / "edgetvm")) / "latte"


def target_cpu() -> str:
    """The CPU model the family is compiled for: this host's, or $EDGETVM_LATTE_MCPU, an older model the
    host also runs (e.g. haswell on a Zen 4: the same steps without AVX-512, a second CPU configuration
    for checking that the cost model carries across machines; `edgetvm latte profile --mcpu`)."""
    import tvm

    return os.environ.get("EDGETVM_LATTE_MCPU") or tvm.target.codegen.llvm_get_system_cpu()


def check_cpu(name: str) -> None:
    """Refuses a CPU model LLVM does not know or this host cannot run."""
    import tvm
    from tvm.target import codegen

    if not codegen.llvm_is_valid_cpu(name, codegen.llvm_get_system_triple()):
        raise UserError(f"--mcpu {name}: not a CPU model LLVM knows; try e.g. haswell, skylake, znver2")
    t = tvm.target.Target({"kind": "llvm", "mcpu": name})
    host = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    isa = ("sse", "ssse", "avx", "fma", "bmi", "f16c", "popcnt", "lzcnt", "movbe", "aes", "pclmul", "sha", "gfni",
           "vaes", "vpclmul", "amx", "adx")  # instruction sets, not tuning flags like fast-15bytenop
    missing = [f for f in codegen.llvm_get_cpu_features(t)
               if f.startswith(isa) and not codegen.llvm_cpu_has_features([f], host)]
    if missing:
        raise UserError(f"--mcpu {name}: this host lacks {', '.join(sorted(missing)[:4])}; "
                        f"give an older CPU model than {codegen.llvm_get_system_cpu()}")


def host_target(cores: int | None = None):
    """The host CPU; `cores` is what MetaSchedule sizes parallel loops for (the fleet's devices have one)."""
    import tvm

    t = {"kind": "llvm", "mcpu": target_cpu()}
    if cores:
        t["num-cores"] = cores
    return tvm.target.Target(t)


def train_module(arch: dict, batch: int = BATCH, lr: float = LR):
    """The SetupTrainer module (backbone, backbone_loss, backbone_loss_adjoint, optimizer) and the initial params."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.training.optimizer import SGD

    from edgetvm.train import trainer_module

    mod = from_onnx(models.to_onnx(arch, batch), keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    f = mod["main"].without_attr("num_input")
    return (trainer_module(f, len(f.params) - 1, batch, models.N_CLASSES, SGD(lr)),
            [p.numpy() for p in params["main"]])


FEATURE_VERSION = 5


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
    """Loop structure of a kernel's TIR: loops, nesting, blocks, spatial/reduction extents, parallel /
    vectorized / unrolled loops, auto-unroll depth, buffers staged inside the kernel (cache stages), and
    the access pattern of the innermost loop of its biggest block: extent, largest stride of a read along
    it, and how far that strided stream overflows L1 and L2 (set conflicts included)."""
    import tvm

    feats = {"n_loops": 0, "loop_depth": 0, "n_blocks": 0, "spatial_extent": 0.0, "reduce_extent": 0.0,
             "max_extent": 1, "n_parallel": 0, "n_vectorized": 0, "n_unrolled": 0, "auto_unroll": 0,
             "n_cache_stages": 0,
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
            kind = int(stmt.kind)  # a plain int in 0.27, not an enum with a name
            feats["n_parallel"] += kind == int(tvm.tirx.ForKind.PARALLEL)
            feats["n_vectorized"] += kind == int(tvm.tirx.ForKind.VECTORIZED)
            feats["n_unrolled"] += kind == int(tvm.tirx.ForKind.UNROLLED)
            step = (stmt.annotations or {}).get("pragma_auto_unroll_max_step")
            feats["auto_unroll"] = max(feats["auto_unroll"], ext_of(step) if step is not None else 0)
            feats["loop_depth"] = max(feats["loop_depth"], d + 1)
            walk(stmt.body, d + 1)
        elif cls == "SeqStmt":
            for x in stmt.seq:
                walk(x, d)
        elif cls == "SBlockRealize":
            walk(stmt.block, d)
        elif cls == "SBlock":
            feats["n_cache_stages"] += len(stmt.alloc_buffers)  # e.g. a tuned matmul's local accumulator
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


def kernel_features(lowered, tuned_s: dict[str, float] | None = None) -> dict[str, dict]:
    """Static features of every TIR kernel in a lowered module; `tuned` is 1 where MetaSchedule's
    database gave the kernel its schedule, `tune_s` the latency tuning measured for that schedule
    (`tuned_latencies`; 0 where there is none)."""
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
        tuned = int(bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False)))
        out[name] = {"kind": kind, "n_fused": nfused, "flops": flops, "bytes": total, "out_bytes": outb,
                     "n_args": len(shapes), "shapes": shapes, "tuned": tuned,
                     "tune_s": float((tuned_s or {}).get(name, 0.0)) if tuned else 0.0, **_loop_features(func)}
    return out


def tuned_latencies(tasks, target, database) -> dict[str, float]:
    """Kernel name -> the latency MetaSchedule measured for the schedule the database applies to it
    (median of its runs, this host, one thread): what the tuner already knows about the kernel it
    picked, the way LATTE profiles each kernel algorithm once."""
    out = {}
    for task in tasks:
        with target:
            rec = database.query_tuning_record(task.dispatched[0], target, "main")
        if rec is not None and rec.run_secs:
            out[task.task_name] = float(np.median([float(x) for x in rec.run_secs]))
    return out


def cache_dir(arch: dict, width: float, batch: int = BATCH, schedule: str = "default") -> Path:
    import tvm

    key = {"arch": models.sub_arch(arch, width), "batch": batch, "lr": LR, "tvm": tvm.__version__,
           "cpu": target_cpu(), "v": 3}
    if schedule != "default":
        key.update(schedule=schedule, trials=TUNE_TRIALS)
    return CACHE / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _fuse(mod, target):
    """Legalized and fused, unscheduled: where MetaSchedule's tasks are and its database applies."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    with target:
        return tvm.transform.Sequential(cpu.library_dispatch_passes(target) + cpu.legalize_passes(target))(mod)


def _lower(fused, target, database=None):
    """The rest of TVM's default CPU pipeline, with the database's schedules applied first."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    with target:
        if database is not None:
            with database:
                fused = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused)
        return tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(fused)


def tuning_tasks(fused, target) -> list:
    """MetaSchedule's tasks for the step's matmul and conv kernels: where a schedule decides the time."""
    from tvm.s_tir import meta_schedule as ms

    return [t for t in ms.relax_integration.extract_tasks(fused, target) if op_kind(t.task_name)[0] in TUNED_KINDS]


def tune_step(tasks, target, db_dir: Path, trials: int | None = None, seed: int = 0):
    """Tune the step's matmul and conv `tasks` (`tuning_tasks`) on this host (one thread, as the fleet's
    single-core devices run them) into a JSON database in `db_dir`; returns the database."""
    import platform
    import tempfile
    import threading

    from tvm.s_tir import meta_schedule as ms

    from edgetvm import tuning

    trials = trials or TUNE_TRIALS
    db = ms.database.JSONDatabase(work_dir=str(db_dir))
    if not tasks:
        return db
    tuning.check_environment()
    tuning.load_tensor_intrinsics(platform.machine())
    tuning.reset_metaschedule_logging()  # the progress bar is the console's; logs go to the temp dir
    old = os.environ.get("TVM_NUM_THREADS")
    os.environ["TVM_NUM_THREADS"] = "1"  # inherited by the runner's worker processes
    try:
        with tempfile.TemporaryDirectory(prefix="latte-tune-") as work:
            builder = tuning.make_builder("", Path(work), threading.Event())
            runner = tuning.make_runner(None, None, None, 60)
            # A small population: MetaSchedule's 512 is sized for thousands of trials.
            strategy = ms.search_strategy.EvolutionarySearch(population_size=64, init_measured_ratio=0.1)
            ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                tasks, work, strategy=strategy, num_threads=2, seed=seed)
            tuning.quiet_metaschedule_console()
            ms.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=work, max_trials_global=trials * len(tasks),
                          max_trials_per_task=trials, num_trials_per_iter=8, builder=builder, runner=runner,
                          database=db)
            pool = getattr(runner, "pool", None)
            if pool is not None:
                pool.shutdown(wait=True)
    finally:
        if old is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = old
    return db


def _target_for(schedule: str):
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    return host_target(cores=1) if schedule == "tuned" else host_target()


def compile_trainer(arch: dict, width: float, batch: int = BATCH, schedule: str = "default") -> Path:
    """Compile (or reuse) the training step of `arch` at `width` with `schedule`; returns the directory."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    d = cache_dir(arch, width, batch, schedule)
    if (d / "meta.json").exists():
        return d
    sub = models.sub_arch(arch, width)
    tm, params = train_module(sub, batch)
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    lowered, tuned_s = _lowered_step(tm, schedule, tmp / "tuning", tune=True)
    ex = tvm.compile(lowered, _target_for(schedule), relax_pipeline=None)
    ex.export_library(str(tmp / "train.so"))
    np.savez(tmp / "init.npz", *params)
    np.savez(tmp / "optim.npz", *[s.numpy() for s in tm.attrs["optim_state"]])
    meta = {"arch": sub, "batch": batch, "lr": LR, "n_params": len(params), "schedule": schedule,
            "param_bytes": models.param_bytes(sub), "flops_per_sample": models.flops_per_sample(sub),
            "kernels": kernel_features(lowered, tuned_s), "feature_version": FEATURE_VERSION}
    (tmp / "meta.json").write_text(json.dumps(meta))
    meta["calls"] = count_calls(tmp)
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        tmp.rename(d)
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return d


def lowered_module(arch: dict, batch: int = BATCH, schedule: str = "default", d: Path | None = None):
    """The training module as compile_trainer lowers it, kernels named alike; a tuned step's schedules
    come from the database in its directory `d`."""
    return _lowered_and_latencies(arch, batch, schedule, d)[0]


def step_kernel_features(arch: dict, batch: int = BATCH, schedule: str = "default", d: Path | None = None) -> dict:
    """Kernel features of a compiled step, from its lowering again (and a tuned step's database in `d`)."""
    return kernel_features(*_lowered_and_latencies(arch, batch, schedule, d))


def _lowered_and_latencies(arch: dict, batch: int, schedule: str, d: Path | None):
    tm, _ = train_module(arch, batch)
    return _lowered_step(tm, schedule, Path(d) / "tuning" if d is not None else None)


def _lowered_step(tm, schedule: str, db_dir: Path | None, tune: bool = False):
    """(the lowered training module, tuned kernel -> tuning latency or None); a tuned step's schedules
    come from the database in `db_dir`, tuned into it first when `tune`."""
    from tvm.s_tir import meta_schedule as ms

    target = _target_for(schedule)
    fused = _fuse(tm.without_attr("optim_state"), target)
    if schedule != "tuned":
        return _lower(fused, target), None
    tasks = tuning_tasks(fused, target)
    if tune:
        db_dir.mkdir(exist_ok=True)
        tune_step(tasks, target, db_dir)
    database = ms.database.JSONDatabase(work_dir=str(db_dir))  # from its files, as a later lowering reads it
    return _lower(fused, target, database), tuned_latencies(tasks, target, database)


def load_meta(d: Path) -> dict:
    """meta.json of a compiled step; kernel features written by an older version are recomputed (the
    kernels and their names come from the same lowering, so the library itself is kept)."""
    d = Path(d)
    meta = json.loads((d / "meta.json").read_text())
    meta.setdefault("schedule", "default")  # steps compiled before there were tuned ones
    if meta.get("feature_version") != FEATURE_VERSION:
        meta["kernels"] = step_kernel_features(meta["arch"], meta["batch"], meta["schedule"], d)
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
