"""Measure compiled training steps on a real board over TVM RPC (direct or through a tracker).

The same steps as on the emulated fleet, built for the board's target with its cross compiler:
the whole step (the adjoint, then SGD) and every kernel are timed on the board by TVM's
`time_evaluator`, which runs the loop there, so the network is not in the figures. The VM's
instrument hook cannot cross RPC, so kernels are timed one by one from a library of the same
lowered kernels; a step's count of calls to each comes from the host build (same lowering, same
kernel names). A board runs nothing else, so CPU time and wall time are one figure.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError
from edgetvm.latte import training
from edgetvm.latte.devices import Profile


def _with_flat_optimizer(tm):
    """Adds `optimizer_flat(params..., grads..., states...)`: RPC cannot pass the tuples `optimizer` takes."""
    import tvm
    from tvm import relax

    opt = relax.utils.copy_with_new_vars(tm["optimizer"])  # a Var may be defined in one function only
    flat = [[relax.Var(f"{tag}{i}", t) for i, t in enumerate(p.ty.fields)] for tag, p in zip("pgs", opt.params)]
    # The old tuple parameters become bindings of tuples of the new flat ones.
    head = relax.BindingBlock([relax.VarBinding(p, relax.Tuple(g)) for p, g in zip(opt.params, flat)])
    body = relax.SeqExpr([head, *opt.body.blocks], opt.body.body)
    func = relax.Function([v for g in flat for v in g], body, opt.ret_ty, opt.is_pure)
    out = tvm.IRModule(dict(tm.functions), attrs=tm.attrs)
    out["optimizer_flat"] = func.with_attr("global_symbol", "optimizer_flat")
    return relax.transform.Normalize()(out)


def compile_for_board(meta: dict, board, cache: Path) -> Path:
    """The training step of `meta["arch"]` built for `board`: train.so (VM) and kernels.so (its kernels alone)."""
    import tvm
    from tvm import relax

    from edgetvm.passes import pipeline

    key = json.dumps({"arch": meta["arch"], "batch": meta["batch"], "board": board.name,
                      "target": str(board.target()), "v": 1}, sort_keys=True)
    d = cache / board.name / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (d / "done").exists():
        return d
    tm, _ = training.train_module(meta["arch"], meta["batch"])
    target = board.target()
    lowered = relax.get_default_pipeline(target)(_with_flat_optimizer(tm.without_attr("optim_state")))
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    pipeline.export(tvm.compile(lowered, target, relax_pipeline=None), str(tmp / "train.so"), board.cross_compiler)
    kernels = tvm.IRModule({gv: f for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)})
    pipeline.export(tvm.compile(kernels, target), str(tmp / "kernels.so"), board.cross_compiler)
    sig = {gv.name_hint: [([int(s) for s in p.ty.shape], str(p.ty.dtype)) for p in f.params]
           for gv, f in kernels.functions.items()}
    (tmp / "kernels.json").write_text(json.dumps(sig))
    (tmp / "done").write_text("")
    try:
        tmp.rename(d)
    except OSError:  # another process built it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return d


def time_on_board(mod, name: str, dev, seconds: float, *args) -> list[float]:
    """Seconds per call of `mod[name]`, 3 repeats timed on the board, each of enough calls to last `seconds`."""
    probe = mod.time_evaluator(name, dev, number=1, repeat=1)(*args).mean
    number = max(1, int(seconds / max(probe, 1e-6)))
    return [float(t) for t in mod.time_evaluator(name, dev, number=number, repeat=3)(*args).results]


def measure_board(profile: Profile, compiled: list[dict], session, board, min_time: float = 0.1,
                  cache: Path | None = None, log=None) -> dict:
    """Time each compiled model's step and kernels on the board behind `session`; the shape of
    measure.measure_profile's result, so profile_fleet treats a board like any emulated device."""
    import tvm
    from tvm import relax

    cache = cache or training.CACHE / "boards"
    t0 = time.time()
    dev = session.cpu()
    results = []
    for item in compiled:
        meta = training.load_meta(Path(item["dir"]))
        d = compile_for_board(meta, board, cache)
        for name in ("train.so", "kernels.so"):
            session.upload(str(d / name), f"{d.name}-{name}")
        vm = relax.VirtualMachine(session.load_module(f"{d.name}-train.so"), dev)
        init = np.load(Path(item["dir"]) / "init.npz")
        params = [tvm.runtime.tensor(init[f"arr_{i}"], dev) for i in range(len(init.files))]
        optim = np.load(Path(item["dir"]) / "optim.npz")
        states = [tvm.runtime.tensor(optim[f"arr_{i}"], dev) for i in range(len(optim.files))]
        x_shape = (meta["batch"], 1, 8, 8) if meta["arch"]["kind"] == "cnn" else (meta["batch"], training.models.N_IN)
        x = tvm.runtime.tensor(np.random.default_rng(0).random(x_shape, dtype=np.float32), dev)
        y = tvm.runtime.tensor(np.zeros(meta["batch"], "int64"), dev)
        grads = [tvm.runtime.tensor(np.zeros(init[f"arr_{i}"].shape, "float32"), dev) for i in range(len(params))]

        adj = time_on_board(vm, "backbone_loss_adjoint", dev, min_time / 3, x, *params, y)
        opt = time_on_board(vm, "optimizer_flat", dev, min_time / 3, *params, *grads, *states)
        steps = [a + o for a, o in zip(adj, opt)]
        lib = session.load_module(f"{d.name}-kernels.so")
        sig = json.loads((d / "kernels.json").read_text())
        calls = meta.get("calls") or {}
        missing = [s for s in calls if s not in sig and not s.startswith("vm.")]
        if missing:
            raise RuntimeError(f"the {board.name} build lacks kernels the host build calls: {missing[:5]}")
        kernels = {}
        for symbol, n in calls.items():
            if symbol not in sig:
                continue  # a VM builtin: part of the step's overhead, as on the emulated fleet
            args = [tvm.runtime.tensor(np.zeros(shape, dtype), dev) for shape, dtype in sig[symbol]]
            kernels[symbol] = {"calls": n, "time_s": n * float(np.median(time_on_board(lib, symbol, dev, min_time / 30, *args)))}
        step = float(np.median(steps))
        results.append({"arch_name": item["arch_name"], "width": item["width"], "dir": item["dir"],
                        "step_s": step, "cpu_step_s": step, "window_step_s": steps,
                        "instrumented_step_s": step, "instrumented_cpu_s": step, "steps": len(steps),
                        "clock": "board", "kernels": kernels})
        if log:
            log(f"{profile.name}: {item['arch_name']} w={item['width']:g} step {step * 1e3:.2f} ms, "
                f"kernels {sum(k['time_s'] for k in kernels.values()) * 1e3:.2f} ms")
    return {"results": results, "cgroup_peak_bytes": 0, "throttled_s": 0.0, "wall_s": time.time() - t0}


def check_board(profile: Profile):
    """The board a profile names, from the registry in targets/."""
    from edgetvm.targets import load_board

    try:
        return load_board(profile.board)
    except UserError as e:
        raise UserError(f"device profile {profile.path}: board '{profile.board}': {e}") from None
