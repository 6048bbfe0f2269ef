"""Measured memory of an adaptation step: its peak RSS (page cache included) in a cgroup of its own.

The step is compiled here into a shared library (no compiler in the measured process), with its inputs, into
a directory; a fresh process (`python -m edgetvm.adapt.measure DIR`) inside a cgroup (runtime/cgroup.py)
loads it and runs `steps` steps. The same process with --idle loads everything and runs no step: the
step's dynamic memory is the difference of the two peaks.

    d = export(model, batch, mask, rates, params, x, y, "/tmp/step")       # or kind="full": TVM's Gradient step
    peak, idle = measure(d, steps=3)                                        # bytes charged to each cgroup
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MIB = 1 << 20


def export(model, batch: int, mask: dict | None, rates, params: dict, x: np.ndarray, y: np.ndarray, out,
           kind: str = "masked", conv_as_matmul: bool = True, target=None, mask_bits: int = 1) -> Path:
    """Compile a step into `out`/step.so with its inputs (arrays.npz) and how to call it (meta.json)."""
    from edgetvm import train
    from edgetvm.adapt import step as st
    from edgetvm.passes import pipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(train.param_shapes(model))
    if kind == "masked":
        mask = st.check_mask(model, mask)
        lr = {n: np.asarray(rates[n], np.float32).reshape(-1)[mask[n]] for n in mask} if isinstance(rates, dict) \
            else float(rates)
        mod = st.step_module(model, batch, mask, lr, "update", conv_as_matmul, mask_bits)
        func, updated = "adapt_step", [n for n in names if n in mask]
        idx = {n: np.flatnonzero(mask[n]).tolist() for n in updated}
    elif kind == "full":
        mod = st.full_step_module(model, batch, conv_as_matmul)
        func, updated, idx = "backbone_loss_adjoint", names, {}
    else:
        raise ValueError(kind)
    ex = pipeline.build(mod, target or train.host_target())
    ex.export_library(str(out / "step.so"))
    np.savez(out / "arrays.npz", x=np.asarray(x, np.float32), y=np.asarray(y, np.int64),
             **{f"param/{n}": np.asarray(params[n], np.float32) for n in names})
    lr_out = float(rates) if not isinstance(rates, dict) else None
    (out / "meta.json").write_text(json.dumps({"kind": kind, "func": func, "names": names, "updated": updated,
                                               "index": idx, "lr": lr_out if lr_out is not None else 0.0}))
    return out


def run_dir(path, steps: int, idle: bool = False) -> dict:
    """Load and run an exported step (the measured process's work)."""
    import resource

    import tvm
    from tvm import relax

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    lib = tvm.runtime.load_module(str(path / "step.so"))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    f = vm[meta["func"]]
    with np.load(path / "arrays.npz") as z:
        x, y = tvm.runtime.tensor(z["x"]), tvm.runtime.tensor(z["y"])
        params = {n: z[f"param/{n}"] for n in meta["names"]}
    tensors = {n: tvm.runtime.tensor(a) for n, a in params.items()}
    losses = []
    for _ in range(0 if idle else steps):
        if meta["kind"] == "masked":
            out = f(x, y, *[tensors[n] for n in meta["names"]])
            for i, n in enumerate(meta["updated"]):
                new = out[i + 1].numpy()
                w = params[n]
                idx = meta["index"][n]
                if w.ndim == 4:
                    w[:, idx] = new
                else:
                    w[idx] = new
                tensors[n] = tvm.runtime.tensor(w)
        else:   # TVM's step returns (loss, gradients of every parameter); SGD on the host
            loss_grads = f(x, *[tensors[n] for n in meta["names"]], y)
            out = [loss_grads[0], *list(loss_grads[1])]
            lr = meta["lr"] or 0.1
            for i, n in enumerate(meta["names"]):
                params[n] = params[n] - lr * out[i + 1].numpy()
                tensors[n] = tvm.runtime.tensor(params[n])
        losses.append(float(out[0].numpy()))
        del out
    return {"losses": losses, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def measure(path, steps: int = 3, limit: int | None = None, timeout: float = 300) -> dict:
    """{"peak", "idle"} bytes charged to a fresh cgroup by the step run and by the idle run (no limit), or with
    `limit` only the step run under that memory limit: {"peak", "killed", "returncode"}."""
    from edgetvm.runtime import cgroup

    reason = cgroup.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"cannot measure in a cgroup here: {reason}")
    argv = [sys.executable, "-m", "edgetvm.adapt.measure", str(path), "--steps", str(steps)]
    env = dict(os.environ, TVM_NUM_THREADS=os.environ.get("TVM_NUM_THREADS", "1"))
    if limit is not None:
        with cgroup.Cgroup(memory_bytes=limit) as cg:
            p = cg.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
            return {"peak": cg.max_usage, "killed": p.returncode != 0 and cg.oom_kills >= 1,
                    "returncode": p.returncode, "stderr": p.stderr[-500:]}
    # Page cache is charged to the cgroup that first reads a page: an unmeasured warm-up run reads every file
    # (Python modules, TVM, the step) first, so neither measured run pays for them and the difference of the
    # two peaks is the step's own memory (the first idle run in a bench once came out 5 MiB above the step).
    warm = subprocess.run(argv + ["--idle"], capture_output=True, text=True, timeout=timeout, env=env)
    if warm.returncode != 0:
        raise RuntimeError(f"the measured step failed to load: {warm.stderr[-1000:]}")
    out = {}
    for mode, extra in (("idle", ["--idle"]), ("peak", [])):
        with cgroup.Cgroup() as cg:
            p = cg.run(argv + extra, capture_output=True, text=True, timeout=timeout, env=env)
            if p.returncode != 0:
                raise RuntimeError(f"the measured step failed: {p.stderr[-1000:]}")
            out[mode] = cg.max_usage
            out[f"{mode}_run"] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edgetvm.adapt.measure")
    ap.add_argument("dir")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--idle", action="store_true")
    a = ap.parse_args(argv)
    print(json.dumps(run_dir(a.dir, a.steps, a.idle)))


if __name__ == "__main__":
    main()
