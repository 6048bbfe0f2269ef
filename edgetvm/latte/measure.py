"""Measure compiled training steps inside a device profile's cgroup.

The parent compiles every (architecture, width) once (training.compile_trainer), then per profile
starts `python -m edgetvm.latte.measure SPEC OUT`: the child loads the libraries and warms up
outside the limits, moves itself into the profile's cpu/cpuset/memory cgroups, and times each
model's steps there: per kernel through `vm.set_instrument`, and the whole step uninstrumented.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _digits_batch(batch: int, kind: str):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    x = (X[:batch] / 16.0).astype("float32")
    if kind == "cnn":
        x = x.reshape(batch, 1, 8, 8)
    return x, y[:batch].astype("int64")


def child(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ["TVM_NUM_THREADS"] = str(spec["threads"])
    from edgetvm.latte.training import StepRunner

    runners = []
    for item in spec["models"]:
        r = StepRunner(Path(item["dir"]))
        x, y = _digits_batch(r.meta["batch"], r.meta["arch"]["kind"])
        r.set_batch(x, y)
        for _ in range(2):
            r.step()
        runners.append((item, r))
    # From here on this process runs as the emulated device.
    for path in spec["cgroup"].values():
        Path(path, "cgroup.procs").write_text(str(os.getpid()))
    mem = Path(spec["cgroup"]["memory"])
    (mem / "memory.max_usage_in_bytes").write_text("0")
    results = []
    for item, r in runners:
        r.step()  # settle into the quota
        # whole steps, uninstrumented: the median of 5 windows, so that a burst of load from other
        # processes on the host does not count as the device's speed
        windows, n = [], 0
        for _ in range(5):
            k, t0 = 0, time.perf_counter()
            while k < max(1, spec["min_steps"] // 2) or time.perf_counter() - t0 < spec["min_time"] / 5:
                r.step()
                k += 1
            windows.append((time.perf_counter() - t0) / k)
            n += k
        step_s = float(np.median(windows))
        # per kernel
        acc: dict[str, list] = {}
        stack: list[float] = []

        def instrument(func, symbol, before, ret, *args):
            if before:
                stack.append(time.perf_counter())
            else:
                dt = time.perf_counter() - stack.pop()
                a = acc.setdefault(symbol, [0, 0.0])
                a[0] += 1
                a[1] += dt
            return 0

        r.vm.set_instrument(instrument)
        m, t1 = 0, time.perf_counter()
        while m < spec["min_steps"] or time.perf_counter() - t1 < spec["min_time"] / 2:
            r.step()
            m += 1
        instr_step_s = (time.perf_counter() - t1) / m
        r.vm.set_instrument(None)
        results.append({**{k: item[k] for k in ("arch_name", "width")}, "dir": item["dir"],
                        "step_s": step_s, "instrumented_step_s": instr_step_s, "steps": n,
                        "kernels": {s: {"calls": c / m, "time_s": t / m} for s, (c, t) in acc.items()}})
    peak = int((mem / "memory.max_usage_in_bytes").read_text())
    Path(out_path).write_text(json.dumps({"results": results, "cgroup_peak_bytes": peak}))


def measure_profile(profile, models: list[dict], min_time: float = 0.25, min_steps: int = 5,
                    timeout: float = 900) -> dict:
    """Run the models' steps as `profile` (in its cgroup); models are {"arch_name", "width", "dir"}."""
    import tempfile

    from edgetvm.latte.devices import DeviceCgroup

    with tempfile.TemporaryDirectory(prefix="latte-") as tmp, DeviceCgroup(profile) as cg:
        # the same CPU time per measurement on every device: throttled devices measure longer
        spec = {"models": models, "cgroup": cg.paths, "threads": len(cg.cpus),
                "min_time": min_time / min(profile.speed, 1.0), "min_steps": min_steps}
        sp, op = Path(tmp, "spec.json"), Path(tmp, "out.json")
        sp.write_text(json.dumps(spec))
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "edgetvm.latte.measure", str(sp), str(op)],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not op.exists():
            oom = cg.cg.oom_kills
            raise RuntimeError(f"measuring on {profile.name} failed (exit {proc.returncode}"
                               f"{', OOM-killed' if oom else ''}): {proc.stderr.strip()[-400:]}")
        out = json.loads(op.read_text())
        out["throttled_s"] = cg.throttled_us() / 1e6
        out["wall_s"] = time.time() - t0
        return out


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
