"""`edgetvm latte profile | fit | allocate | simulate` (also `python -m edgetvm.latte.cli ...`)."""

from __future__ import annotations

import argparse
import sys
import time
from fractions import Fraction
import os
from pathlib import Path

from edgetvm.errors import UserError
from edgetvm.latte import models

DEFAULT_DIR = Path(os.environ.get("EDGETVM_CACHE") or Path.home() / ".cache" / "edgetvm") / "latte" / "run"


def _widths(text: str) -> list[float]:
    try:
        ws = [float(Fraction(t.strip())) for t in text.split(",")]  # "1,1/2,1/4"
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of width ratios like 1,1/2,1/4,1/8")
    if not ws or any(not 0 < w <= 1 for w in ws):
        raise argparse.ArgumentTypeError(f"width ratios must lie in (0, 1], got '{text}'")
    return ws


def cmd_profile(args) -> None:
    from edgetvm.latte.devices import list_profiles, load_profile
    from edgetvm.latte.pipeline import profile_fleet

    profs = [load_profile(n) for n in args.device] if args.device else list_profiles()
    if args.mcpu:
        from edgetvm.latte.training import check_cpu

        check_cpu(args.mcpu)
        os.environ["EDGETVM_LATTE_MCPU"] = args.mcpu  # the compile cache and the measuring processes see it
    t0 = time.time()
    session = None
    if args.rpc or args.tracker:
        from edgetvm.runtime.session import connect

        session = connect(args.rpc, args.tracker, args.key)  # an unreachable address fails here, at once
        if not args.device:
            profs = list_profiles(boards=True)
    from edgetvm.latte.pipeline import TUNED_ARCHS

    archs = args.arch or list(models.ARCHS)
    tuned = [] if args.no_tuned else (args.tuned or [a for a in TUNED_ARCHS if a in archs])
    try:
        data = profile_fleet(profs, archs, args.widths, out=args.output, min_time=args.min_time,
                             repeats=args.repeats, session=session, tuned_archs=tuned)
    except KeyboardInterrupt:
        print(file=sys.stderr)  # ends the progress line: the CLI reports the interruption on a line of its own
        raise
    print(f"{len(data['measurements'])} measurements of {len(data['metas'])} compiled training steps on "
          f"{len(data['runs'])} devices in {time.time() - t0:.0f} s -> {args.output}")
    from edgetvm.latte.pipeline import noise_floor

    nz = noise_floor(data)
    if nz:
        print(f"repeatability: whole steps measured {nz['repeats']}x by separate processes differ by "
              f"{nz['pair_mape']:.1f}% on average, {nz['within10']:.0f}% within +-10%")
    again = {p: r["remeasured"] for p, r in data["runs"].items() if r.get("remeasured")}
    if again:
        print("measured again, a run's steps all slower than in the device's other runs (a disturbed process): "
              + ", ".join(f"{p} x{n}" for p, n in again.items()))
    fed = [m for m in data["measurements"] if models.is_fed(m)]
    if fed:
        ws = sorted({m["width"] for m in fed}, reverse=True)
        print(f"measured ms per training step of {models.FED_ARCH} (batch 32, forward+backward+SGD, TVM):")
        print(f"{'device':<14}" + "".join(f"{'w=' + format(w, 'g'):>10}" for w in ws))
        for p in data["runs"]:
            row = {m["width"]: m["step_s"] for m in fed if m["profile"] == p}
            print(f"{p:<14}" + "".join(f"{row[w] * 1e3:>10.2f}" if w in row else f"{'-':>10}" for w in ws))


def cmd_fit(args) -> None:
    from edgetvm.latte.pipeline import fit_and_evaluate, format_report, load_profile_data

    data = load_profile_data(args.profile)
    archs = args.held_out_arch or ("mlp-d", "cnn-c", models.FED_ARCH)
    profs = args.held_out_device or ("tablet-old", "iot-gw")
    _, _, report = fit_and_evaluate(data, archs, profs, save=args.output)
    print(format_report(report))
    print(f"model -> {args.output}")


def _plan(args):
    from edgetvm.costmodels.latte import LatteModel
    from edgetvm.latte.experiment import fleet_of, step_tables
    from edgetvm.latte.fed import Plan
    from edgetvm.latte.pipeline import load_profile_data

    data = load_profile_data(args.profile)
    model = LatteModel.load(args.model)
    fleet = fleet_of(args.clients, args.device)
    measured, predicted = step_tables(data, model, fleet)
    return Plan(fleet=fleet, measured=measured, predicted=predicted, local_steps=args.local_steps,
                deadline=args.deadline / 1e3 if args.deadline else None, seed=args.seed)


def cmd_allocate(args) -> None:
    import warnings

    from edgetvm.latte import allocate
    from edgetvm.latte.experiment import allocation_table

    plan = _plan(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assign, deadline = allocate.latte(plan.fleet, plan.predicted_step, plan.arch, plan.batch,
                                          plan.local_steps, plan.deadline)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(allocation_table(assign, plan.measured, deadline))
    done = [a for a in assign if a.width is not None]
    if done:
        meas = [plan.measured[(a.profile, a.width)] * a.steps for a in done if (a.profile, a.width) in plan.measured]
        if meas:
            print(f"measured round time (slowest client) {max(meas) * 1e3:.1f} ms; fastest client "
                  f"{min(meas) * 1e3:.1f} ms")


def cmd_simulate(args) -> None:
    from edgetvm.latte import fed
    from edgetvm.latte.experiment import dump_histories, plot, summary

    plan = _plan(args)
    plan.rounds, plan.crash_rate, plan.alpha = args.rounds, args.crash_rate, args.alpha
    total = args.rounds * len(args.methods)
    done = [0]

    def on_round(method, rnd, acc, sim):
        if rnd == 0:
            return
        done[0] += 1
        from edgetvm.latte.pipeline import progress

        progress(done[0], total, f"{method} round {rnd}: acc {acc:.3f}, sim {sim:.2f}s")

    plan.on_round = on_round
    for m in args.methods:
        if m not in fed.METHODS:
            raise UserError(f"unknown method '{m}'; choose from {', '.join(fed.METHODS)}")
    hist = fed.simulate(plan, args.methods, verbose=args.verbose)
    text, _ = summary(hist, args.target)
    print(text)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    dump_histories(hist, out / "history.json")
    png = plot(hist, out / "accuracy_vs_time.png", args.target)
    print(f"history -> {out / 'history.json'}" + (f"; plot -> {png}" if png else " (no matplotlib: no plot)"))


def add_latte_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("latte", help="training-time cost models, sub-model allocation, federated training")
    sub = p.add_subparsers(dest="latte_cmd", required=True, metavar="ACTION")

    s = sub.add_parser("profile", help="compile the model family's training steps with TVM and measure them "
                                       "on each emulated device (cgroups; needs root) or on a board over RPC")
    s.add_argument("--device", action="append", help="device profile name or TOML file (repeat; default: all)")
    s.add_argument("--arch", action="append", choices=list(models.ARCHS), help="architecture (repeat; default: all)")
    s.add_argument("--tuned", action="append", choices=list(models.ARCHS),
                   help="also profile this architecture with MetaSchedule-tuned kernels (repeat; default: "
                        "mlp-a, cnn-a, mlp-d, cnn-c among the profiled ones)")
    s.add_argument("--no-tuned", action="store_true", help="default TVM schedules only")
    s.add_argument("--widths", type=_widths, default=list(models.WIDTHS), help="width ratios (default 1,1/2,1/4,1/8)")
    s.add_argument("--min-time", type=float, default=0.1,
                   help="CPU seconds of whole steps per measurement; throttled devices run longer (default 0.1)")
    s.add_argument("--rpc", metavar="HOST:PORT", help="measure device profiles that name a board (e.g. rpi4-board) "
                                                    "on the board behind this RPC server")
    s.add_argument("--tracker", metavar="HOST:PORT", help="... or on the board registered at this RPC tracker")
    s.add_argument("--key", help="the key the board registered under at --tracker")
    s.add_argument("--mcpu", metavar="CPU", help="compile for this older CPU model the host also runs (e.g. haswell: "
                   "no AVX-512), a second CPU configuration to test the cost model across machines")
    s.add_argument("--repeats", type=int, default=2,
                   help="measure every device this many times, each by a fresh process; times are the median "
                        "and the spread is the noise floor (default 2)")
    s.add_argument("-o", "--output", type=Path, default=DEFAULT_DIR / "profile.json")
    s.set_defaults(func=cmd_profile)

    s = sub.add_parser("fit", help="fit the XGBoost cost model; report MAPE on held-out archs and devices")
    s.add_argument("--profile", type=Path, default=DEFAULT_DIR / "profile.json")
    s.add_argument("--held-out-arch", action="append")
    s.add_argument("--held-out-device", action="append")
    s.add_argument("-o", "--output", type=Path, default=DEFAULT_DIR / "model")
    s.set_defaults(func=cmd_fit)

    for name, func, hlp in (("allocate", cmd_allocate, "pick each device's width and local steps for a round"),
                            ("simulate", cmd_simulate, "federated training on Flower: LATTE vs FedAvg, "
                                                       "HeteroFL, FedRolex")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--profile", type=Path, default=DEFAULT_DIR / "profile.json")
        s.add_argument("--model", type=Path, default=DEFAULT_DIR / "model")
        s.add_argument("--clients", type=int, default=12)
        s.add_argument("--device", action="append", help="fleet device profiles, assigned round-robin (default: all)")
        s.add_argument("--local-steps", type=int, default=20)
        s.add_argument("--deadline", type=float, help="round deadline in ms (default: automatic)")
        s.add_argument("--seed", type=int, default=0)
        s.set_defaults(func=func)
        if name == "simulate":
            s.add_argument("--rounds", type=int, default=40)
            s.add_argument("--methods", nargs="+", default=list(("latte", "fedavg", "heterofl", "fedrolex")))
            s.add_argument("--target", type=float, default=0.90, help="target test accuracy (default 0.90)")
            s.add_argument("--crash-rate", type=float, default=0.0,
                           help="probability that a client crashes mid-round (failure injection)")
            s.add_argument("--alpha", type=float, default=0.3, help="Dirichlet non-IID concentration")
            s.add_argument("-o", "--output", type=Path, default=DEFAULT_DIR / "sim")
            s.add_argument("--verbose", action="store_true", help="show Flower's log")
    return p


def main(argv: list[str] | None = None) -> int:
    from edgetvm.cli import main as edgetvm_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return edgetvm_main(argv if argv[:1] == ["latte"] else ["latte", *argv])


if __name__ == "__main__":
    sys.exit(main())
