"""Run-time switching between the DRESS subnets of one artifact as the device's budgets change.

An artifact compiled from an `edgetvm dress` model has a data input `subnet` (int32[1]) and, in its
manifest, a "dress" table: per subnet its sparsity, test accuracy and the bytes of weights it reads (a
prefix of each layer's store). All subnets share one library and one (mapped) weight file, so choosing a
subnet is choosing the value of that input: no weight is copied, re-laid out or loaded.

Budget trace (`edgetvm run ART --budget-trace TRACE`): a text file, one budget per line,
    TIME_MS MEMORY_MIB [CPU_SHARE] [xCOUNT]
(the next COUNT inferences, default 1, must each take at most TIME_MS and the model at most MEMORY_MIB of
memory, with CPU_SHARE of the device's full CPU quota, default 1); blank lines and text after '#' are
ignored. Per inference the runner picks the most accurate subnet whose predicted latency and memory fit;
when none fits it runs the smallest and says so. A budget miss is an inference whose measured latency
exceeded its time budget.

On this machine (no `--device`) the run is unconstrained: the predicted latency is measured when the
runner starts (the median of a few calls of each subnet), the memory of a subnet is the weight bytes it
reads (manifest), and a CPU_SHARE other than 1 is refused. With `--device PROFILE` (targets/devices) the
trace is replayed on an emulated device (runtime/dress_device.py): the CPU quota of its cgroup follows
CPU_SHARE line by line, the cgroup's memory limit is MEMORY_MIB, and latency, memory and budget misses are
measured there.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm

from edgetvm.errors import UserError
from edgetvm.runtime.session import Runner

SUBNET_INPUT = "subnet"


@dataclass(frozen=True)
class Budget:
    time_ms: float
    memory_bytes: int
    cpu_share: float = 1.0    # of the device's full CPU quota (its profile's cpu_quota)


FORMAT = "'TIME_MS MEMORY_MIB [CPU_SHARE] [xCOUNT]'"


def parse_trace(path: str | Path) -> list[Budget]:
    """The budgets of a trace file, one per inference (see the module docstring for the format)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--budget-trace {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"--budget-trace {path} line {no}: '{line.strip()}'"
        count = 1
        if len(fields) > 2 and fields[-1].startswith("x"):
            count = _number(fields.pop()[1:], int)
        share = 1.0
        if len(fields) == 3:
            share = _number(fields.pop(), float)
            if share is None or not 0 < share <= 1:
                raise UserError(f"{where}: CPU_SHARE '{line.split('#', 1)[0].split()[2]}' must be a number in "
                                "(0, 1], the share of the device's full CPU quota, e.g. '2.5 8 0.5 x10'")
        t, mem = (_number(f, float) for f in fields) if len(fields) == 2 else (None, None)
        if t is None or mem is None or count is None or count < 1 or not (t > 0 and mem > 0):
            raise UserError(f"{where} is not {FORMAT} with positive numbers, e.g. '2.5 8 x10' or '2.5 8 0.5 x10'")
        out += [Budget(t, int(mem * 2**20), share)] * count
    if not out:
        raise UserError(f"--budget-trace {path} holds no budgets; write lines like '2.5 8 x10' (ms, MiB, repeats)")
    return out


def _number(text: str, kind):
    """`text` as a finite int or float, or None."""
    try:
        v = kind(text)
    except ValueError:
        return None
    return v if np.isfinite(v) else None


@dataclass
class Choice:
    level: int
    fits: bool


class SubnetRunner:
    """One artifact's subnets on this machine: calibrate, choose under a budget, run."""

    def __init__(self, art, weights: str = "map"):
        self.dress = art.manifest.get("dress")
        if not self.dress:
            raise UserError(f"{art.path} has no subnets (compile a model written by `edgetvm dress`); "
                            "--budget-trace applies to DRESS artifacts only")
        self.art = art
        self.runner = Runner(art, weights=weights)
        self.subnets = self.dress["subnets"]
        self.names = [i.name for i in art.inputs]
        self._level_args = [tvm.runtime.tensor(np.array([k], np.int32), self.runner.dev)
                            for k in range(len(self.subnets))]
        self.predicted_ms = [float("nan")] * len(self.subnets)    # at the full CPU quota
        self.first_call_ms = [float("nan")] * len(self.subnets)   # calibration's first call (weights read in)
        # What a subnet needs of the memory budget: the weight bytes it reads, until measured on a device.
        self.memory_bytes = [s["weight_bytes"] for s in self.subnets]

    def args(self, inputs: dict[str, np.ndarray], level: int) -> list:
        """Arguments for subnet `level`: the same weight tensors for every subnet, only `subnet` differs."""
        args = self.runner.args({**inputs, SUBNET_INPUT: np.array([level], np.int32)})
        args[self.names.index(SUBNET_INPUT)] = self._level_args[level]
        return args

    def call(self, args: list) -> np.ndarray:
        return self.runner.call(args)[0].numpy()

    def calibrate(self, inputs: dict[str, np.ndarray], repeat: int = 5, after_first_call=None) -> list[float]:
        """Each subnet's median latency, sparsest first; `after_first_call(k)` runs after subnet k's first
        call (its prefix of the store then touched: runtime/dress_device.py measures its memory there)."""
        for k in reversed(range(len(self.subnets))):
            a = self.args(inputs, k)
            t = time.perf_counter()
            self.call(a)   # warm-up: first touch of its weights
            self.first_call_ms[k] = (time.perf_counter() - t) * 1e3
            if after_first_call is not None:
                after_first_call(k)
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                self.call(a)
                times.append((time.perf_counter() - t) * 1e3)
            self.predicted_ms[k] = statistics.median(times)
        return self.predicted_ms

    def smallest(self) -> int:
        return min(range(len(self.subnets)), key=lambda k: (self.memory_bytes[k], self.predicted_ms[k]))

    def predicted(self, k: int, share: float = 1.0) -> float:
        """Subnet k's latency with `share` of the full CPU quota: the calibration at the full quota scaled
        by 1 / share (compute-bound: the kernels get `share` of the CPU time they had)."""
        return self.predicted_ms[k] / share

    def choose(self, budget: Budget, share: float = 1.0, predicted: list[float] | None = None) -> Choice:
        """The most accurate subnet (ties: the faster) that fits both budgets with `share` of the full CPU
        quota; else the smallest, not fitting. `predicted`: this call's latency of every subnet, when the
        caller predicts per call (runtime/dress_device.py), instead of the calibration scaled by 1 / share."""
        if predicted is None:
            predicted = [self.predicted(k, share) for k in range(len(self.subnets))]
        fit = [k for k in range(len(self.subnets))
               if predicted[k] <= budget.time_ms and self.memory_bytes[k] <= budget.memory_bytes]
        if not fit:
            return Choice(self.smallest(), False)
        return Choice(max(fit, key=lambda k: (self.subnets[k]["accuracy"] or 0.0, -self.predicted_ms[k])), True)


def switch_cost(sr: SubnetRunner, inputs: dict[str, np.ndarray], n: int = 200) -> dict:
    """What switching subnets costs. A call's arguments are the inputs, `subnet` and the weights; a switch
    replaces only `subnet` by another prepared one-element tensor, so its cost is that replacement
    (measured over `n` switches), and the weight tensors every subnet is called with are the very same
    objects (checked: no copy). Also the latency of the first call after a switch against a repeated
    call of the same subnet (caches: the new subnet's prefix of the store may be cold)."""
    args = sr.args(inputs, 0)
    i = sr.names.index(SUBNET_INPUT)
    weights = args[len(sr.names):]
    k = len(sr.subnets)
    t = time.perf_counter()
    for j in range(n):
        args[i] = sr._level_args[j % k]
    per_switch_ms = (time.perf_counter() - t) * 1e3 / n
    shared = all(x is y for level in range(k) for x, y in zip(sr.args(inputs, level)[len(sr.names):], weights))
    after, steady = [], []
    for j in range(2 * k):
        args[i] = sr._level_args[j % k]
        t = time.perf_counter()
        sr.call(args)
        after.append((time.perf_counter() - t) * 1e3 - sr.predicted_ms[j % k])
        t = time.perf_counter()
        sr.call(args)
        steady.append((time.perf_counter() - t) * 1e3 - sr.predicted_ms[j % k])
    return {"switch_ms": per_switch_ms, "weights_shared": shared,
            "first_call_extra_ms": statistics.median(after) - statistics.median(steady)}


def run_trace(sr: SubnetRunner, inputs: dict[str, np.ndarray], trace: list[Budget]) -> dict:
    """Each budget of the trace in turn: choose, run, time. Returns the records and a summary."""
    records = []
    for b in trace:
        c = sr.choose(b)
        a = sr.args(inputs, c.level)
        t = time.perf_counter()
        sr.call(a)
        ms = (time.perf_counter() - t) * 1e3
        records.append({"level": c.level, "fits": c.fits, "ms": ms, "budget_ms": b.time_ms,
                        "miss": ms > b.time_ms})
    fitting = [r for r in records if r["fits"]]
    acc = [sr.subnets[r["level"]]["accuracy"] for r in records]
    return {"records": records, "inferences": len(records),
            "no_fit": len(records) - len(fitting),
            "misses_where_fitting": sum(r["miss"] for r in fitting),
            "misses": sum(r["miss"] for r in records),
            "accuracy": float(np.mean(acc)) if all(a is not None for a in acc) else None,
            "used": [sum(r["level"] == k for r in records) for k in range(len(sr.subnets))]}


def cmd_budget_trace(art, args) -> None:
    """`edgetvm run ART --budget-trace TRACE [--device PROFILE]`: the per-inference switching of the module
    docstring, here or on an emulated device."""
    from edgetvm.compiler import random_inputs

    trace = parse_trace(args.budget_trace)
    device = getattr(args, "device", None)
    if device is None and any(b.cpu_share != 1 for b in trace):
        raise UserError(f"--budget-trace {args.budget_trace} sets CPU shares: give --device PROFILE (targets/devices, "
                        "e.g. --device phone-hi) to replay it on an emulated device whose CPU quota follows them")
    if device is not None:
        from edgetvm.latte.devices import load_profile

        device = load_profile(device)
        if not art.manifest.get("dress"):
            raise UserError(f"{art.path} has no subnets (compile a model written by `edgetvm dress`); "
                            "--budget-trace applies to DRESS artifacts only")
    data = [i for i in art.inputs if i.name != SUBNET_INPUT]
    from edgetvm.cli import _load_inputs

    inputs = _load_inputs(args.input, data)
    if not inputs:
        inputs = random_inputs(data, args.seed)
        print(f"no --input given: using random inputs (seed {args.seed})")
    if device is not None:
        return _budget_trace_on_device(art, device, inputs, trace)
    sr = SubnetRunner(art, weights=args.weights)
    pred = sr.calibrate(inputs)
    print(f"subnets of {art.path} (predicted latency measured now on this machine):")
    for k, s in enumerate(sr.subnets):
        acc = "?" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%"
        print(f"  subnet {k}: sparsity {s['sparsity']:.0%}  accuracy {acc}  weights {s['weight_bytes'] / 2**20:.3f} MiB"
              f"  {pred[k]:.3f} ms")
    res = run_trace(sr, inputs, trace)
    if res["no_fit"]:
        print(f"  {res['no_fit']} of {res['inferences']} budgets fit no subnet: ran the smallest (subnet "
              f"{sr.smallest()}) for those")
    sc = switch_cost(sr, inputs)
    acc = "?" if res["accuracy"] is None else f"{100 * res['accuracy']:.2f}%"
    print(f"  {res['inferences']} inferences: subnets used {res['used']}, mean accuracy delivered {acc}, "
          f"budget misses {res['misses_where_fitting']} where a subnet fit (+{res['misses'] - res['misses_where_fitting']} "
          f"where none did)")
    _print_switch(sc)


def _print_switch(sc: dict) -> None:
    print(f"  switching: {1e3 * sc['switch_ms']:.2f} us per switch, weights shared by every subnet "
          f"({'no copy' if sc['weights_shared'] else 'COPIED'}); first call after a switch "
          f"{sc['first_call_extra_ms']:+.3f} ms against a repeated call (noisy)")


def _budget_trace_on_device(art, profile, inputs: dict, trace: list[Budget]) -> None:
    from edgetvm.runtime.dress_device import HEADROOM_BYTES, DeviceWorker, summarize

    with DeviceWorker(profile, "dress", [art.path], inputs) as dev:
        print(f"emulated device {profile.name} ({profile.description}): {len(dev.device.cpus)} CPU(s), quota "
              f"{dev.full_quota_us / dev.period_us:g} CPU(s) per {dev.period_us / 1000:g} ms period at CPU share 1, "
              f"memory limit = each line's MEMORY_MIB", flush=True)
        cal = dev.calibrate()
        print(f"subnets of {art.path} (measured on the device at its full quota; per call, a subnet is predicted "
              "at that speed if it fits in the CFS period's quota left, else with the wait for the next period, "
              f"plus its evicted weight pages at {cal['page_in_ms']:.3f} ms each (measured)):", flush=True)
        for k, s in enumerate(cal["subnets"]):
            acc = "?" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%"
            print(f"  subnet {k}: sparsity {s['sparsity']:.0%}  accuracy {acc}  weights {s['weight_bytes'] / 2**20:.3f} MiB"
                  f"  memory measured {cal['memory_bytes'][k] / 2**20:.3f} MiB  {cal['predicted_ms'][k]:.3f} ms",
                  flush=True)
        run = dev.replay(trace)
        sc = dev.switch_cost()
    res = summarize(run, [s["accuracy"] for s in cal["subnets"]])
    smallest = min(range(len(cal["subnets"])), key=lambda k: (cal["memory_bytes"][k], cal["predicted_ms"][k]))
    if res["no_fit"]:
        print(f"  {res['no_fit']} of {res['inferences']} budgets fit no subnet: ran the smallest (subnet "
              f"{smallest}) for those; {res['no_fit_where_mean_fit']} of them only at that call (the period's quota "
              "spent, or weight pages evicted), by the calibration scaled by 1 / share one would have")
    acc = "?" if res["accuracy"] is None else f"{100 * res['accuracy']:.2f}%"
    print(f"  {res['inferences']} inferences: subnets used {res['used']}, mean accuracy delivered {acc}, "
          f"budget misses {res['misses_where_fitting']} where a subnet fit (+{res['misses'] - res['misses_where_fitting']} "
          f"where none did); {res['misses_where_fitting_paging']} of those where one fit read weight pages back from "
          f"the file (evicted under a lower memory limit), {res['inferences_paging']} inferences did")
    print(f"  prefetch at budget changes: {res['prefetch_pages']} weight pages read back in {res['prefetched_lines']} "
          f"of {len(run['lines'])} lines, {res['prefetch_ms']:.1f} ms in all, outside the inference calls (this "
          "assumes each budget change is announced before the next inference: the OS raises the limit, then the "
          "request comes)")
    for share, c in res["per_share"].items():
        print(f"  CPU share {share}: {c['inferences']} inferences, measured mean {c['measured_mean_ms']:.3f} ms, "
              f"predicted mean {c['predicted_mean_ms']:.3f} ms")
    print(f"  quota: throttled in {res['throttled_periods']} CFS periods; memory: at most {res['peak_memory_bytes'] / 2**20:.3f}"
          f" MiB held by the device after a call, {res['memory_over_budget']} inferences over their memory budget"
          + (f"; {res['limit_raised']} line(s) with the limit raised above their budget to the runner's own memory + "
             f"{HEADROOM_BYTES >> 10} KiB" if res["limit_raised"] else ""))
    _print_switch(sc)
