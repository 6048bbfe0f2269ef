"""Measure compiled training steps inside a device profile's cgroup.

The parent compiles every (architecture, width, schedule) once (training.compile_trainer), then per profile
starts `python -m edgetvm.latte.measure SPEC OUT`: the child loads the libraries and warms up
outside the limits, moves itself into the profile's cpu/cpuset/memory cgroups, and times each
model's steps there:

* the whole step, uninstrumented: wall time (what a round waits for) and the CPU time of the thread
  that runs it, over several windows;
* every kernel and VM builtin through `vm.set_instrument`, in *CPU time of the calling thread*
  (`time.thread_time`): under a CFS quota a kernel that runs when the quota runs out would otherwise
  be charged the whole throttled rest of the period (up to 9 ms at 10% of a core), which lands on
  random kernels.

Default-schedule kernels are single-threaded. Tuned ones have parallel loops, which a device with
two cores runs on TVM's thread pool: the calling thread does its share and then spins until the
workers are done, so its CPU time is the kernel's elapsed time on an unthrottled core (mlp-a tuned
on 2 threads: kernels 318.7 us thread CPU, 323.0 us wall, 651.9 us process CPU, whose other half
is the worker's work and spinning). The process's CPU time is kept as well (`process_cpu_step_s`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# The device cgroup's CPU weight against the host's other work (cgroup v1 cpu.shares, default 1024):
# a measurement is the device's own speed, not whatever a concurrent job leaves over. The quota
# still caps it.
CPU_SHARES = 65536
# Whole-step windows per model and process. This host's speed wanders on every time scale: on an idle,
# pinned core, 20 ms windows of one step spread 6-10% (CV), 100 ms windows still 3-10%, and the 5
# windows of a device process 11% (profile of 2026-12-03, Zen 4 VM). 15 windows of a third the length
# and at least one step on every device made it worse: steps differed 22% between processes (phone-hi
# 48%, phone-mid 39%), 9.2% with 5. Measured on one subset (3 architectures, 20 steps, 9 devices):
# 5 windows 9.0%; 15 windows of at least 2 steps where the device is never throttled, and where it is,
# as many as last MIN_PERIODS CFS periods each (at least 5): 8.6% (phone-hi 11.3% -> 6.0%, iot-gw
# 6.0% -> 14.3%; one run each, so within noise overall). The total time stays the same.
MIN_WINDOWS, MAX_WINDOWS, MIN_PERIODS = 5, 15, 10
TRIM = 0.2  # share of windows dropped at each end


def windows_for(profile, min_time: float, period_s: float) -> int:
    """Whole-step windows per model for a device measured `min_time` CPU seconds per model."""
    if profile.cpu_quota >= profile.cpus:
        return MAX_WINDOWS
    wall = min_time / min(profile.speed, 1.0)
    return int(min(MAX_WINDOWS, max(MIN_WINDOWS, wall // (MIN_PERIODS * period_s))))


def _digits_batch(batch: int, kind: str):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    x = (X[:batch] / 16.0).astype("float32")
    if kind == "cnn":
        x = x.reshape(batch, 1, 8, 8)
    return x, y[:batch].astype("int64")


def step_time(windows: list[tuple[int, float, float]]) -> tuple[float, float]:
    """(wall, cpu) seconds per step from (steps, wall, cpu) windows: the wall time is the trimmed mean
    (the fastest and slowest TRIM of the windows dropped, so that bursts of host load or badly placed
    CFS periods do not count), the CPU time the total."""
    per = sorted(w / k for k, w, _ in windows)
    cut = int(len(per) * TRIM) if len(per) >= 5 else (1 if len(per) >= 4 else 0)
    keep = per[cut:len(per) - cut]
    steps = sum(k for k, _, _ in windows)
    return float(np.mean(keep)), float(sum(c for _, _, c in windows) / steps)


def calibrate(runner, windows: int = 7, min_cpu: float = 0.02) -> float:
    """CPU seconds of one step of the reference step on this host, outside any device limit: the fastest
    of several windows (interference only ever slows a window down). The cost model keeps absolute
    times in this unit, so it carries to a machine whose cores are faster or slower."""
    cpu = time.thread_time
    runner.step()
    best = float("inf")
    for _ in range(windows):
        k, c0 = 0, cpu()
        while k < 2 or cpu() - c0 < min_cpu:
            runner.step()
            k += 1
        best = min(best, (cpu() - c0) / k)
    return best


def host_record(ref_step_s: float) -> dict:
    """What the cost model needs to know about the machine: its reference-step time and its caches."""
    from edgetvm.latte.training import cache_geometry, target_cpu

    return {"ref_step_s": ref_step_s, **cache_geometry(), "cpu": target_cpu()}


def child(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ["TVM_NUM_THREADS"] = str(spec["threads"])
    from edgetvm.latte.training import StepRunner

    host = None
    if spec.get("reference"):
        ref = StepRunner(Path(spec["reference"]))
        ref.set_batch(*_digits_batch(ref.meta["batch"], ref.meta["arch"]["kind"]))
        host = host_record(calibrate(ref))
        del ref

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
    clock = time.perf_counter
    cpu = time.thread_time
    pcpu = time.process_time
    # The whole-step windows go round the models, so each model's windows are spread over the whole
    # process: this host's speed drifts by +-25% over seconds, and one model's windows taken back to
    # back all land in the same stretch. One unmeasured step first brings the model back into cache
    # (a device trains one model continuously).
    windows: list[list] = [[] for _ in runners]
    process: list[float] = [0.0 for _ in runners]
    windows_n = spec.get("windows", MIN_WINDOWS)
    for _ in range(windows_n):
        for i, ((item, r), ws) in enumerate(zip(runners, windows)):
            r.step()
            k, t0, c0, p0 = 0, clock(), cpu(), pcpu()
            while k < max(1, spec["min_steps"] // 2) or clock() - t0 < spec["min_time"] / windows_n:
                r.step()
                k += 1
            ws.append((k, clock() - t0, cpu() - c0))
            process[i] += pcpu() - p0
    # Per kernel, CPU time of the calling thread, also taken round the models.
    stack: list[float] = []
    accs: list[dict] = [{} for _ in runners]
    instr = [[0, 0.0, 0.0] for _ in runners]  # steps, wall, cpu

    def instrument_into(acc):
        def instrument(func, symbol, before, ret, *args):
            if before:
                stack.append(cpu())
            else:
                dt = cpu() - stack.pop()
                a = acc.setdefault(symbol, [0, 0.0])
                a[0] += 1
                a[1] += dt
            return 0
        return instrument

    for _ in range(MIN_WINDOWS):
        for (item, r), acc, tot in zip(runners, accs, instr):
            r.step()
            r.vm.set_instrument(instrument_into(acc))
            m, t1, c1 = 0, clock(), cpu()
            while m < max(1, spec["min_steps"] // MIN_WINDOWS) or cpu() - c1 < spec["instr_cpu_time"] / MIN_WINDOWS:
                r.step()
                m += 1
            tot[0] += m
            tot[1] += clock() - t1
            tot[2] += cpu() - c1
            r.vm.set_instrument(None)
    results = []
    for (item, r), ws, acc, (m, wall, cpu_s), proc_s in zip(runners, windows, accs, instr, process):
        step_s, cpu_step_s = step_time(ws)
        results.append({"arch_name": item["arch_name"], "width": item["width"],
                        "schedule": item.get("schedule", "default"), "dir": item["dir"],
                        "step_s": step_s, "cpu_step_s": cpu_step_s,
                        "process_cpu_step_s": proc_s / sum(k for k, _, _ in ws),
                        "window_step_s": [w / k for k, w, _ in ws],
                        "instrumented_step_s": wall / m, "instrumented_cpu_s": cpu_s / m,
                        "steps": sum(k for k, _, _ in ws), "clock": "thread_cpu",
                        "kernels": {s: {"calls": c / m, "time_s": t / m} for s, (c, t) in acc.items()}})
    peak = int((mem / "memory.max_usage_in_bytes").read_text())
    Path(out_path).write_text(json.dumps({"results": results, "cgroup_peak_bytes": peak, "host": host}))


def measure_profile(profile, models: list[dict], min_time: float = 0.25, min_steps: int = 5,
                    timeout: float = 900, reference: str | None = None) -> dict:
    """Run the models' steps as `profile` (in its cgroup); models are {"arch_name", "width", "schedule", "dir"}.

    `min_time` is CPU seconds of whole steps per model: a device at 10% of a core takes 10x as long
    in wall time. Per-kernel times need no long windows (CPU time is not throttled): a quarter of it."""
    import tempfile

    from edgetvm.latte.devices import PERIOD_US, DeviceCgroup

    with tempfile.TemporaryDirectory(prefix="latte-") as tmp, DeviceCgroup(profile) as cg:
        try:
            (cg.cg.cpu / "cpu.shares").write_text(str(CPU_SHARES))
        except OSError:
            pass
        spec = {"models": models, "cgroup": cg.paths, "threads": len(cg.cpus),
                "min_time": min_time / min(profile.speed, 1.0), "min_steps": min_steps,
                "instr_cpu_time": min_time / 4, "reference": reference,
                "windows": windows_for(profile, min_time, PERIOD_US / 1e6)}
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
