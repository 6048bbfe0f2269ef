"""`edgetvm pipeline plan|run`: cooperative inference over a fleet of devices (docs/pipeline.md)."""

from __future__ import annotations

from edgetvm.errors import UserError

METHODS = ("pso", "exhaustive", "dp", "equal", "single")


def add_pipeline_parser(sub) -> None:
    s = sub.add_parser("pipeline", help="a pipeline of devices: placement (PSO), stages (DP), row bands; run it")
    psub = s.add_subparsers(dest="pipeline_cmd", required=True, metavar="ACTION")
    p = psub.add_parser("plan", help="place and partition a model over a fleet; compile every device's part")
    p.add_argument("model", help="the .onnx file")
    p.add_argument("--fleet", required=True, help="fleet name (targets/fleets) or .toml file")
    p.add_argument("--method", choices=METHODS, default="pso")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bands", action="store_true",
                   help="only placements in which several devices share a stage's layers in row bands")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip measuring per-call RPC and band slicing costs on the emulated devices")
    p.add_argument("-o", "--output", required=True, help="plan directory to write")
    p.set_defaults(func=cmd_plan)
    r = psub.add_parser("run", help="stream frames through a plan on the emulated fleet")
    r.add_argument("plan", help="directory written by `edgetvm pipeline plan`")
    r.add_argument("--frames", type=int, default=20)
    r.set_defaults(func=cmd_run)


def describe(decision: dict) -> list[str]:
    lines = []
    for s, st in enumerate(decision["stages"]):
        bands = f" rows {st['bands']}" if st["bands"] else ""
        lines.append(f"  stage {s}: layers {st['layers'][0]}-{st['layers'][1] - 1} on {', '.join(st['devices'])}"
                     f"{bands}; period {st['period_s'] * 1e3:.2f} ms (compute {st['worker_s'] * 1e3:.2f}, "
                     f"send {st['forward_s'] * 1e3:.2f}, device busy {st.get('busy_s', 0) * 1e3:.2f})")
    pr = decision["predicted"]
    cal = "" if decision.get("calibration") else ", uncalibrated"
    lines.append(f"  predicted{cal}: {pr['throughput_fps']:.2f} frames/s, latency {pr['latency_s'] * 1e3:.1f} ms "
                 f"({decision['method']}, {decision['evaluations']} placements in {decision['search_s']:.2f} s)")
    return lines


def cmd_plan(args) -> int:
    from edgetvm.partition.pipeline import fleet as fleets
    from edgetvm.partition.pipeline import plan

    fleet = fleets.load_fleet(args.fleet)
    if args.method == "exhaustive" and len(fleet.devices) > 5:
        raise UserError("--method exhaustive is for fleets of up to 5 devices")
    from edgetvm.latte.devices import cgroups_unavailable
    from edgetvm.runtime.link import unavailable_reason

    # Calibrated where the fleet can be emulated here; elsewhere the plan uses the kernels' profiles alone.
    calibrate = not args.no_calibrate and not (unavailable_reason() or cgroups_unavailable())
    prep = plan.prepare(args.model, fleet, log=lambda msg: print(msg, flush=True), calibrate=calibrate)
    decision = plan.plan(prep, args.method, args.seed, bands=args.bands)
    plan.write_plan(prep, fleet, decision, args.output)
    print(f"{prep.model.path.name} over {fleet.name} ({len(fleet.devices)} devices, {prep.problem.n} layers):")
    print("\n".join(describe(decision)))
    print(f"wrote {args.output}")
    return 0


def cmd_run(args) -> int:
    from edgetvm.partition.pipeline.plan import open_plan
    from edgetvm.runtime.pipeline import run_plan

    if args.frames < 1:
        raise UserError("--frames must be at least 1")
    plan = open_plan(args.plan)
    res = run_plan(args.plan, args.frames, log=lambda msg: print(msg, flush=True))
    pr = plan["predicted"]
    err = res.throughput_fps / pr["throughput_fps"] - 1
    print(f"{res.frames} frames in {res.seconds:.2f} s ({res.frames / res.seconds:.2f} frames/s with the pipeline's "
          f"fill): {res.throughput_fps:.2f} frames/s from the first result to the last "
          f"(predicted {pr['throughput_fps']:.2f}, {err:+.0%}), median latency {res.latency_s * 1e3:.1f} ms "
          f"(predicted {pr['latency_s'] * 1e3:.1f})")
    print("per device while streaming, CPU used of its quota (throttled share of the time): "
          + ", ".join(f"{n} {res.quota_used[n]:.0%} ({res.throttled_share[n]:.0%})" for n in res.quota_used))
    print(f"outputs against the single-device build: max |diff| {res.max_abs_diff:.3g}"
          f"{' (bit-identical)' if res.identical else ''}")
    return 0 if res.max_abs_diff <= 1e-4 else 1
