"""`edgetvm partition`: split a model between a device and a server; `edgetvm run` on a split artifact."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edgetvm.errors import UserError

METHODS = ("cic", "dads", "neurosurgeon", "device", "server")
# What a tensor's trip costs beyond its bytes at the nominal rate (bench/link.py, emulated links):
# tbf shapes whole Ethernet frames, so TCP payload gets ~95% of the rate; fetching a tensor over TVM
# RPC costs ~1 ms of protocol work and ~3.5 round trips (0.13-0.16 s per transfer at 20 ms one way).
PAYLOAD_SHARE = 0.95
RPC_ROUNDTRIP_S = 1e-3
FETCH_ROUND_TRIPS = 3.5


def link_model(bps: float, delay_s: float):
    """The partitioners' view of a link: payload rate and fixed time per tensor sent."""
    from edgetvm.partition import cuts

    return cuts.Link(bps * PAYLOAD_SHARE, RPC_ROUNDTRIP_S + FETCH_ROUND_TRIPS * 2 * delay_s)


def add_partition_parser(sub) -> None:
    from edgetvm.cli import _shape_arg

    s = sub.add_parser("partition", help="split a model between a device and a server (CIC, DADS, Neurosurgeon)")
    s.add_argument("model", help="the .onnx file")
    s.add_argument("--device", required=True, help="device profile (targets/devices, e.g. iot-tiny)")
    s.add_argument("--server", default="host", help="board the server part runs on (default host)")
    s.add_argument("--bandwidth", help="link bandwidth, e.g. 10Mbit, 500kbit (or give --link)")
    s.add_argument("--link", help="link profile (targets/links): its bandwidth and delay")
    s.add_argument("--method", choices=METHODS, default="cic")
    s.add_argument("--objective", choices=("latency", "throughput"), default="latency")
    s.add_argument("--input-shape", action="append", type=_shape_arg, metavar="NAME:D1,D2,...")
    s.add_argument("--rpc", metavar="HOST:PORT", help="a device profile that names a board: profile it here")
    s.add_argument("--tracker", metavar="HOST:PORT", help="... or through this tracker")
    s.add_argument("--key", help="the board's key at the tracker")
    s.add_argument("-o", "--output", required=True, help="split artifact directory to write")
    s.set_defaults(func=cmd_partition)


def link_of(bandwidth: str | None, link: str | None):
    """(link profile, bits/s, one-way delay s) from --bandwidth or --link."""
    from edgetvm.targets.links import load_link, parse_bandwidth

    if bool(bandwidth) == bool(link):
        raise UserError("give the link as --bandwidth RATE (e.g. 10Mbit) or --link NAME, one of the two")
    if bandwidth:
        parse_bandwidth(bandwidth)  # a name is not a bandwidth here
    prof = load_link(link or bandwidth)
    return prof, prof.bandwidth_mbit * 1e6, prof.delay_ms / 1e3


@dataclass
class Planned:
    """A partitioning decision with everything it was made from."""
    model: object           # split.Model
    device: object          # the device profile
    device_board: object    # the board its part is built for
    server: object
    costs: object           # cuts.Costs from the two profiles
    link: object            # cuts.Link
    decision: object        # cuts.Decision
    envelope: object        # CIC's splitting model
    full_mincut_s: float    # one full min-cut for the same bandwidth, timed

    def record(self, objective: str, link_name: str, bps: float, delay_s: float) -> dict:
        """What the split artifact's manifest keeps of the plan."""
        d, c, ln = self.decision, self.costs, self.link
        parts = c.parts(d.device)
        return {"method": d.method, "objective": objective, "device": self.device.name,
                "device_board": self.device_board.name, "server": self.server.name, "bandwidth_bps": bps,
                "delay_s": delay_s, "link": link_name, "per_tensor_s": ln.per_tensor_s,
                "predicted_s": c.latency(d.device, ln), "predicted_fps": c.throughput(d.device, ln),
                "predicted_device_s": parts["device_s"], "predicted_server_s": parts["server_s"],
                "predicted_transfer_s": parts["bytes"] * ln.x + parts["tensors"] * ln.per_tensor_s,
                "crossing": parts["crossing"], "bytes": parts["bytes"], "decide_s": d.decide_s}


def plan(model_path, device_name: str, server_name: str, bps: float, delay_s: float, method: str,
         objective: str, shapes=None, log=print, rpc=None, tracker=None, key=None) -> Planned:
    """Profiles (measured or cached), costs and the decision."""
    from edgetvm.latte.devices import load_profile
    from edgetvm.partition import cuts, split
    from edgetvm.targets import load_board

    device = load_profile(device_name)
    server = load_board(server_name)
    if not server.runs_on_host():
        raise UserError(f"server board '{server.name}' ({server.arch}) cannot be profiled on this machine; "
                        f"give a server that runs here (e.g. --server host)")
    device_board = load_board(device.board or "host")
    session = None
    if device.board:  # a real board: its kernels are timed on it
        from edgetvm.runtime.session import connect

        session = connect(rpc, tracker, key)
        if session is None:
            raise UserError(f"device profile '{device.name}' is board '{device.board}': give --rpc HOST:PORT or "
                            f"--tracker HOST:PORT --key KEY to profile it")
    m = split.load_model(model_path, shapes)
    prof_dev = split.profile(m, device_board if device.board else device, log, session=session)
    prof_srv = split.profile(m, server, log)
    costs = cuts.Costs(m.graph, prof_dev.time_s, prof_srv.time_s)
    link = link_model(bps, delay_s)
    env = cuts.cic_envelope(costs, link.per_tensor_s)
    d = cuts.decide(costs, link, method, objective, envelope=env)
    t0 = time.perf_counter()
    cuts.dads(costs, link)
    full_s = time.perf_counter() - t0
    _check_memory(m, d.device, device)
    return Planned(m, device, device_board, server, costs, link, d, env, full_s)


def _check_memory(m, device_set, device) -> None:
    """The device part's weights and its largest live values must fit the device's memory."""
    weights = {w for k in device_set for w in m.graph.ops[k]["weights"]}
    largest = max([m.graph.values[m.graph.ops[k]["out"]] for k in device_set] or [0])
    need = sum(m.weights[i].nbytes for i in weights) + 3 * largest  # a kernel's inputs, output, scratch
    if need > device.memory_bytes:
        raise UserError(f"the device part needs {need / 2**20:.1f} MiB but device '{device.name}' has "
                        f"{device.memory_mib:g} MiB; choose a device with more memory or a higher bandwidth")


def cmd_partition(args) -> None:
    from edgetvm.partition import split

    prof, bps, delay = link_of(args.bandwidth, args.link)
    p = plan(args.model, args.device, args.server, bps, delay, args.method, args.objective,
             dict(args.input_shape or []), rpc=args.rpc, tracker=args.tracker, key=args.key)
    record = p.record(args.objective, prof.name, bps, delay)
    d, n = p.decision, len(p.model.graph.ops)
    out = split.write_split(p.model, d.device, p.device_board, p.server, args.output, record)
    print(f"partitioned {Path(args.model).name} ({n} kernel calls) with {d.method} for {args.objective} at "
          f"{bps / 1e6:g} Mbit/s -> {out}")
    print(f"  device {p.device.name} ({p.device_board.name}): {len(d.device)} of {n} calls, "
          f"{record['predicted_device_s'] * 1e3:.2f} ms predicted")
    print(f"  crossing: {len(record['crossing'])} tensor(s), {record['bytes'] / 1024:.1f} KiB, "
          f"{record['predicted_transfer_s'] * 1e3:.2f} ms predicted")
    print(f"  server {p.server.name}: {n - len(d.device)} calls, {record['predicted_server_s'] * 1e3:.2f} ms predicted")
    print(f"  predicted latency {record['predicted_s'] * 1e3:.2f} ms, {record['predicted_fps']:.1f} frames/s streaming")
    print(f"  decision {d.decide_s * 1e6:.1f} us ({d.method}); full min-cut {p.full_mincut_s * 1e6:.0f} us; "
          f"CIC's splitting model: {len(p.envelope.cuts)} cuts from {p.envelope.min_cuts} min-cuts")


def run_split(args) -> None:
    """`edgetvm run` on a split artifact: the device part on an emulated device behind a shaped link (or a
    board over RPC), the server part here."""
    import numpy as np

    from edgetvm.compiler import random_inputs
    from edgetvm.partition import split
    from edgetvm.passes.onnx_import import TensorInfo
    from edgetvm.runtime.session import connect
    from edgetvm.runtime.split import BURST, SplitRunner, calibrate_device, mean_times

    manifest = split.open_split(args.artifact)
    infos = [TensorInfo(i["name"], tuple(i["shape"]), i["dtype"]) for i in manifest["inputs"]]
    from edgetvm.cli import _load_inputs

    inputs = _load_inputs(args.input, infos) or random_inputs(infos, args.seed)
    p = manifest["plan"]
    quota = None
    with _device_session(args, p) as (session, where):
        if args.report and "predicted_s" in p and getattr(session, "emulated", None) is not None:
            # Under the emulated device's CPU quota: its CPU per call and per byte sent, measured now.
            quota = calibrate_device(session.emulated, session, session.emulated_bps * PAYLOAD_SHARE)
        runner = SplitRunner(args.artifact, manifest, session, None)
        outputs, _ = runner.run(inputs)
        # Under a CFS quota, frames in bursts after random idle times, until the mean is known to 2%
        # (runtime/split.py); the prediction below simulates the same arrivals.
        arrivals = {"idle_max_s": quota[0].period_s, "burst": BURST} if quota is not None else {}
        until_known = {**arrivals, "rel_sem": 0.02, "max_s": 10.0} if arrivals else {}
        times = runner.latency(inputs, repeat=args.repeat, **until_known)
        stream = runner.stream(inputs, frames=max(args.repeat, 10))
    med = mean_times(times)
    print(f"ran split {args.artifact} (device {p.get('device', 'part')} on {where}, server part here)")
    for name, y in outputs.items():
        print(f"  output {name}: {y.dtype}[{','.join(map(str, y.shape))}]")
    how = f"mean of {len(times)}" + (f" in bursts of {BURST} after random idle times" if arrivals else "")
    print(f"  latency per frame ({how}): {med.total_s * 1e3:.2f} ms = device "
          f"{med.device_s * 1e3:.2f} + transfer {med.transfer_s * 1e3:.2f} + server {med.server_s * 1e3:.2f}")
    print(f"  streaming {stream.frames} frames: {stream.fps:.1f} frames/s, "
          f"median latency {np.median(stream.latencies_s) * 1e3:.2f} ms")
    if args.report and "predicted_s" in p:
        dev_s, xfer_s = p["predicted_device_s"], p["predicted_transfer_s"]
        total_s, fps = p["predicted_s"], p["predicted_fps"]
        if quota is not None:
            from edgetvm.partition import cuts

            cpu, link = quota
            parts = {"device_s": dev_s, "server_s": p["predicted_server_s"], "bytes": p["bytes"],
                     "tensors": len(manifest["crossing"]), "sizes": [c["bytes"] for c in manifest["crossing"]]}
            total_s, dev_s = cuts.parts_latency(parts, link, cpu, **arrivals)
            xfer_s = total_s - dev_s - p["predicted_server_s"]
            fps = cuts.parts_throughput(parts, link, cpu)
            print(f"  predicted under the device's CFS quota ({cpu.share:g} of a core): its CPU per call "
                  f"{cpu.call_s * 1e6:.0f} us and per KiB sent {cpu.byte_s * 1024e6:.1f} us, measured now")
        rows = [("device", dev_s, med.device_s), ("transfer", xfer_s, med.transfer_s),
                ("server", p["predicted_server_s"], med.server_s), ("total", total_s, med.total_s)]
        print(f"  {'part':<9} {'predicted ms':>12} {'measured ms':>12} {'measured/predicted':>19}")
        for name, pr, me in rows:
            print(f"  {name:<9} {pr * 1e3:>12.2f} {me * 1e3:>12.2f} {me / pr if pr else float('nan'):>18.2f}x")
        print(f"  streaming: predicted {fps:.1f} frames/s, measured {stream.fps:.1f}")
    if args.output:
        from edgetvm.cli import _save_outputs

        _save_outputs(args.output, outputs)


class _device_session:
    """A session to the device: a board over --rpc/--tracker, or an emulated device behind an emulated
    link (the link from --link, else the bandwidth the split was planned for)."""

    def __init__(self, args, plan: dict):
        self.args, self.plan, self.stack = args, plan, None

    def __enter__(self):
        from contextlib import ExitStack

        from edgetvm.runtime.session import connect

        a = self.args
        if a.rpc or a.tracker:
            return connect(a.rpc, a.tracker, a.key), a.rpc or f"tracker {a.tracker} key {a.key}"
        from edgetvm.latte.devices import load_profile
        from edgetvm.runtime.device import EmulatedDevice
        from edgetvm.runtime.link import EmulatedLink
        from edgetvm.targets.links import LinkProfile, load_link

        if a.link:
            link = load_link(a.link)
        else:
            link = LinkProfile(name=self.plan["link"], description="as planned",
                               bandwidth_mbit=self.plan["bandwidth_bps"] / 1e6, delay_ms=self.plan["delay_s"] * 1e3)
        self.stack = ExitStack()
        try:
            emu_link = self.stack.enter_context(EmulatedLink(link))
            dev = self.stack.enter_context(EmulatedDevice(load_profile(self.plan["device"]), link=emu_link))
            session = dev.session()
            session.emulated = dev   # the device whose CPU time a report reads, and its link's rate
            session.emulated_bps = link.bandwidth_mbit * 1e6
            return session, f"emulated {self.plan['device']} over {link.name}"
        except BaseException:
            self.stack.close()
            raise

    def __exit__(self, *exc):
        if self.stack is not None:
            self.stack.close()
