"""Cooperative inference over a fleet: measured throughput of the best single device, an equal layer
split, inter-layer DP alone and PSO+DP with intra-layer row bands, side by side in one run, with each
one's prediction; and the PSO placement against the exhaustive optimum (fleets of up to 5 devices)
with both search times.

Each configuration is planned from the profiles (measured once per device kind and cached), compiled
into a plan directory and streamed over the emulated fleet (runtime/pipeline.py: every device a TVM
RPC server in its cgroups inside its link's network namespace, tensors device to device over the
shaped links). Outputs are checked against the single-device build on every run.

    python bench/pipeline.py [--models vgg,resnet] [--fleets fleet-2,fleet-4,fleet-8] [--frames 20]
    python bench/pipeline.py --models vgg --fleets fleet-2 --frames 10     # a few minutes

Every run starts its devices afresh (~30-50 s each on a loaded 2-core machine): the full default run
is 24 runs. Measured figures on a loaded machine are noisy: say so when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from edgetvm import zoo
from edgetvm.errors import UserError
from edgetvm.partition.pipeline import fleet as fleets
from edgetvm.partition.pipeline import plan as plans
from edgetvm.partition.pipeline import pso
from edgetvm.runtime import leftovers

METHODS = ("single", "equal", "dp", "pso")
LABEL = {"single": "best single device", "equal": "equal layer split", "dp": "inter-layer DP",
         "pso": "PSO+DP, row bands"}


def layout(decision: dict) -> str:
    parts = []
    for st in decision["stages"]:
        i, j = st["layers"]
        devs = "+".join(st["devices"])
        parts.append(f"{devs}[{i}-{j - 1}]" + ("b" if st["bands"] else ""))
    return " | ".join(parts)


def pso_vs_exhaustive(prep, seeds: int) -> dict:
    """PSO (several seeds) against the exhaustive optimum on one problem: worst ratio and times."""
    ex = pso.Search(prep.problem).exhaustive()
    runs = [pso.Search(prep.problem).pso(seed=s) for s in range(seeds)]
    worst = max(r.period_s for r in runs)
    return {"exhaustive_fps": 1 / ex.period_s, "exhaustive_s": ex.seconds, "exhaustive_evals": ex.evaluations,
            "pso_worst_fps": 1 / worst, "pso_s": max(r.seconds for r in runs),
            "pso_evals": max(r.evaluations for r in runs), "gap": worst / ex.period_s - 1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg,resnet")
    p.add_argument("--fleets", default="fleet-2,fleet-4,fleet-8")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--frames", type=int, default=20, help="frames streamed per configuration")
    p.add_argument("--pso-seeds", type=int, default=5, help="PSO seeds checked against the exhaustive optimum")
    p.add_argument("--no-run", action="store_true", help="plan and predict only (no emulated fleet)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="predict from the kernels' profiles alone (no per-call RPC and band slicing costs)")
    p.add_argument("--workdir", default=None, help="where the plans go (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if bad := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    before = leftovers.find()
    rows, checks, calibrations = [], [], {}
    from edgetvm.runtime.pipeline import run_plan

    for model in [m for m in args.models.split(",") if m]:
        for fname in [f for f in args.fleets.split(",") if f]:
            fleet = fleets.load_fleet(fname)
            speeds = [d.speed for d in fleet.devices]
            print(f"\n== {model} over {fleet.name}: {len(fleet.devices)} devices, speeds "
                  f"{min(speeds):g}-{max(speeds):g} ({max(speeds) / min(speeds):.1f}x spread)", flush=True)
            # Measured once per fleet (the costs of calls and bytes do not depend on the model).
            cal = False if args.no_calibrate else calibrations.get(fleet.name, True)
            prep = plans.prepare(zoo.path(model), fleet, log=lambda msg: print("  " + msg, flush=True), calibrate=cal)
            if prep.problem.overhead:
                calibrations[fleet.name] = prep.problem.overhead
            if len(fleet.devices) <= pso.MAX_EXHAUSTIVE:
                c = pso_vs_exhaustive(prep, args.pso_seeds)
                checks.append({"model": model, "fleet": fleet.name, **c})
                print(f"  PSO vs exhaustive: worst of {args.pso_seeds} seeds {c['pso_worst_fps']:.2f} frames/s vs "
                      f"optimum {c['exhaustive_fps']:.2f} ({c['gap']:+.1%} period); search "
                      f"{c['pso_s']:.2f} s ({c['pso_evals']} placements) vs {c['exhaustive_s']:.2f} s "
                      f"({c['exhaustive_evals']})", flush=True)
            for method in methods:
                try:
                    decision = plans.plan(prep, method)
                except UserError as e:
                    print(f"  {method}: {e}", flush=True)
                    continue
                row = {"model": model, "fleet": fleet.name, "devices": len(fleet.devices), "method": method,
                       "layout": layout(decision), "predicted_fps": decision["predicted"]["throughput_fps"],
                       "search_s": decision["search_s"]}
                if not args.no_run:
                    out = plans.write_plan(prep, fleet, decision, work / f"{model}-{fleet.name}-{method}")
                    t = time.perf_counter()
                    try:
                        res = run_plan(out, args.frames, log=lambda *a: None)
                    except UserError as e:  # one configuration failing does not lose the others' figures
                        print(f"  {LABEL[method]:<20} predicted {row['predicted_fps']:6.2f} frames/s  run failed: {e}  "
                              f"{row['layout']}", flush=True)
                        row["error"] = str(e)
                        rows.append(row)
                        continue
                    row.update(measured_fps=res.throughput_fps, latency_ms=res.latency_s * 1e3,
                               max_abs_diff=res.max_abs_diff, wall_s=time.perf_counter() - t,
                               quota_used=res.quota_used, throttled_share=res.throttled_share)
                rows.append(row)
                meas = (f"measured {row['measured_fps']:6.2f} ({row['measured_fps'] / row['predicted_fps'] - 1:+.0%}), "
                        f"latency {row['latency_ms']:.0f} ms, max|diff| {row['max_abs_diff']:.2g}"
                        if "measured_fps" in row else "")
                print(f"  {LABEL[method]:<20} predicted {row['predicted_fps']:6.2f} frames/s  {meas}  "
                      f"{row['layout']}", flush=True)
                if "quota_used" in row:
                    print("  " + " " * 20 + " CPU used of each device's quota: " + ", ".join(
                        f"{n} {u:.0%}" for n, u in row["quota_used"].items()), flush=True)

    print("\n== summary (frames/s; ratios against the best single device of the same model and fleet)")
    key = "measured_fps" if not args.no_run else "predicted_fps"
    for model in dict.fromkeys(r["model"] for r in rows):
        for fname in dict.fromkeys(r["fleet"] for r in rows if r["model"] == model):
            rs = {r["method"]: r for r in rows if r["model"] == model and r["fleet"] == fname and key in r}
            base = rs.get("single")
            cells = []
            for m in methods:
                if m not in rs:
                    cells.append(f"{m} -")
                    continue
                r = rs[m]
                ratio = f" x{r[key] / base[key]:.2f}" if base else ""
                pred = f" (pred {r['predicted_fps']:.1f} x{r['predicted_fps'] / base['predicted_fps']:.2f})" \
                    if base and key == "measured_fps" else ""
                cells.append(f"{m} {r[key]:.1f}{ratio}{pred}")
            print(f"  {model:7} {fname:8} " + "; ".join(cells))
    if checks:
        worst = max(c["gap"] for c in checks)
        print(f"  PSO vs exhaustive: worst period gap {worst:+.1%} over {len(checks)} model/fleet pairs "
              f"(goal: within 5%)")
    # Only what this run made: other edgetvm commands on the machine have resources of their own.
    left = [r for r in leftovers.new_since(before, leftovers.find()) if r.owner == os.getpid()]
    print(f"  left behind: {', '.join(map(str, left)) if left else 'nothing'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "pso_vs_exhaustive": checks,
                                               "calibration": calibrations}, indent=2) + "\n")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
