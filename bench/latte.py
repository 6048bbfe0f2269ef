"""LATTE benchmark: estimator error (ours vs the FLOPs-coefficient baseline) on held-out architectures and
devices, then federated training on Flower with LATTE, FedAvg, HeteroFL and FedRolex in one simulation,
with each method's simulated time to a target accuracy and LATTE's speed-ups.

    python bench/latte.py [--reprofile [--repeats 3]] [--cv] [--diagnose] [--other-profile P.json]
                          [--rounds 40] [--clients 12] [--target 0.9]

--diagnose prints where the model misses (held-out residuals by device, architecture, width, schedule and
kernel kind) and each feature group's worth (refit without it). --other-profile takes a profile measured
on another machine or CPU configuration (`edgetvm latte profile --mcpu haswell` here) and predicts it
with the model fitted on this one.

Measurements (TVM-compiled training steps timed inside each device profile's cgroup) are reused from
`edgetvm latte profile` output when present; --reprofile measures again (about 7 minutes per repeat
here: 11 architectures x 4 widths with TVM's default kernels and 4 of them with MetaSchedule-tuned
kernels, on 9 devices; tuning them the first time adds about 13 minutes). Each step's time is the
median of its repeats, so more repeats make both the training data and the held-out truth less
noisy: 3 repeats scored 5.7 / 5.0 / 5.9% MAPE on the held-out sets, 5 repeats 3.7 / 3.3 / 5.0% with
the same model (default kernels only). The report splits each held-out set by schedule.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from edgetvm.latte import fed, models
from edgetvm.latte.cli import DEFAULT_DIR
from edgetvm.latte.devices import list_profiles
from edgetvm.latte.experiment import fleet_of, plot, step_tables, summary
from edgetvm.costmodels.latte import LatteModel, errors
from edgetvm.latte.pipeline import (cross_validate, fit_and_evaluate, format_cv, format_report, load_profile_data,
                                    noise_floor, profile_fleet, tuned_speedups)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", type=Path, default=DEFAULT_DIR / "profile.json")
    ap.add_argument("--reprofile", action="store_true")
    ap.add_argument("--repeats", type=int, default=3,
                    help="when profiling: measurements per device by separate processes (medians; noise floor)")
    ap.add_argument("--cv", action="store_true", help="also leave-one-architecture-out and leave-one-device-out")
    ap.add_argument("--diagnose", action="store_true", help="residuals by group and feature-group ablations")
    ap.add_argument("--other-profile", type=Path, help="a profile from another machine: predict it across machines")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--crash-rate", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR / "bench")
    args = ap.parse_args(argv)

    t0 = time.time()
    if args.reprofile or not args.profile.exists():
        data = profile_fleet(list_profiles(), out=args.profile, repeats=args.repeats)
    else:
        data = load_profile_data(args.profile)
    print(f"measurements: {len(data['measurements'])} (TVM-compiled forward+backward+SGD steps, batch 32, "
          f"timed in cgroups on {len(data['runs'])} emulated devices)")
    sp = tuned_speedups(data)
    if sp:
        print(f"MetaSchedule-tuned vs default kernels, same steps on the same devices: the tuned step is "
              f"{np.median(sp):.1f}x faster (median; {min(sp):.1f}x-{max(sp):.1f}x over {len(sp)} pairs) at "
              f"equal FLOPs, which a FLOPs model cannot see")
    model, _, report = fit_and_evaluate(data, save=args.out / "model")
    print(format_report(report))
    if args.cv:
        print(format_cv(cross_validate(data)))
    if args.diagnose:
        from edgetvm.latte.diagnose import ablation, format_diagnosis, kernel_residuals, step_residuals
        from edgetvm.latte.pipeline import current_metas, split

        held = [m for ms in split(data)[1].values() for m in ms]
        print(format_diagnosis(step_residuals(report), kernel_residuals(model, held, current_metas(data)),
                               ablation(data)))
    if args.other_profile:
        from edgetvm.latte.pipeline import cross_machine, format_cross

        print(format_cross(cross_machine(data, load_profile_data(args.other_profile))))
    print()

    fleet = fleet_of(args.clients)
    # the allocator's cost model: every device, never the federated architecture
    deployed = LatteModel.load(args.out / "model")
    measured, predicted = step_tables(data, deployed, fleet)
    pairs = [(predicted[k], measured[k]) for k in predicted if k in measured]
    if pairs:
        e = errors([p for p, _ in pairs], [t for _, t in pairs])
        nz = noise_floor(data, [m for m in data["measurements"] if models.is_fed(m)])
        perfect = f"; a perfect model {nz['floor_mape']:.1f}%" if nz else ""
        print(f"allocator's cost model on {models.FED_ARCH} (an architecture it never saw), whole steps on the fleet: "
              f"MAPE {e['mape']:.1f}%, {e['within10']:.0f}% within +-10% ({e['n']} device x width pairs{perfect})")
    plan = fed.Plan(fleet=fleet, measured=measured, predicted=predicted, local_steps=args.local_steps,
                    rounds=args.rounds, crash_rate=args.crash_rate)
    print(f"Flower simulation: {args.clients} non-IID clients on digits, LATTE and FedAvg {args.rounds} rounds, "
          f"HeteroFL and FedRolex as many rounds as fill FedAvg's simulated time, "
          f"model {models.FED_ARCH} {models.ARCHS[models.FED_ARCH]['hidden']}, local training in numpy, "
          f"crash rate {args.crash_rate:g}")
    hist = fed.simulate(plan)
    text, tt = summary(hist, args.target)
    print(text)
    png = plot(hist, args.out / "accuracy_vs_time.png", args.target)
    if png:
        print(f"plot: {png}")
    print(f"bench took {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
