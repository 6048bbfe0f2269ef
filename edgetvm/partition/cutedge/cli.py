"""`edgetvm cutedge simulate|run|trace`: CutEdge over traces, in simulation or on the emulated testbed.

    edgetvm cutedge simulate MODEL.onnx --device phone-mid --server host --V 1,10,100 \
        --arrivals poisson-10fps --link lte-verizon -o DIR
    edgetvm cutedge run MODEL.onnx ...same...          (the emulated device and link, in real time)
    edgetvm cutedge trace arrivals|link|record ... -o FILE.csv
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edgetvm.errors import UserError


def add_cutedge_parser(sub) -> None:
    from edgetvm.cli import _shape_arg

    s = sub.add_parser("cutedge", help="CutEdge: Lyapunov control of the split point, the device's clock and rate")
    csub = s.add_subparsers(dest="cutedge_cmd", required=True, metavar="ACTION")
    for verb, text in (("simulate", "trace-driven simulation over the measured per-layer profiles"),
                       ("run", "real run on the emulated device and link (cgroup quota per clock, tc rate per rate)")):
        c = csub.add_parser(verb, help=text)
        c.add_argument("model", help="the .onnx file")
        c.add_argument("--device", required=True, help="device profile with [dvfs], [power], [radio] (e.g. phone-mid)")
        c.add_argument("--server", default="host", help="board the server part runs on (default host, one thread)")
        c.add_argument("--V", default="1,10,100", help="comma-separated positive trade-off weights (default 1,10,100)")
        c.add_argument("--arrivals", required=True, help="frame-arrival trace (file, or a name in targets/traces)")
        c.add_argument("--link", required=True, help="link-capacity trace (file, or a name in targets/traces)")
        c.add_argument("--slots", type=int, help="use the first N slots of the traces (default: all)")
        c.add_argument("--latency-target", type=float, metavar="MS", help="mean latency target (virtual queue)")
        c.add_argument("--input-shape", action="append", type=_shape_arg, metavar="NAME:D1,D2,...")
        c.add_argument("-o", "--output", required=True, help="directory for results.json and the plots")
        if verb == "simulate":
            c.add_argument("--no-baselines", action="store_true", help="CutEdge only")
        else:
            c.add_argument("--baselines", action="store_true", help="also run the baselines on the testbed")
        c.set_defaults(func=cmd_cutedge)
    t = csub.add_parser("trace", help="make a trace file (seeded) or record one from the emulated link")
    t.add_argument("kind", choices=("arrivals", "link", "record"))
    t.add_argument("--model", help="arrivals: poisson or bursty; link: a model of targets/traces/link-models.toml")
    t.add_argument("--fps", type=float, default=10.0, help="arrivals: mean frames per second")
    t.add_argument("--scale", type=float, default=1.0, help="link: multiply the capacity")
    t.add_argument("--from", dest="source", help="record: the capacity trace to replay through the link "
                                                 "(default: the link profile's fixed rate)")
    t.add_argument("--link-profile", default="lte-5mbit", help="record: the link profile (targets/links)")
    t.add_argument("--slots", type=int, default=3000)
    t.add_argument("--slot-ms", type=float, default=100.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("-o", "--output", required=True)
    t.set_defaults(func=cmd_trace)


def parse_vs(text: str) -> list[float]:
    vals = []
    for part in str(text).split(","):
        try:
            v = float(part)
        except ValueError:
            raise UserError(f"--V '{text}': '{part}' is not a number; give positive weights like --V 1,10,100") from None
        if not v > 0 or v != v or v == float("inf"):
            raise UserError(f"--V '{text}': V = {part.strip()} is not positive; V weighs energy against "
                            f"queueing and must be > 0, like --V 1,10,100")
        vals.append(v)
    return vals


@dataclass
class Setup:
    model: object          # split.Model
    costs: object
    energy: object         # model.DeviceEnergy
    device: object         # the device profile
    server: object
    cuts: list
    envelope: object
    arrivals: object       # traces.Trace
    link: object
    measured: object = None  # controller.Measured: the cuts' costs on the testbed, once measured


def load_traces(arrivals: str, link: str, slots: int | None):
    from edgetvm.partition.cutedge import traces

    a = traces.load(arrivals, "arrivals")
    c = traces.load(link, "link")
    if abs(a.slot_ms - c.slot_ms) > 1e-9:
        raise UserError(f"the arrival trace's slots are {a.slot_ms:g} ms and the link trace's {c.slot_ms:g} ms; "
                        f"give traces of the same slot length")
    if slots is not None:
        if slots < 1:
            raise UserError(f"--slots {slots}: give a positive number of slots")
        if slots > len(a):
            raise UserError(f"--slots {slots}: the arrival trace {a.path} has only {len(a)} slots")
        a = replace(a, values=a.values[:slots])
    return a, c


def prepare(model_path, device_name: str, server_name: str, arrivals: str, link: str, slots=None,
            shapes=None, log=print) -> Setup:
    """Everything but the run: traces and energy model checked first (cheap), then profiles (cached)."""
    from edgetvm.latte.devices import load_profile
    from edgetvm.partition import cuts as cutlib
    from edgetvm.partition import split
    from edgetvm.partition.cutedge import controller, model
    from edgetvm.targets import load_board

    a, c = load_traces(arrivals, link, slots)
    device = load_profile(device_name)
    if device.board:
        raise UserError(f"device profile '{device.name}' is a real board; cutedge controls an emulated device's "
                        f"clock (its CFS quota): choose an emulated profile")
    energy = model.load(device)
    server = load_board(server_name)
    if not server.runs_on_host():
        raise UserError(f"server board '{server.name}' ({server.arch}) does not run here; give --server host")
    server = replace(server, cores=1)  # the server part runs with one TVM thread (TVM_NUM_THREADS=1)
    if not Path(model_path).is_file():
        raise UserError(f"model {model_path} does not exist; give an .onnx file (e.g. `edgetvm zoo export ocr_cls -o m.onnx`)")
    m = split.load_model(model_path, shapes)
    prof_dev = split.profile(m, device, log)
    prof_srv = split.profile(m, server, log)
    costs = cutlib.Costs(m.graph, prof_dev.time_s, prof_srv.time_s)
    env = cutlib.cic_envelope(costs, 0.0)
    return Setup(m, costs, energy, device, server, controller.candidate_cuts(costs, env), env, a, c)


def describe_measured(s: Setup) -> list[str]:
    """One line per measured cut: its costs on the testbed against its profile."""
    lines = ["a frame's costs measured here, which the simulation then uses (at f_max; profiled sums in brackets):"]
    for d, m in sorted(s.measured.cuts.items(), key=lambda kv: len(kv[0])):
        p = s.costs.parts(d)
        lines.append(f"  {len(d)}/{len(s.costs.graph.ops)} ops on the device: processor {m.work_s * 1e3:.2f} ms "
                     f"({p['device_s'] * 1e3:.2f}) + waiting on calls {m.call_s * 1e3:.2f} ms, server {m.server_s * 1e3:.2f} ms ({p['server_s'] * 1e3:.2f})")
    return lines


def policies(s: Setup, vs: list[float], latency_target_ms: float | None, with_baselines: bool) -> list:
    from edgetvm.partition.cutedge import controller

    target = latency_target_ms / 1e3 if latency_target_ms else None
    cuts = controller.candidate_cuts(s.costs, s.envelope, s.measured)
    out = [controller.CutEdge(cuts, s.energy, s.arrivals.slot_s, v, target) for v in vs]
    if with_baselines:
        out += controller.baselines(s.costs, s.energy, s.link.mean_rate(), s.envelope, s.measured)
    return out


def cmd_cutedge(args) -> None:
    os.environ.setdefault("TVM_NUM_THREADS", "1")  # the server part: one thread (before TVM's pool starts)
    vs = parse_vs(args.V)
    if args.latency_target is not None and not args.latency_target > 0:
        raise UserError(f"--latency-target {args.latency_target:g}: give a positive number of milliseconds")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} exists and is not a directory; choose another path")
    s = prepare(args.model, args.device, args.server, args.arrivals, args.link, args.slots,
                dict(args.input_shape or []))
    out.mkdir(parents=True, exist_ok=True)
    print(f"cutedge {args.cutedge_cmd}: {Path(args.model).name}, {len(s.model.graph.ops)} kernel calls, "
          f"{len(s.cuts)} candidate cuts; device {s.device.name} ({len(s.energy.freqs_mhz)} clocks "
          f"{s.energy.freqs_mhz[0]:g}-{s.energy.f_max:g} MHz, energy-optimal {s.energy.energy_optimal_mhz():g}); "
          f"{len(s.arrivals)} slots of {s.arrivals.slot_ms:g} ms, arrivals {s.arrivals.mean_rate():.2f} frames/s, "
          f"link mean {s.link.mean_rate():.2f} Mbit/s")
    from edgetvm.partition.cutedge.simulate import simulate

    baselines = args.cutedge_cmd == "simulate" and not args.no_baselines or args.cutedge_cmd == "run" and args.baselines
    rows = []
    if args.cutedge_cmd == "simulate":
        t0 = time.perf_counter()
        sim = [simulate(p, s.energy, s.arrivals, s.link) for p in policies(s, vs, args.latency_target, baselines)]
        sim_s = time.perf_counter() - t0
        rows = [dict(r.summary(), mode="simulated") for r in sim]
    else:
        from edgetvm.runtime.cutedge import open_testbed

        cuts = list(s.cuts) + [c for p in policies(s, vs, None, baselines) for c in p.fixed_cuts()]
        with open_testbed(s, cuts, out / "splits") as tb:
            s.measured = tb.calibrate(rate_mbit=s.link.mean_rate())
            for line in describe_measured(s):
                print(f"  testbed: {line}")
            rows = [dict(simulate(p, s.energy, s.arrivals, s.link).summary(), mode="simulated")
                    for p in policies(s, vs, args.latency_target, baselines)]
            for p in policies(s, vs, args.latency_target, baselines):
                print(f"  testbed: {p.name}, {len(s.arrivals)} slots of {s.arrivals.slot_ms:g} ms")
                rows.append(dict(tb.run(p).summary(), mode="testbed"))
    print_table(rows)
    if args.cutedge_cmd == "simulate":
        print(f"  simulated {len(sim)} policies x {len(s.arrivals)} slots in {sim_s:.2f} s")
    write_results(out, rows, s, vs)


def print_table(rows: list[dict]) -> None:
    print(f"  {'method':<18} {'mode':<9} {'mJ/frame':>9} {'power W':>8} {'fps':>6} {'lat ms':>8} {'p95 ms':>8} "
          f"{'Q ms':>8} {'B kB':>8} {'MHz':>6} {'done':>6} {'left':>5}")
    for r in rows:
        print(f"  {r['policy']:<18} {r['mode']:<9} {r['energy_per_frame_mj']:>9.2f} {r['power_w']:>8.3f} "
              f"{r['throughput_fps']:>6.2f} {r['latency_mean_ms']:>8.1f} {r['latency_p95_ms']:>8.1f} "
              f"{r['q_mean_ms']:>8.1f} {r['b_mean_kb']:>8.1f} {r['mean_f_mhz']:>6.0f} {r['completed']:>6} "
              f"{r['unfinished']:>5}")


def write_results(out: Path, rows: list[dict], s: Setup, vs: list[float]) -> None:
    from edgetvm.partition.cutedge import plots

    doc = {"model": str(s.model.path), "device": s.device.name, "server": s.server.name, "V": vs,
           "arrivals": str(s.arrivals.path), "link": str(s.link.path), "slot_ms": s.arrivals.slot_ms,
           "cuts": [{"label": c.label, "device_ops": len(c.device), "work_ms": c.work_s * 1e3, "bytes": c.bytes,
                     "server_ms": c.server_s * 1e3} for c in s.cuts],
           "energy_model": {"freqs_mhz": list(s.energy.freqs_mhz), "static_w": s.energy.static_w,
                            "kappa_w_per_ghz3": s.energy.kappa, "radio": asdict(s.energy.radio)},
           "results": rows}
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
    for p in plots.write(out, rows):
        print(f"  wrote {p}")
    print(f"  wrote {out / 'results.json'}")


def cmd_trace(args) -> None:
    from edgetvm.partition.cutedge import traces

    if args.slots < 1 or not args.slot_ms > 0:
        raise UserError("--slots and --slot-ms must be positive")
    out = Path(args.output)
    if not out.resolve().parent.is_dir():
        raise UserError(f"-o {out}: directory {out.resolve().parent} does not exist")
    if args.kind == "arrivals":
        if args.model not in ("poisson", "bursty"):
            raise UserError(f"arrivals --model '{args.model}': give poisson or bursty")
        if not args.fps > 0:
            raise UserError(f"--fps {args.fps:g}: give a positive rate")
        gen = traces.poisson if args.model == "poisson" else traces.bursty
        tr = gen(args.fps, args.slots, args.slot_ms, args.seed)
    elif args.kind == "link":
        if not args.model:
            raise UserError(f"link --model: give one of {', '.join(sorted(traces.link_models()))}")
        tr = traces.lognormal_ar1(args.model, args.slots, args.slot_ms, args.seed, args.scale)
    else:
        from edgetvm.runtime.cutedge import record_link

        source = traces.load(args.source, "link") if args.source else None
        tr = record_link(args.link_profile, args.slots, args.slot_ms, source)
    traces.write(tr, out)
    print(f"wrote {out}: {len(tr)} slots of {tr.slot_ms:g} ms, mean "
          f"{tr.mean_rate():.3f} {'frames/s' if tr.kind == 'arrivals' else 'Mbit/s'}")
