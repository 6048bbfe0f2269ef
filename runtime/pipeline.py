"""Run a pipeline plan on the emulated fleet: frames stream through the stages, device to device.

Emulation: every device of the plan is an EmulatedDevice (TVM's RPC server in its profile's cpu,
cpuset and memory cgroups, TVM_NUM_THREADS = its CPUs) inside the network namespace of its own
EmulatedLink (a veth pair to this machine shaped by tbf on both ends at the fleet's rate for it).
This machine's root namespace is the switch between them: each namespace routes the links' subnet
to its host end, and IPv4 forwarding is switched on for the fleet's host-side veth ends only (not
machine-wide), so a connection from device a to device b crosses a's shaped uplink and b's shaped
downlink. A fleet device's `host_cpu` moves its cpuset to that host CPU.

Data flow (runtime/pipeline_device.py): the coordinator opens one TVM RPC session, to the first
stage's head, and starts the chain through it; each head opens sessions to its stage's other devices
and to the next head, the last head to the sink (a plain device server here, in the root namespace,
which writes each frame's results to a file this process reads). Frames are put into the first head
by a feeder thread; each frame's latency is from its put to its results' file.

Everything (servers, cgroups, namespaces, veth pairs, qdiscs, the sink) is removed on exit, errors,
Ctrl-C and SIGTERM; a device that disappears mid-run stops the run with a message naming it.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError
from edgetvm.runtime.device import EmulatedDevice
from edgetvm.runtime.link import SUBNET, EmulatedLink, _run
from edgetvm.runtime.tensors import pack
from edgetvm.runtime.signals import deferred

STALL_S = 60.0      # no result for this long (and every device alive): the run is stuck


class FleetDevice(EmulatedDevice):
    """An EmulatedDevice whose cpuset is host CPU `host_cpu` when given (else its profile's first CPUs)."""

    def __init__(self, profile, link, host_cpu: int | None = None, name: str = ""):
        super().__init__(profile, link)
        self.host_cpu, self.fleet_name = host_cpu, name

    def _make_cgroup(self) -> None:
        super()._make_cgroup()
        if self.host_cpu is not None and self.cgroup is not None:
            import os

            cpus = sorted(os.sched_getaffinity(0))
            cpu = cpus[self.host_cpu % len(cpus)]
            (self.cgroup.cpuset / "cpuset.cpus").write_text(str(cpu))
            self.cgroup.cpus = [cpu]


def join_switch(link: EmulatedLink) -> None:
    """Let the link's namespace reach the other links' namespaces through this machine."""
    _run("ip", "-n", link.netns, "route", "add", str(SUBNET), "via", link.host_address)
    Path(f"/proc/sys/net/ipv4/conf/{link.host_veth}/forwarding").write_text("1")


def device_cpu(dev: "FleetDevice") -> tuple[float, float]:
    """(CPU seconds, throttled seconds) so far of the device's cgroup: its server and its sessions."""
    from edgetvm.runtime.cgroup import cgroup_cpu_ns

    return cgroup_cpu_ns(dev.cgroup.cg.cpu) / 1e9, dev.cgroup.throttled_us() / 1e6


@dataclass
class RunResult:
    frames: int
    seconds: float
    latencies_s: list[float]
    max_abs_diff: float
    identical: bool
    devices: list[str] = field(default_factory=list)
    # per device, while frames streamed: CPU used over what its quota allowed, and the share of the time
    # its cgroup was throttled (a device near 1.0 of its quota is the one that sets the pace)
    quota_used: dict = field(default_factory=dict)
    throttled_share: dict = field(default_factory=dict)
    arrivals_s: list[float] = field(default_factory=list)   # each result's arrival, from the first put

    @property
    def throughput_fps(self) -> float:
        """Steady state: results per second from the first result to the last. Counting from the first put
        would charge the pipeline's fill (a whole frame's latency, several periods deep) to 20 frames."""
        if len(self.arrivals_s) >= 2 and self.arrivals_s[-1] > self.arrivals_s[0]:
            return (len(self.arrivals_s) - 1) / (self.arrivals_s[-1] - self.arrivals_s[0])
        return self.frames / self.seconds

    @property
    def latency_s(self) -> float:
        return statistics.median(self.latencies_s)


def _reference(plan_dir: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(plan_dir / "reference.so")), tvm.cpu())
    with np.load(plan_dir / "reference.npz") as z:
        weights = [tvm.runtime.tensor(z[f"arr_{i}"]) for i in range(len(z.files))]
    out = vm["main"](*[tvm.runtime.tensor(x) for x in inputs], *weights)
    outs = out if isinstance(out, (list, tuple)) or hasattr(out, "__len__") and not hasattr(out, "numpy") else [out]
    return [o.numpy() for o in outs]


def _configs(plan: dict, plan_dir: Path, devices: dict, sink_addr_for, sink_dir: Path) -> dict:
    """The first head's start config, with every later node's nested in it."""
    stages = plan["stages"]
    final = plan["outputs"]
    nxt = None
    for s in range(len(stages) - 1, -1, -1):
        st = stages[s]
        head = st["parts"][0]
        hdev = devices[head["device"]]
        if nxt is None:
            nxt = {"name": "sink", "addr": sink_addr_for(hdev), "config": {"role": "sink", "name": "sink",
                                                                          "dir": str(sink_dir)}}
        send = final if s == len(stages) - 1 else [v for v in st["outputs"] + st["carry"]]
        mates = [{"name": p["device"], "addr": list(devices[p["device"]].address), "rows": p["input_rows"],
                  "config": {"role": "mate", "name": p["device"], "plan_dir": str(plan_dir), "part": p}}
                 for p in st["parts"][1:]]
        cfg = {"role": "head", "name": head["device"], "plan_dir": str(plan_dir), "part": head,
               "inputs": st["inputs"], "outputs": st["outputs"], "carry": st["carry"], "send": send,
               "mates": mates, "next": nxt}
        nxt = {"name": head["device"], "addr": list(hdev.address), "config": cfg}
    return nxt


def run_plan(plan_dir, frames: int = 20, distinct: int = 4, log=print) -> RunResult:
    """Stream `frames` frames (`distinct` different random inputs, cycled) through the plan on the
    emulated fleet; outputs checked against the plan's single-device build."""
    import tvm

    from edgetvm.latte.devices import cgroups_unavailable
    from edgetvm.partition.pipeline.fleet import load_fleet
    from edgetvm.partition.pipeline.plan import open_plan
    from edgetvm.runtime.link import unavailable_reason
    from edgetvm.targets.links import load_link

    plan_dir = Path(plan_dir).resolve()
    plan = open_plan(plan_dir)
    if reason := unavailable_reason() or cgroups_unavailable():
        raise UserError(f"cannot emulate the fleet: {reason}")
    fleet_devs = {d["name"]: d for d in plan["fleet"]["devices"]}
    used = [p["device"] for st in plan["stages"] for p in st["parts"]]
    from edgetvm.latte.devices import load_profile

    rng = np.random.default_rng(0)
    inputs = [[rng.standard_normal(i["shape"]).astype(i["dtype"]) for i in plan["inputs"]] for _ in range(distinct)]
    refs = [_reference(plan_dir, x) for x in inputs]

    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="edgetvm-pipe-") as tmp:
        sink_dir = Path(tmp)
        devices: dict[str, FleetDevice] = {}
        for name in used:
            spec = fleet_devs[name]
            link = stack.enter_context(EmulatedLink(load_link(spec["link"]) if not spec["link"][:1].isdigit()
                                                    else spec["link"]))
            with deferred():
                join_switch(link)
            dev = FleetDevice(load_profile(spec["profile"]), link, spec.get("host_cpu"), name)
            devices[name] = stack.enter_context(dev)
            log(f"device {name}: {spec['profile']} (quota {spec['cpu_quota']} CPU, {spec['memory_mib']} MiB), "
                f"{link.rate_mbit:g} Mbit/s link, at {dev.address[0]}:{dev.address[1]}")
        sink = EmulatedDevice(None, None)
        sink.host = "0.0.0.0"  # reached from the devices' namespaces at their link's host address
        stack.enter_context(sink)
        sink_port = sink.port

        def sink_addr_for(head_dev):
            return [head_dev.link.host_address, sink_port]

        cfg = _configs(plan, plan_dir, devices, sink_addr_for, sink_dir)
        first = devices[cfg["name"]]
        sess = tvm.rpc.connect(*first.address, session_timeout=0)
        try:
            sess.get_function("edgetvm.pipe.start")(json.dumps(cfg["config"]))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"the pipeline did not start: {_reason(e, devices)}") from None
        put = sess.get_function("edgetvm.pipe.put")
        names = json.dumps([i["value"] for i in plan["inputs"]])
        outputs = plan["outputs"]
        submitted: dict[int, float] = {}
        feed_error: list[BaseException] = []

        def feed(start: int, count: int):
            try:
                for f in range(start, start + count):
                    x = inputs[f % distinct]
                    submitted[f] = time.perf_counter()
                    put(f, names, pack(x))
            except BaseException as e:  # noqa: BLE001
                feed_error.append(e)

        arrivals: list[float] = []

        def collect(start: int, count: int) -> tuple[list[float], float, float]:
            lat, worst, last = [], 0.0, time.perf_counter()
            pending = set(range(start, start + count))
            while pending:
                got = False
                for f in sorted(pending):
                    path = sink_dir / f"f{f}.npz"
                    if path.exists():
                        t = time.perf_counter()
                        with np.load(path) as z:
                            outs = [z[n] for n in outputs]
                        path.unlink()
                        for a, b in zip(outs, refs[f % distinct]):
                            worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()) if a.shape == b.shape
                                        else float("inf"))
                        lat.append(t - submitted[f])
                        arrivals.append(t)
                        pending.discard(f)
                        got, last = True, t
                if got:
                    continue
                _check(devices, feed_error)
                if (sink_dir / "error.json").exists():
                    raise UserError(f"the pipeline stopped: {json.loads((sink_dir / 'error.json').read_text())['error']}")
                if time.perf_counter() - last > STALL_S:
                    raise UserError(f"the pipeline made no progress for {STALL_S:.0f} s "
                                    f"({len(pending)} frames outstanding)")
                time.sleep(0.0005)
            return lat, worst, time.perf_counter()

        # one frame first: loads every part and warms the sessions
        th = threading.Thread(target=feed, args=(0, 1), daemon=True)
        th.start()
        collect(0, 1)
        th.join()
        log(f"streaming {frames} frames")
        cpu0 = {n: device_cpu(d) for n, d in devices.items()}
        t0 = time.perf_counter()
        th = threading.Thread(target=feed, args=(1, frames), daemon=True)
        th.start()
        arrivals.clear()
        lat, worst, t1 = collect(1, frames)
        cpu1 = {n: device_cpu(d) for n, d in devices.items()}
        th.join()
        with contextlib.suppress(Exception):
            sess._sess = None
        wall = t1 - t0
        quota = {n: fleet_devs[n]["cpu_quota"] for n in devices}
        return RunResult(frames, wall, lat, worst, worst == 0.0, used,
                         {n: (cpu1[n][0] - cpu0[n][0]) / (wall * quota[n]) for n in devices},
                         {n: (cpu1[n][1] - cpu0[n][1]) / wall for n in devices},
                         sorted(a - t0 for a in arrivals))


def _reason(e: BaseException, devices: dict) -> str:
    for name, dev in devices.items():
        if dev.proc is None or dev.proc.poll() is not None:
            return f"device '{name}' disappeared (its server exited)"
    text = str(e).strip().splitlines()
    text = [t for t in text if "device '" in t] or text
    return (text[-1] if text else type(e).__name__)[:300]


def _check(devices: dict, feed_error: list) -> None:
    for name, dev in devices.items():
        if dev.proc is None or dev.proc.poll() is not None:
            raise UserError(f"device '{name}' disappeared mid-run (its server exited); the run is stopped")
    if feed_error:
        raise UserError(f"the pipeline stopped: {_reason(feed_error[0], devices)}")
