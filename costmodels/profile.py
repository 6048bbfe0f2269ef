"""Per-layer profiles: every kernel call of a model's fused `main` timed on a device, and the bytes of
every value a cut could send.

A profile is what the partitioners plan with (predicted latency of a cut = device part + transfer
at the link's bandwidth + server part) and what a split run is checked against. Kernels are timed
by the VM's instrument hook in CPU time of the calling thread, in a child process: on an emulated
device the child runs in the device's cpuset with its thread count, and a kernel's time on the
device is that CPU time over the device's share of a core (under a CFS quota the wall time of one
kernel would carry whatever throttled rest of a period it ran into; the share is what the quota
gives on average, which the LATTE profiles measured at 1.00-1.01x). Kernels timed one by one miss
what the quota itself costs in CPU: after each throttled period the caches are cold, so the child
also times whole calls back to back under the quota and scales every kernel by their ratio to
whole calls without it (ResNet-18 at a quarter of a core: 1.03-1.10x). Profiles are cached per model,
input shapes, device and edgetvm version; a cached one that does not match is measured again, and a
profile file given by hand that does not match is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import edgetvm
from edgetvm.errors import UserError

VERSION = 2  # 2: kernels scaled by the CPU a whole call costs under the device's quota
RUNS = 30


def cache_dir() -> Path:
    base = os.environ.get("EDGETVM_CACHE") or Path.home() / ".cache" / "edgetvm"
    return Path(base) / "profiles"


@dataclass
class Graph:
    """The fused main as a DAG of kernel calls: op k computes value `v{k}` from `reads`."""
    ops: list[dict]            # {"index", "kernel", "reads": [value names], "weights": [indices], "out": name}
    values: dict[str, int]     # value name -> bytes (data inputs and every op's output)
    inputs: list[str]          # main's data inputs
    outputs: list[str]         # main's results

    def to_json(self) -> dict:
        return {"ops": self.ops, "values": self.values, "inputs": self.inputs, "outputs": self.outputs}

    @classmethod
    def from_json(cls, d: dict) -> "Graph":
        return cls(d["ops"], d["values"], d["inputs"], d["outputs"])


def graph_of(fused) -> Graph:
    """The kernel-call DAG of a fused module (weights are not values a cut sends: each part has its own)."""
    from tvm import relax

    from edgetvm.costmodels.roofline import nbytes
    from edgetvm.passes.graph_cut import bindings_of, value_names

    names, data_inputs, outputs = value_names(fused)
    main = fused["main"]
    weight_index = {p: i for i, p in enumerate(main.params[int(main.attrs["num_input"]):])}
    call_tir = __import__("tvm").ir.Op.get("relax.call_tir")
    ops, values = [], {names[v]: nbytes(v.ty) for v in data_inputs}
    for k, b in enumerate(bindings_of(fused)):
        kernel = b.value.args[0].name_hint if isinstance(b.value, relax.Call) and b.value.op == call_tir else ""
        free = relax.analysis.free_vars(b.value)
        reads = [names[v] for v in free if v in names]
        weights = sorted(weight_index[v] for v in free if v in weight_index)
        ops.append({"index": k, "kernel": kernel, "reads": reads, "weights": weights, "out": names[b.var]})
        values[names[b.var]] = nbytes(b.var.ty)
    return Graph(ops, values, [names[v] for v in data_inputs], [names[v] for v in outputs if v in names])


@dataclass
class Profile:
    key: dict
    graph: Graph
    time_s: list[float]        # per op, on the device
    call_s: float              # one whole call of main on the device, measured the same way

    @property
    def device(self) -> str:
        return self.key["device"]["name"]

    def to_json(self) -> dict:
        return {"key": self.key, "graph": self.graph.to_json(), "time_s": self.time_s, "call_s": self.call_s}

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        return cls(d["key"], Graph.from_json(d["graph"]), d["time_s"], d["call_s"])


def device_key(device) -> dict:
    """What a profile depends on about the device: the emulated profile's figures, or the board's name."""
    from edgetvm.latte.devices import Profile as DeviceProfile

    if isinstance(device, DeviceProfile):
        return {"name": device.name, "kind": "emulated", "cpus": device.cpus, "cpu_quota": device.cpu_quota}
    return {"name": device.name, "kind": "board", "arch": device.arch, "target": device.tvm_target,
            "cores": device.cores}


def profile_key(model_sha: str, inputs, device, graph: "Graph | None" = None) -> dict:
    """What a profile was measured for; with `graph`, also the kernel calls it times (a change of the
    fusion rules makes cached profiles stale instead of misaligned)."""
    import tvm

    key = {"version": VERSION, "edgetvm": edgetvm.__version__, "tvm": tvm.__version__, "model": model_sha,
           "inputs": [i.to_json() for i in inputs], "device": device_key(device),
           "cpu": tvm.target.codegen.llvm_get_system_cpu()}
    if graph is not None:
        key["graph"] = hashlib.sha256(json.dumps(graph.to_json(), sort_keys=True).encode()).hexdigest()[:20]
    return key


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def load(path: str | Path, key: dict | None = None) -> Profile:
    """A profile file; with `key`, refused unless it was measured for exactly that model and device."""
    p = Path(path)
    try:
        prof = Profile.from_json(json.loads(p.read_text()))
    except FileNotFoundError:
        raise UserError(f"profile {p} does not exist; measure one with `edgetvm partition ... --profile-dir`") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"profile {p} is unreadable ({type(e).__name__}); delete it to measure again") from None
    if key is not None and prof.key != key:
        what = [k for k in key if prof.key.get(k) != key[k]]
        raise UserError(f"profile {p} is stale: it was measured for another {', '.join(what)}; "
                        f"delete it to measure again")
    return prof


def measure(artifact_path: Path, graph: Graph, device, key: dict, runs: int = RUNS) -> Profile:
    """Time every kernel call of a host artifact as `device` (an emulated profile, or the host board)."""
    from edgetvm.latte.devices import DeviceCgroup, Profile as DeviceProfile

    emulated = isinstance(device, DeviceProfile)
    with tempfile.TemporaryDirectory(prefix="edgetvm-profile-") as tmp:
        out = Path(tmp) / "out.json"
        spec = {"artifact": str(artifact_path), "runs": runs, "cgroup": None,
                "kernels": [op["kernel"] for op in graph.ops]}
        cg = DeviceCgroup(device) if emulated else None
        try:
            if cg is not None:
                # Kernels timed in its cpuset with its thread count, the quota lifted (applied by the
                # share below); whole calls timed under the quota as well (see the module's doc).
                quota = cg.cg.cpu / "cpu.cfs_quota_us"
                spec["cgroup"] = {"cpuset": str(cg.cpuset), "cpu": str(cg.cg.cpu), "quota_us": quota.read_text().strip()}
                quota.write_text("-1")
            threads = len(cg.cpus) if cg is not None else device.cores
            env = dict(os.environ, TVM_NUM_THREADS=str(threads))
            (Path(tmp) / "spec.json").write_text(json.dumps(spec))
            proc = subprocess.run([sys.executable, "-m", "edgetvm.costmodels.profile", str(Path(tmp) / "spec.json"),
                                   str(out)], capture_output=True, text=True, env=env, timeout=1800)
        finally:
            if cg is not None:
                cg.close()
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"profiling on {device.name} failed: {proc.stderr.strip()[-600:]}")
        got = json.loads(out.read_text())
    share = min(1.0, device.cpu_quota / device.cpus) if emulated else 1.0
    return Profile(key, graph, [t / share for t in got["time_s"]], got["call_s"] / share)


def measure_on_board(fused, graph: Graph, board, session, key: dict, seconds: float = 0.02) -> Profile:
    """Time every kernel of `fused` (main fused and scheduled for `board`) on the board behind `session`.

    The VM's instrument hook cannot cross RPC: the kernels are built into a library of their own and
    each is timed on the board by TVM's time_evaluator, on zeroed tensors of its buffers' shapes.
    """
    import numpy as np
    import tvm

    from edgetvm.latte.remote import time_on_board
    from edgetvm.passes import pipeline

    lowered = pipeline.lower(fused, board.target())
    kernels = tvm.IRModule({gv: f for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)})
    dev = session.cpu()
    with tempfile.TemporaryDirectory(prefix="edgetvm-kernels-") as tmp:
        lib_path = Path(tmp) / f"kernels-{_digest(key)}.so"
        pipeline.export(tvm.compile(kernels, board.target()), str(lib_path), board.cross_compiler)
        session.upload(str(lib_path))
        lib = session.load_module(lib_path.name)
    per_kernel = {}
    for gv, f in kernels.functions.items():
        args = [tvm.runtime.tensor(np.zeros([int(d) for d in p.ty.shape], str(p.ty.dtype)), dev) for p in f.params]
        per_kernel[gv.name_hint] = float(np.median(time_on_board(lib, gv.name_hint, dev, seconds, *args)))
    times = [per_kernel.get(op["kernel"], 0.0) for op in graph.ops]
    return Profile(key, graph, times, sum(times))


def cached(artifact_path: Path, graph: Graph, device, key: dict, log=lambda *a: None, measure_fn=None) -> Profile:
    """The profile for `key` from the cache, measured first if it is not there (or stale)."""
    path = cache_dir() / f"{_digest(key)}.json"
    if path.is_file():
        try:
            return load(path, key)
        except UserError:
            pass  # another version's file under the same digest: measure again
    log(f"profiling {len(graph.ops)} kernel calls on {key['device']['name']}")
    prof = measure_fn() if measure_fn is not None else measure(artifact_path, graph, device, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".profile.")
    with os.fdopen(fd, "w") as f:
        json.dump(prof.to_json(), f)
    os.replace(tmp, path)
    return prof


# ------------------------------------------------------------------------------ the measuring child

def _match(seq: list[tuple[str, float]], kernels: list[str]) -> list[float]:
    """Each binding's time from the calls the VM made, in order; a binding whose kernel was never
    called (a reshape the VM turned into a view of its input) costs nothing."""
    out, i = [], 0
    for k in kernels:
        if k and i < len(seq) and seq[i][0] == k:
            out.append(seq[i][1])
            i += 1
        else:
            out.append(0.0)
    if i != len(seq):
        raise RuntimeError(f"kernel calls {[s for s, _ in seq[i:i + 3]]} do not follow main's bindings")
    return out


def instrumented_calls(vm, entry: str, args: list, clock=time.perf_counter) -> list[tuple[str, float]]:
    """(kernel symbol, seconds) of every call one run of `entry` makes, timed by the VM's instrument
    hook with `clock` (wall time by default: a parallel kernel's threads all count)."""
    calls: list[tuple[str, float]] = []
    stack: list[float] = []

    def instrument(func, symbol, before, ret, *a):
        if before:
            stack.append(clock())
        else:
            calls.append((symbol, clock() - stack.pop()))
        return 0

    vm.set_instrument(instrument)
    try:
        vm[entry](*args)
    finally:
        vm.set_instrument(None)
    return calls


@dataclass
class KernelTime:
    kernel: str
    calls: int  # per run
    seconds: float  # per run, median over the runs


def kernel_times(vm, entry: str, args: list, runs: int = 10) -> list[KernelTime]:
    """Each kernel's time per run of `entry` (all its calls summed, median over `runs`), slowest first."""
    import numpy as np

    vm[entry](*args)  # warm-up
    per_run: list[dict[str, list[float]]] = []
    for _ in range(runs):
        run: dict[str, list[float]] = {}
        for symbol, dt in instrumented_calls(vm, entry, args):
            run.setdefault(symbol, []).append(dt)
        per_run.append(run)
    names = list(per_run[0])
    out = [KernelTime(k, len(per_run[0][k]), float(np.median([sum(r.get(k, [0.0])) for r in per_run])))
           for k in names]
    return sorted(out, key=lambda t: -t.seconds)


def _child(spec_path: str, out_path: str) -> None:
    import numpy as np

    from edgetvm.compiler import random_inputs
    from edgetvm.runtime.artifact import open_artifact
    from edgetvm.runtime.session import Runner

    spec = json.loads(Path(spec_path).read_text())
    art = open_artifact(spec["artifact"], verify=False)
    runner = Runner(art)
    x = random_inputs(art.inputs, seed=0)
    args = runner.args(x)
    main = runner.vm["main"]
    for _ in range(3):
        main(*args)
    if spec["cgroup"]:
        Path(spec["cgroup"]["cpuset"], "cgroup.procs").write_text(str(os.getpid()))
    clock = time.thread_time
    calls: list[list[float]] = []
    kernels = spec["kernels"]
    names = set(k for k in kernels if k)

    def whole_calls() -> float:
        # Back to back, as frames run: an instrumented run between them would leave the caches colder.
        times = []
        for _ in range(spec["runs"]):
            t0 = clock()
            main(*args)
            times.append(clock() - t0)
        return float(np.median(times))

    call_s = whole_calls()
    for r in range(spec["runs"]):
        current = instrumented_calls(runner.vm, "main", args, clock)
        calls.append(_match([(s, dt) for s, dt in current if s in names], kernels))
    per_op = np.median(np.array(calls), axis=0).tolist() if kernels else []
    if spec["cgroup"] and int(spec["cgroup"]["quota_us"]) > 0:
        cpu = Path(spec["cgroup"]["cpu"])
        (cpu / "cpu.cfs_quota_us").write_text(spec["cgroup"]["quota_us"])
        (cpu / "cgroup.procs").write_text(str(os.getpid()))
        main(*args)
        factor = whole_calls() / call_s if call_s > 0 else 1.0
        per_op, call_s = [t * factor for t in per_op], call_s * factor
    Path(out_path).write_text(json.dumps({"time_s": per_op, "call_s": call_s}))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
