"""CutEdge against static and frequency-unaware partitioning, side by side on the same traces.

Simulation (trace-driven, over the measured per-layer profiles): CutEdge at several V; Neurosurgeon's
best split point for the link's mean capacity, at the top clock and full rate; DADS (a min-cut per
slot) and CIC (its envelope's lookup per slot) re-decided for each slot's capacity at the top clock;
device-only; server-only; all on the same arrival trace (the same arrival rate) and capacity trace.
It fits the Lyapunov trade-off (energy = E* + a / V, backlog = b0 + b V), compares at equal mean
latency (CutEdge's energy interpolated along its V curve at each baseline's latency), and then runs
CutEdge on the emulated testbed (device in its cgroup, quota per clock; link shaped per rate) over
the first slots of the same traces and reports the testbed against the simulation of those slots,
with the device's clock as the testbed's CFS quota enforces it and the controller's turn at each
slot's start (simulate.Quota: read from the kernel, slots start on a period boundary; the turn
measured by a short run), and against the simulation at a uniformly slower clock.

    python bench/cutedge.py [--model ocr_cls] [--device sbc-a53] [--arrivals poisson-90fps]
        [--link lte-tmobile] [--V 1,10,100,1000,10000] [--slots 3000]
        [--testbed-V 10,1000] [--testbed-slots 300]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["TVM_NUM_THREADS"] = "1"  # the server: one thread (before TVM starts its pool)

import numpy as np  # noqa: E402

from edgetvm import zoo  # noqa: E402
from edgetvm.partition.cutedge import cli  # noqa: E402
from edgetvm.partition.cutedge.simulate import simulate  # noqa: E402

SHAPES = {"ocr_det": {"x": (1, 3, 160, 160)}}


def fit(x, y):
    """Least squares y = c0 + c1 x: (c0, c1, R^2)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    A = np.vstack([np.ones_like(x), x]).T
    (c0, c1), *_ = np.linalg.lstsq(A, y, rcond=None)
    pred = c0 + c1 * x
    ss = float(((y - y.mean()) ** 2).sum())
    return float(c0), float(c1), (1 - float(((y - pred) ** 2).sum()) / ss) if ss > 0 else 1.0


def energy_at_latency(curve, latency_ms):
    """CutEdge's energy per frame at a mean latency, interpolated (in log latency) along its V curve;
    None when the latency lies outside the curve."""
    pts = sorted((r["latency_mean_ms"], r["energy_per_frame_mj"]) for r in curve)
    lats = [p[0] for p in pts]
    if not lats[0] <= latency_ms <= lats[-1]:
        return None
    return float(np.interp(np.log(latency_ms), np.log(lats), [p[1] for p in pts]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ocr_cls")
    p.add_argument("--device", default="sbc-a53")
    p.add_argument("--arrivals", default="poisson-90fps")
    p.add_argument("--link", default="lte-tmobile")
    p.add_argument("--V", default="1,10,100,1000,10000")
    p.add_argument("--slots", type=int, default=None, help="simulated slots (default: the whole traces)")
    p.add_argument("--testbed-V", default="10,1000", help="V values run on the testbed ('' to skip)")
    p.add_argument("--testbed-slots", type=int, default=300)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-cutedge-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    src = zoo.path(args.model, work)
    shapes = SHAPES.get(args.model) or zoo.default_input_shapes(args.model)
    vs = cli.parse_vs(args.V)
    s = cli.prepare(src, args.device, "host", args.arrivals, args.link, args.slots, shapes)
    e = s.energy
    print(f"{args.model}: {len(s.model.graph.ops)} kernel calls, {len(s.cuts)} candidate cuts "
          f"({', '.join(c.label for c in s.cuts)}); device {s.device.name}: {len(e.freqs_mhz)} clocks "
          f"{e.freqs_mhz[0]:g}-{e.f_max:g} MHz, energy-optimal {e.energy_optimal_mhz():g} MHz; arrivals "
          f"{s.arrivals.path.name} {s.arrivals.mean_rate():.1f} frames/s, link {s.link.path.name} mean "
          f"{s.link.mean_rate():.1f} Mbit/s, {len(s.arrivals)} slots of {s.arrivals.slot_ms:g} ms")

    # ------------------------------------------------------------------------------ simulation
    t0 = time.perf_counter()
    pols = cli.policies(s, vs, None, True)
    sim = []
    for pol in pols:
        r = simulate(pol, e, s.arrivals, s.link)
        row = dict(r.summary(), mode="simulated")
        if getattr(pol, "decide_s", None):
            row["decide_us"] = float(np.median(pol.decide_s) * 1e6)
        sim.append(row)
    print(f"\nsimulation ({time.perf_counter() - t0:.1f} s for {len(pols)} policies):")
    cli.print_table(sim)
    for r in sim:
        if "decide_us" in r:
            print(f"  {r['policy']}: median decision {r['decide_us']:.1f} us")
    ce = [r for r in sim if r["policy"].startswith("cutedge")]
    base = [r for r in sim if not r["policy"].startswith("cutedge")]

    # ------------------------------------------------------------------------------ O(1/V), O(V)
    Vs = np.array(vs)
    e_star, a, r2e = fit(1 / Vs, [r["energy_per_frame_mj"] for r in ce])
    q0, qb, r2q = fit(Vs, [r["q_mean_ms"] for r in ce])
    b0, bb, r2b = fit(Vs, [r["b_mean_kb"] for r in ce])
    print(f"\ntrade-off fit over V = {args.V}:")
    print(f"  energy per frame = {e_star:.3f} + {a:.3f} / V mJ  (R^2 {r2e:.2f})")
    print(f"  device backlog Q = {q0:.2f} + {qb:.2e} V ms  (R^2 {r2q:.2f}); link backlog B = {b0:.2f} + {bb:.2e} V kB "
          f"(R^2 {r2b:.2f})")

    # ------------------------------------------------------------------------------ equal latency
    print("\nat equal mean latency (CutEdge's energy interpolated along its V curve):")
    for b in base:
        if b["unfinished"]:
            print(f"  {b['policy']:<13} unstable at this arrival rate ({b['unfinished']} frames unfinished): no comparison")
            continue
        at = energy_at_latency(ce, b["latency_mean_ms"])
        if at is None:
            lo = min(ce, key=lambda r: r["latency_mean_ms"])
            cheaper = min((r for r in ce if r["latency_mean_ms"] <= b["latency_mean_ms"]),
                          key=lambda r: r["energy_per_frame_mj"], default=None)
            if cheaper is None:
                print(f"  {b['policy']:<13} {b['energy_per_frame_mj']:.2f} mJ at {b['latency_mean_ms']:.1f} ms; CutEdge's "
                      f"lowest latency is {lo['latency_mean_ms']:.1f} ms ({lo['energy_per_frame_mj']:.2f} mJ): "
                      f"no CutEdge point at that latency")
            else:
                print(f"  {b['policy']:<13} {b['energy_per_frame_mj']:.2f} mJ at {b['latency_mean_ms']:.1f} ms; CutEdge "
                      f"{cheaper['energy_per_frame_mj']:.2f} mJ at {cheaper['latency_mean_ms']:.1f} ms (lower latency): "
                      f"{1 - cheaper['energy_per_frame_mj'] / b['energy_per_frame_mj']:.1%} less energy")
            continue
        print(f"  {b['policy']:<13} {b['energy_per_frame_mj']:.2f} mJ at {b['latency_mean_ms']:.1f} ms; CutEdge {at:.2f} mJ: "
              f"{1 - at / b['energy_per_frame_mj']:.1%} less energy")
    dev = next(b for b in base if b["policy"] == "device-only")
    srv = next(b for b in base if b["policy"] == "server-only")
    best = min(ce, key=lambda r: r["energy_per_frame_mj"])
    print(f"  CutEdge (V={best['policy'].split('=')[1]}) against device-only: "
          f"{1 - best['energy_per_frame_mj'] / dev['energy_per_frame_mj']:.1%} less energy; against server-only: "
          f"{best['throughput_fps'] / srv['throughput_fps'] - 1:.1%} more frames/s")
    # The V sweep trades energy for backlog, not for latency: with its queues empty CutEdge runs at the
    # energy-optimal clock whatever V is. Its latency knob is the virtual queue: CutEdge with a mean
    # latency target equal to each baseline's measured mean latency, at the largest V.
    from edgetvm.partition.cutedge import controller

    print(f"\nCutEdge with a mean-latency target set to each baseline's mean latency (V = {max(vs):g}):")
    cuts = controller.candidate_cuts(s.costs, s.envelope, s.measured)
    for b in base:
        if b["unfinished"]:
            continue
        pol = controller.CutEdge(cuts, e, s.arrivals.slot_s, max(vs), b["latency_mean_ms"] / 1e3)
        r = simulate(pol, e, s.arrivals, s.link).summary()
        print(f"  {b['policy']:<13} {b['energy_per_frame_mj']:.2f} mJ at {b['latency_mean_ms']:.1f} ms; CutEdge "
              f"{r['energy_per_frame_mj']:.2f} mJ at {r['latency_mean_ms']:.1f} ms (p95 {r['latency_p95_ms']:.1f}): "
              f"{1 - r['energy_per_frame_mj'] / b['energy_per_frame_mj']:.1%} less energy, latency "
              f"{r['latency_mean_ms'] / b['latency_mean_ms'] - 1:+.1%}")

    # ------------------------------------------------------------------------------ testbed
    if args.testbed_V:
        from edgetvm.runtime.cutedge import open_testbed

        tvs = cli.parse_vs(args.testbed_V)
        ts = cli.prepare(src, args.device, "host", args.arrivals, args.link, args.testbed_slots, shapes,
                         log=lambda *a: None)
        print(f"\ntestbed: the first {args.testbed_slots} slots ({args.testbed_slots * ts.arrivals.slot_s:.0f} s), "
              f"real time, against the simulation of the same slots")
        with open_testbed(ts, list(ts.cuts), work / "splits") as tb:
            ts.measured = tb.calibrate(rate_mbit=ts.link.mean_rate())
            for line in cli.describe_measured(ts):
                print(f"  {line}")
            quota = tb.quota(tb.turn())
            if quota is not None:
                print(f"  the device's clock is a CFS quota of a {quota.period_s * 1e3:g} ms period, its ticks "
                      f"{quota.tick_phase_s * 1e3:.2f} ms after each boundary; slots start on a boundary; a slot's "
                      f"first frame starts on the device {quota.turn_s * 1e3:.2f} ms after it (the controller's turn)")
            rows, stages, fluid = [], [], []
            pols = zip(*(cli.policies(ts, tvs, None, False) for _ in range(3)))
            for pol_sim, pol_fluid, pol_run in pols:
                # the testbed's device as CFS runs it (a clock is a quota: a frame runs at full speed while
                # the period's quota lasts), and a real board's clock (uniformly slower), for reference
                sim = simulate(pol_sim, ts.energy, ts.arrivals, ts.link, quota=quota)
                fluid.append(simulate(pol_fluid, ts.energy, ts.arrivals, ts.link).summary())
                real = tb.run(pol_run)
                rows += [dict(sim.summary(), mode="simulated"), dict(real.summary(), mode="testbed")]
                stages.append((pol_sim.name, sim.stage_means_ms(), real.stage_means_ms()))
        cli.print_table(rows)
        print("  where a frame's time goes (mean ms per finished frame: waiting for a stage, then in it; busy times charged)")
        names = list(stages[0][1])
        print("  " + f"{'method':18s} {'mode':10s}" + "".join(f"{n:>13s}" for n in names))
        for name, sim_st, real_st in stages:
            for mode, st in (("simulated", sim_st), ("testbed", real_st)):
                print("  " + f"{name:18s} {mode:10s}" + "".join(f"{st[n]:13.2f}" for n in names))
        for rs, rt, rf in zip(rows[::2], rows[1::2], fluid):
            de = rt["energy_per_frame_mj"] / rs["energy_per_frame_mj"] - 1
            dl = rt["latency_mean_ms"] / rs["latency_mean_ms"] - 1
            ok = abs(de) <= 0.10 and abs(dl) <= 0.10
            print(f"  {rs['policy']}: testbed/simulation energy {de:+.1%}, mean latency {dl:+.1%} "
                  f"({'within' if ok else 'outside'} the 10% goal); against the simulation at a uniformly "
                  f"slower clock: energy {rt['energy_per_frame_mj'] / rf['energy_per_frame_mj'] - 1:+.1%}, "
                  f"latency {rt['latency_mean_ms'] / rf['latency_mean_ms'] - 1:+.1%}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())} (timings on a shared machine are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
