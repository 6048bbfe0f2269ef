"""Device/server split: measured latency and streaming throughput of device-only, server-only,
Neurosurgeon, DADS and CIC, side by side in one run, with each one's prediction error and the time
to decide (full min-cut against CIC's lookup).

The device is an emulated one (default sbc-a53: a quarter of a core, its cgroup's CFS quota, in the
first CPU's cpuset) serving TVM RPC inside a network namespace; the link is a veth pair shaped by tbf
on both ends at each bandwidth; the server is this process with one TVM thread (a full core; the
other CPU and what the device's quota leaves of the first). Each configuration's cut is decided from the profiles (cached), compiled as a
split artifact, and run across the link: latency is the mean over frames placed on the device
first (device compute + fetching the crossing tensors over the link + server compute; the mean, as a
device under a CFS quota alternates fast frames with frames that wait for the next period). Each
burst of 8 frames arrives after a random idle time uniform over one CFS period, as from a source
not synchronised with the device's period, and bursts are added until the standard error of their
mean is 2% of it ("frames", "sem"): frames run back to back lock onto one phase of the period, and
a mean over them said more about the phase than about the cut. The prediction simulates the same
arrivals;
throughput the frames per second of a stream in which the device computes and sends frame i+1 while
the server computes frame i.

Predicted ("pred"): the device's CPU work per frame (its kernels from the profile at full speed, plus
its CPU per call, per tensor and per byte sent, measured once per link) under its quota as the kernel
enforces it (costmodels/cfs.py), the link with each direction's tbf bucket simulated over the frame's
RPC messages (costmodels/tbf.py) plus an RPC round trip's time and a time per byte read beyond them
(measured with the same calibration), the server's kernels. "additive": the same, but the link's time
as bytes at its rate plus a time per tensor and per call (measured by that calibration too). "linear":
the partitioners' additive cost (kernels over the quota's share, planned per-tensor time), which the
cut is chosen with. "dev CPU": the device's CPU per frame, predicted and measured (its cgroup's threads).

    python bench/partition.py [--models ocr_cls,ocr_det,resnet,inception] [--bandwidths 1,5,20,100]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ["TVM_NUM_THREADS"] = "1"  # the server: one full core (set before TVM starts its pool)
# ... not bound by TVM to the first CPU (it pins a one-thread pool's caller there), which is the emulated
# device's: the server's kernels then evicted the device's caches between frames (the device measured
# 20-45% more CPU per frame than its kernels) and shared its core when frames streamed.
os.environ["TVM_BIND_THREADS"] = "0"

from edgetvm import zoo  # noqa: E402
from edgetvm.latte.devices import load_profile  # noqa: E402
from edgetvm.partition import cuts, split  # noqa: E402
from edgetvm.partition.cli import link_model  # noqa: E402
from edgetvm.runtime.device import EmulatedDevice  # noqa: E402
from edgetvm.runtime.link import EmulatedLink  # noqa: E402
from edgetvm.runtime.split import BURST, SplitRunner, burst_sem, calibrate_device, mean_times  # noqa: E402
from edgetvm.targets import load_board  # noqa: E402
from edgetvm.targets.links import load_link  # noqa: E402

METHODS = ("device", "server", "neurosurgeon", "dads", "cic")
SHAPES = {"ocr_det": {"x": (1, 3, 160, 160)}}
KW = {"inception": {}, "resnet": {}}


def decision_times(costs, link, env, repeat: int = 20) -> tuple[float, float, bool]:
    """Median seconds of a full min-cut and of CIC's lookup for the same bandwidth; same cost?"""
    full, look = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        d_full = cuts.dads(costs, link)
        full.append(time.perf_counter() - t)
        t = time.perf_counter()
        d_cic = env.lookup(link)
        look.append(time.perf_counter() - t)
    same = abs(costs.latency(d_full, link) - costs.latency(d_cic, link)) <= 1e-9 * costs.latency(d_full, link)
    return statistics.median(full), statistics.median(look), same


def exact_sweep(costs, env, per_tensor_s: float, points: int = 200) -> bool:
    """CIC's cut costs what the full min-cut's does at every bandwidth of a dense sweep (0.1-1000 Mbit/s)."""
    import numpy as np

    for mbit in np.geomspace(0.1, 1000, points):
        link = cuts.Link(mbit * 1e6, per_tensor_s)
        a, b = costs.latency(env.lookup(link), link), costs.latency(cuts.dads(costs, link), link)
        if abs(a - b) > 1e-9 * b:
            return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ocr_cls,ocr_det,resnet,inception")
    p.add_argument("--bandwidths", default="1,5,20,100", help="Mbit/s")
    p.add_argument("--device", default="sbc-a53")
    p.add_argument("--frames", type=int, default=16,
                   help="frames per stream, and at least this many per latency measurement")
    p.add_argument("--sem", type=float, default=0.02,
                   help="latency frames are added until the mean's standard error is at most this share of it")
    p.add_argument("--max-s", type=float, default=20.0, help="... or this many seconds have passed")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-partition-"))
    work.mkdir(parents=True, exist_ok=True)
    device = load_profile(args.device)
    server_cpus = sorted(os.sched_getaffinity(0))[max(1, device.cpus):]   # the device's cpuset is the first
    if server_cpus:
        os.sched_setaffinity(0, server_cpus)
    server = replace(load_board("host"), cores=1)
    t_start = time.perf_counter()
    rows, notes, calib = [], [], []
    for name in args.models.split(","):
        src = zoo.path(name, work, **KW.get(name, {}))
        shapes = SHAPES.get(name) or zoo.default_input_shapes(name, **KW.get(name, {}))
        m = split.load_model(src, shapes)
        prof_dev = split.profile(m, device, print)
        prof_srv = split.profile(m, server, print)
        costs = cuts.Costs(m.graph, prof_dev.time_s, prof_srv.time_s)
        from edgetvm.compiler import random_inputs

        x = random_inputs(m.inputs, seed=0)
        for mbit in [float(b) for b in args.bandwidths.split(",")]:
            link_prof = load_link(f"{mbit:g}Mbit")
            link = link_model(mbit * 1e6, 0.0)
            env = cuts.cic_envelope(costs, link.per_tensor_s)
            full_s, look_s, same = decision_times(costs, link, env)
            with EmulatedLink(link_prof) as emu, EmulatedDevice(device, link=emu) as dev:
                # The device's CPU per call, per tensor and per byte sent, and the link's time per
                # tensor, measured here once: the prediction's constants (no model in them).
                cal = dev.session()
                cpu, measured_link = calibrate_device(dev, cal, link.bandwidth_bps)
                del cal
                per_tensor_s, call_s = measured_link.per_tensor_s, measured_link.call_s
                additive = replace(measured_link, shaper=None)
                calib.append(f"{name} at {mbit:g} Mbit/s: device CPU per call {cpu.call_s * 1e6:.0f} us, per "
                             f"tensor sent {cpu.tensor_s * 1e6:.0f} us, per KiB sent {cpu.byte_s * 1024e6:.1f} us; "
                             f"link per tensor {per_tensor_s * 1e3:.2f} ms (planned with {link.per_tensor_s * 1e3:.2f}), "
                             f"per call {call_s * 1e3:.2f} ms; a round trip beyond the tbf buckets "
                             f"{measured_link.round_trip_s * 1e3:.2f} ms and per KiB read "
                             f"{measured_link.read_byte_s * 1024e6:.1f} us; "
                             + (f"ticks {cpu.tick_phase_s * 1e3:.2f} ms after the period's boundaries (mod 4)"
                                if cpu.tick_phase_s is not None else "tick phase unknown: averaged"))
                for method in METHODS:
                    for objective in ("latency", "throughput"):
                        d = cuts.decide(costs, link, method, objective, envelope=env)
                        tag = hashlib.sha256(repr(sorted(d.device)).encode()).hexdigest()[:10]
                        out = work / f"{name}-{tag}"
                        if not out.exists():
                            split.write_split(m, d.device, load_board("host"), server, out,
                                              {"crossing": costs.crossing(d.device)})
                        runner = SplitRunner(out, split.open_split(out), dev.session(), None)
                        if objective == "latency":
                            runner.latency(x, repeat=4)   # a new session's first calls fault its pages in
                            c0 = dev.cpu_seconds()
                            times = runner.latency(x, repeat=max(args.frames, 6 * BURST), idle_max_s=cpu.period_s, burst=BURST,
                                                   rel_sem=args.sem, max_s=args.max_s)
                            cpu_meas = (dev.cpu_seconds() - c0) / (len(times) + 1)   # + its warm-up frame
                            med = mean_times(times)
                            frame_s = med.total_s
                            rows.append({"model": name, "mbit": mbit, "method": method, "objective": objective,
                                         "calls": f"{len(d.device)}/{len(m.graph.ops)}",
                                         "kib": costs.parts(d.device)["bytes"] / 1024,
                                         "frames": len(times), "sem": burst_sem(times, BURST),
                                         "pred": cuts.frame_latency(costs, d.device, measured_link, cpu,
                                                                    idle_max_s=cpu.period_s, burst=BURST)[0],
                                         "additive": cuts.frame_latency(costs, d.device, additive, cpu,
                                                                        idle_max_s=cpu.period_s, burst=BURST)[0],
                                         "linear": costs.latency(d.device, link), "meas": med.total_s,
                                         "cpu_pred": cuts.device_work(costs.parts(d.device), cpu),
                                         "cpu_meas": cpu_meas, "decide": d.decide_s})
                        else:
                            # As many frames as fit in --max-s (at least 4) where frames are long; the
                            # latency objective (measured first) gave a frame's time.
                            st = runner.stream(x, frames=max(4, min(args.frames * 2, int(args.max_s / frame_s))))
                            rows.append({"model": name, "mbit": mbit, "method": method, "objective": objective,
                                         "calls": f"{len(d.device)}/{len(m.graph.ops)}",
                                         "kib": costs.parts(d.device)["bytes"] / 1024,
                                         "pred": cuts.frame_throughput(costs, d.device, measured_link, cpu),
                                         "meas": st.fps,
                                         "decide": d.decide_s})
                        del runner
            rows.append({"model": name, "mbit": mbit, "decision": (full_s, look_s, same)})
        notes.append(f"{name}: {len(m.graph.ops)} kernel calls; CIC's splitting model {len(env.cuts)} cuts from "
                     f"{env.min_cuts} min-cuts; exact over 200 bandwidths 0.1-1000 Mbit/s: "
                     f"{exact_sweep(costs, env, link.per_tensor_s)}")
    print_table(rows)
    lat = [r for r in rows if r.get("objective") == "latency"]
    for key in ("pred", "additive"):
        near = [abs(r["meas"] / r[key] - 1) for r in lat]
        print(f"latency within 10% of {key!r}: {sum(e <= 0.10 for e in near)} of {len(near)}, within 15%: "
              f"{sum(e <= 0.15 for e in near)}")
    for n in notes + calib:
        print(n)
    print(f"device {device.name}: {device.cpu_quota:g} of a core (CFS quota), cpuset CPU 0, in a network namespace; "
          f"server: this process, one TVM thread; links: veth pairs shaped by tbf on both "
          f"ends, no added delay. total {time.perf_counter() - t_start:.0f} s; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


def print_table(rows) -> None:
    print(f"{'model':<10} {'Mbit/s':>6} {'method':<13} {'device calls':>12} {'sent KiB':>9} {'linear':>7} "
          f"{'additive':>8} {'pred ms':>8} {'meas ms':>8} {'err':>6} {'frames':>6} {'sem':>5} {'dev CPU pred':>12} {'meas':>6} "
          f"{'pred fps':>9} {'meas fps':>9} {'err':>6}")
    by = {}
    for r in rows:
        if "decision" in r:
            full, look, same = r["decision"]
            print(f"{r['model']:<10} {r['mbit']:>6g} decision: full min-cut {full * 1e3:.2f} ms, CIC lookup "
                  f"{look * 1e6:.1f} us ({full / look:.0f}x faster), same cut cost: {same}")
            continue
        by.setdefault((r["model"], r["mbit"], r["method"]), {})[r["objective"]] = r
        pair = by[(r["model"], r["mbit"], r["method"])]
        if len(pair) == 2:
            lat, thr = pair["latency"], pair["throughput"]
            print(f"{r['model']:<10} {r['mbit']:>6g} {r['method']:<13} {lat['calls']:>12} {lat['kib']:>9.1f} "
                  f"{lat['linear'] * 1e3:>7.2f} {lat['additive'] * 1e3:>8.2f} {lat['pred'] * 1e3:>8.2f} {lat['meas'] * 1e3:>8.2f} "
                  f"{lat['meas'] / lat['pred'] - 1:>+6.0%} {lat['frames']:>6} {lat['sem']:>5.1%} {lat['cpu_pred'] * 1e3:>12.2f} {lat['cpu_meas'] * 1e3:>6.2f} "
                  f"{thr['pred']:>9.1f} {thr['meas']:>9.1f} {thr['meas'] / thr['pred'] - 1:>+6.0%}")

if __name__ == "__main__":
    from edgetvm.runtime.signals import exit_code, sigterm_raises

    try:
        with sigterm_raises():   # SIGTERM unwinds, so its cgroups, namespaces and links are removed
            sys.exit(main())
    except KeyboardInterrupt as e:
        sys.exit(exit_code(e))
