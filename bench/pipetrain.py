"""Pipeline model-parallel training on emulated devices: 1 device (baseline) against the chosen partitions
on 2 and 4 devices, GPipe and 1F1B, side by side in one run (docs/pipetrain.md).

    python bench/pipetrain.py [--devices sbc-a53] [--width 0.5] [--batch 64] [--micro-batches 4]
                              [--train-samples 2048] [--epochs 1] [--reduce-dtypes float32,float16]
                              [--repeats 2] [-o results/pipetrain]

Each configuration trains the same AlexNet-style CNN from the same initial weights on the same
Fashion-MNIST batches (the first --train-samples of the seeded training split) for --epochs epochs on
emulated devices of one kind (cgroup CPU quota and memory, a shaped link each, TVM RPC); 2 and 4 devices
once per --reduce-dtypes (the dtype data-parallel replicas exchange gradients in; a configuration without
replicas is run once); the configurations take turns, --repeats rounds of each. Printed: the per-layer
profile, every candidate of the partition/resource search with its predicted step time, then per
configuration the measured seconds per epoch (training steps only; the mean of its rounds), the predicted
ones, the saving against one device, how far its rounds were apart, validation accuracy, the bytes a step
moved over the coordinator's connections (the stages hand activations and gradients device to device),
and each stage's busy share. loss.png: loss against wall time for every configuration; results.json:
everything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _label(n, schedule, dtype, cand) -> str:
    label = f"{n} device{'s' if n > 1 else ''}, {len(cand.groups)} stage(s), {schedule}"
    return label + (f", sum in {dtype}" if any(len(g) > 1 for g in cand.groups) else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="sbc-a53", help="the device kind (targets/devices)")
    ap.add_argument("--link", default="ethernet-100mbit")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--train-samples", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=1)
    # 0.01 is unstable for the AlexNet-style CNN with momentum (the loss jumps from 1.6 to 2.5 near step 20,
    # so runs that round differently end 4 points apart after 64 steps); 0.005 is not and ends higher
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reduce-dtypes", default="float32,float16",
                    help="comma-separated: the dtypes replicas exchange gradients in, each searched and run")
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds in which every configuration trains once more; a row is their mean")
    ap.add_argument("-o", "--output", default="results/pipetrain")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    import numpy as np

    from edgetvm import data as data_mod
    from edgetvm import train
    from edgetvm.pipetrain import plan as P
    from edgetvm.pipetrain.cli import _subset, plot_curves, train_config
    from edgetvm.pipetrain.emulate import parse_devices
    from edgetvm.pipetrain.stages import alexnet

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model = alexnet(width=args.width)
    mb = args.batch // args.micro_batches
    opt = train.OptimizerConfig("momentum", args.lr)
    devices = parse_devices(f"4x{args.devices}@{args.link}")
    t0 = time.perf_counter()
    data = _subset(data_mod.load("fashion-mnist", seed=args.seed), args.train_samples)
    prof = P.profile_device(model, mb, devices[0], opt, log=print, sample=(data.train.x, data.train.y))
    profiles = {devices[0].kind: prof}
    steps = data_mod.steps_per_epoch(data.train, args.batch)
    dtypes = [d.strip() for d in args.reduce_dtypes.split(",") if d.strip()]
    configs = []
    for n in (1, 2, 4):
        for schedule in (("gpipe",) if n == 1 else ("gpipe", "1f1b")):
            for dtype in dtypes[:1] if n == 1 else dtypes:
                print(f"search: {n} device(s), {schedule}, {args.micro_batches} micro-batches of {mb}, "
                      f"gradients summed in {dtype}", flush=True)
                cands = [c for c in P.search(model, mb, args.micro_batches, devices[:n], profiles, schedule,
                                             log=print, optimizer=opt, reduce_dtype=dtype) if c.n_devices == n]
                if n == 1:
                    cands = [c for c in cands if len(c.groups) == 1]
                if dtype != dtypes[0] and all(len(g) == 1 for g in cands[0].groups):
                    print("  (no replicas: the same configuration as above)")
                    continue
                configs.append((n, schedule, dtype, cands[0]))
    # Configurations take turns, --repeats rounds: the machine's speed drifts over minutes (the single
    # device's epoch moved 6-14% between runs), so each row's mean samples the whole run, and the
    # spread of its rounds says how far a prediction can be trusted to agree with one measurement.
    runs: dict = {}
    for rnd in range(args.repeats):
        for i, (n, schedule, dtype, cand) in enumerate(configs):
            label = _label(n, schedule, dtype, cand)
            print(f"training (round {rnd + 1} of {args.repeats}): {label}: {cand.describe()}", flush=True)
            ns = argparse.Namespace(batch=args.batch, micro_batches=args.micro_batches, schedule=schedule,
                                    lr=args.lr, seed=args.seed, epochs=args.epochs, local=False, reduce_dtype=dtype)
            cdir = out / f"{n}dev-{schedule}-{dtype}" / f"round{rnd + 1}"
            cdir.mkdir(parents=True, exist_ok=True)
            runs.setdefault(i, []).append(train_config(model, cand.bounds, cand.groups, ns, data, cdir, progress=True))
    rows, curves = [], {}
    for i, (n, schedule, dtype, cand) in enumerate(configs):
        label = _label(n, schedule, dtype, cand)
        res = runs[i][0]
        hist = res["history"]
        epochs_s = [sum(h["seconds"] for h in r["history"]) / len(r["history"]) for r in runs[i]]
        rows.append({"config": label, "devices": n, "schedule": schedule, "reduce_dtype": dtype,
                     "bounds": list(cand.bounds),
                     "groups": [[d.name for d in g] for g in cand.groups],
                     "predicted_epoch_s": cand.step_s * steps, "measured_epoch_s": float(np.mean(epochs_s)),
                     "rounds_epoch_s": epochs_s,
                     "val_accuracy": hist[-1]["val_accuracy"], "loss": hist[-1]["loss"],
                     "rounds_val_accuracy": [r["history"][-1]["val_accuracy"] for r in runs[i]],
                     "coordinator_mb_per_step": res.get("coordinator_bytes_per_step", 0.0) / 1e6,
                     "stages": res["totals"]})
        curves[label] = res["curve"]
    base = rows[0]["measured_epoch_s"]
    print(f"\n{model.name} (width {args.width}) on {args.devices} over {args.link}: batch {args.batch}, "
          f"{args.micro_batches} micro-batches, {steps} steps/epoch, {args.epochs} epoch(s)")
    print(f"{'configuration':52s} {'measured s/epoch':>16s} {'predicted':>10s} {'error':>7s} {'vs 1 device':>12s} "
          f"{'rounds spread':>13s} {'val acc':>8s} {'coord MB/step':>13s}  stage busy shares")
    for r in rows:
        err = r["measured_epoch_s"] / r["predicted_epoch_s"] - 1
        save = 1 - r["measured_epoch_s"] / base
        shares = " ".join(f"{v['busy_s'] / max(v['wall_s'], 1e-9):.0%}" for v in r["stages"].values())
        spread = max(r["rounds_epoch_s"]) / min(r["rounds_epoch_s"]) - 1
        print(f"{r['config']:52s} {r['measured_epoch_s']:16.1f} {r['predicted_epoch_s']:10.1f} {err:+7.0%} "
              f"{save:+12.1%} {spread:13.0%} {100 * r['val_accuracy']:7.2f}% {r['coordinator_mb_per_step']:13.2f}"
              f"  {shares}")
    plot_curves(out / "loss.png", curves, f"{model.name} w{args.width} on {args.devices}: loss against wall time")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "profile": prof.to_json(), "rows": rows,
                                                  "curves": curves, "seconds": time.perf_counter() - t0}, indent=1))
    print(f"wrote {out}/loss.png and results.json ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
