"""Run-time switching between the DRESS subnets of one artifact as the device's budgets change.

An artifact compiled from an `edgetvm dress` model has a data input `subnet` (int32[1]) and, in its
manifest, a "dress" table: per subnet its sparsity, test accuracy and the bytes of weights it reads (a
prefix of each layer's store). All subnets share one library and one (mapped) weight file, so choosing a
subnet is choosing the value of that input: no weight is copied, re-laid out or loaded.

Budget trace (`edgetvm run ART --budget-trace TRACE`): a text file, one budget per line,
    TIME_MS MEMORY_MIB [xCOUNT]
(the next COUNT inferences, default 1, must each take at most TIME_MS and the model at most MEMORY_MIB of
weights); blank lines and text after '#' are ignored. Per inference the runner picks the most accurate
subnet whose predicted latency and weight bytes fit; when none fits it runs the smallest and says so. A
budget miss is an inference whose measured latency exceeded its time budget.

Predicted latency is measured here, when the runner starts: the median of a few calls of each subnet on
this device (so it reflects the device's load and quota at that time, not a model).
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
        try:
            if len(fields) not in (2, 3):
                raise ValueError
            t, mem = float(fields[0]), float(fields[1])
            count = int(fields[2][1:]) if len(fields) == 3 and fields[2].startswith("x") else (
                1 if len(fields) == 2 else None)
            if count is None or count < 1 or not (t > 0 and mem > 0) or not np.isfinite([t, mem]).all():
                raise ValueError
        except ValueError:
            raise UserError(f"--budget-trace {path} line {no}: '{line.strip()}' is not 'TIME_MS MEMORY_MIB [xCOUNT]' "
                            "with positive numbers, e.g. '2.5 8 x10'") from None
        out += [Budget(t, int(mem * 2**20))] * count
    if not out:
        raise UserError(f"--budget-trace {path} holds no budgets; write lines like '2.5 8 x10' (ms, MiB, repeats)")
    return out


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
        self.predicted_ms = [float("nan")] * len(self.subnets)

    def args(self, inputs: dict[str, np.ndarray], level: int) -> list:
        """Arguments for subnet `level`: the same weight tensors for every subnet, only `subnet` differs."""
        args = self.runner.args({**inputs, SUBNET_INPUT: np.array([level], np.int32)})
        args[self.names.index(SUBNET_INPUT)] = self._level_args[level]
        return args

    def call(self, args: list) -> np.ndarray:
        return self.runner.call(args)[0].numpy()

    def calibrate(self, inputs: dict[str, np.ndarray], repeat: int = 5) -> list[float]:
        for k in range(len(self.subnets)):
            a = self.args(inputs, k)
            self.call(a)   # warm-up: first touch of its weights
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                self.call(a)
                times.append((time.perf_counter() - t) * 1e3)
            self.predicted_ms[k] = statistics.median(times)
        return self.predicted_ms

    def smallest(self) -> int:
        return min(range(len(self.subnets)), key=lambda k: (self.subnets[k]["weight_bytes"], self.predicted_ms[k]))

    def choose(self, budget: Budget) -> Choice:
        """The most accurate subnet (ties: the faster) that fits both budgets; else the smallest, not fitting."""
        fit = [k for k, s in enumerate(self.subnets)
               if self.predicted_ms[k] <= budget.time_ms and s["weight_bytes"] <= budget.memory_bytes]
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
    """`edgetvm run ART --budget-trace TRACE`: the per-inference switching of the module docstring."""
    from edgetvm.compiler import random_inputs

    trace = parse_trace(args.budget_trace)
    sr = SubnetRunner(art, weights=args.weights)
    data = [i for i in art.inputs if i.name != SUBNET_INPUT]
    from edgetvm.cli import _load_inputs

    inputs = _load_inputs(args.input, data)
    if not inputs:
        inputs = random_inputs(data, args.seed)
        print(f"no --input given: using random inputs (seed {args.seed})")
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
    print(f"  switching: {1e3 * sc['switch_ms']:.2f} us per switch, weights shared by every subnet "
          f"({'no copy' if sc['weights_shared'] else 'COPIED'}); first call after a switch "
          f"{sc['first_call_extra_ms']:+.3f} ms against a repeated call (noisy)")
