"""`edgetvm pipetrain plan|run`: pipeline model-parallel training over devices (docs/pipetrain.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgetvm.errors import UserError


def add_pipetrain_parser(sub) -> None:
    s = sub.add_parser("pipetrain", help="pipeline model-parallel training: partitions, resources, GPipe/1F1B")
    psub = s.add_subparsers(dest="pipetrain_cmd", required=True, metavar="ACTION")
    for name, help_ in (("plan", "profile the devices, predict every partition/resource candidate, pick the best"),
                        ("run", "train through the stages on the emulated devices (or here, --local)")):
        p = psub.add_parser(name, help=help_)
        p.add_argument("model", help="alexnet (default width), lenet5, vgg_small or mlp")
        p.add_argument("--devices", default="2xsbc-a53",
                       help="a fleet, or PROFILE[@LINK] items with counts: 4xsbc-a53, sbc-a53,tablet-old@wifi-20mbit")
        p.add_argument("--micro-batches", type=int, default=4)
        p.add_argument("--batch", type=int, default=32)
        p.add_argument("--schedule", choices=("gpipe", "1f1b"), default="1f1b")
        p.add_argument("--partitions", type=int, help="only candidates with this many partitions")
        p.add_argument("--width", type=float, default=1.0, help="alexnet: channel width multiplier")
        p.add_argument("--lr", type=float, default=0.01)
        p.add_argument("--local", action="store_true", help="stages in this process (no emulation, no root needed)")
        p.add_argument("--reduce-dtype", choices=("float32", "float16"),
                       help="the dtype a stage's data-parallel replicas exchange gradients in for their sum "
                            "(float16: half the bytes, summed in float32; default float32, or the plan's)")
        if name == "plan":
            p.add_argument("-o", "--output", required=True, help="plan file (.json) to write")
            p.set_defaults(func=cmd_plan)
        else:
            p.add_argument("--plan", help="a plan written by `pipetrain plan` (else: stage bounds below, or search)")
            p.add_argument("--bounds", help="layer bounds, e.g. 0,7,19: one stage per device, in order")
            p.add_argument("--epochs", type=int, default=1)
            p.add_argument("--train-samples", type=int, help="train on the first N (shuffled) training images")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("-o", "--output", required=True, help="directory to write: checkpoint, history, loss.png")
            p.set_defaults(func=cmd_run)


def _model(args):
    from edgetvm.pipetrain.stages import alexnet, load_model

    return alexnet(width=args.width) if args.model == "alexnet" else load_model(args.model)


def _optimizer(args):
    from edgetvm import train

    return train.OptimizerConfig("momentum", args.lr)


def _devices(args):
    from edgetvm.pipetrain.emulate import parse_devices

    if args.local:
        from edgetvm.latte.devices import Profile
        from edgetvm.partition.pipeline.fleet import FleetDevice
        from edgetvm.targets.links import LinkProfile

        n = len(parse_devices(args.devices))
        prof = Profile("here", "this process", 1, 1.0, 1 << 20, 0.0, 0.0)
        link = LinkProfile("none", "in-process", 0.0, 0.0)
        return [FleetDevice(f"local{i}", prof, link) for i in range(n)]
    return parse_devices(args.devices)


def _profiles(args, model, devices, log=print):
    from edgetvm.pipetrain import plan as P

    mb = args.batch // args.micro_batches
    if args.local:
        return {"here": P.profile_here(model, mb, _optimizer(args), log=log)}
    from edgetvm import data as data_mod

    train_split = data_mod.load("fashion-mnist", seed=args.seed).train   # what `run` trains on
    out = {}
    for d in devices:
        if d.kind not in out:
            out[d.kind] = P.profile_device(model, mb, d, _optimizer(args), log=log,
                                           sample=(train_split.x, train_split.y))
    return out


def _check(args, model) -> int:
    from edgetvm.pipetrain import schedule as sch

    mb = sch.check_micro_batches(args.batch, args.micro_batches)
    if args.partitions is not None and args.partitions > len(model.layers):
        raise UserError(f"--partitions {args.partitions} but {model.name} has only {len(model.layers)} layers; "
                        f"use at most {len(model.layers)}")
    return mb


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plan_search(args, model, log=print):
    from edgetvm.pipetrain import plan as P

    mb = _check(args, model)
    devices = _devices(args)
    profiles = _profiles(args, model, devices, log)
    log(f"candidates ({args.schedule}, {args.micro_batches} micro-batches of {mb}):")
    # on emulated devices the stages hand tensors to each other; --local passes them through this process
    cands = P.search(model, mb, args.micro_batches, devices, profiles, args.schedule, args.partitions, log=log,
                     optimizer=_optimizer(args), direct=not args.local, reduce_dtype=args.reduce_dtype or "float32")
    if args.partitions is not None:
        cands = [c for c in cands if len(c.groups) == args.partitions] or cands
    return cands[0], profiles


def cmd_plan(args) -> None:
    model = _model(args)
    best, profiles = _plan_search(args, model)
    print(f"best: {best.describe()}")
    doc = {"model": args.model, "width": args.width, "devices": args.devices, "local": args.local,
           "micro_batches": args.micro_batches, "batch": args.batch, "schedule": args.schedule,
           "reduce_dtype": args.reduce_dtype or "float32",
           "bounds": list(best.bounds), "groups": [[d.name for d in g] for g in best.groups],
           "predicted_step_s": best.step_s, "profiles": {k: p.to_json() for k, p in profiles.items()}}
    _write_atomic(Path(args.output), json.dumps(doc, indent=1))
    print(f"wrote {args.output}")


def _assignment(args, model, devices):
    from edgetvm.pipetrain.stages import check_bounds

    if args.plan:
        try:
            doc = json.loads(Path(args.plan).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"plan {args.plan} cannot be read ({e}); write it with `edgetvm pipetrain plan`") from None
        by_name = {d.name: d for d in devices}
        missing = [n for g in doc["groups"] for n in g if n not in by_name]
        if missing:
            raise UserError(f"plan {args.plan} uses device '{missing[0]}', which --devices {args.devices} lacks; "
                            "pass the plan's --devices")
        args.reduce_dtype = args.reduce_dtype or doc.get("reduce_dtype")   # what its prediction assumed
        return tuple(doc["bounds"]), [[by_name[n] for n in g] for g in doc["groups"]], doc.get("predicted_step_s")
    if args.bounds:
        try:
            bounds = check_bounds(model, [int(b) for b in args.bounds.split(",")])
        except ValueError:
            raise UserError(f"--bounds {args.bounds}: give layer indices like 0,7,{len(model.layers)}") from None
        if len(bounds) - 1 > len(devices):
            raise UserError(f"--bounds makes {len(bounds) - 1} stages but --devices gives {len(devices)} devices; "
                            "give one device per stage")
        return bounds, [[d] for d in devices[:len(bounds) - 1]], None
    best, _ = _plan_search(args, model)
    return best.bounds, best.groups, best.step_s


def plot_curves(path: Path, curves: dict[str, list[tuple[float, float]]], title: str) -> None:
    """Loss against wall time, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, lw=1)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("training loss (batch)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reduce_dtype(args) -> str:
    return getattr(args, "reduce_dtype", None) or "float32"


def train_config(model, bounds, groups, args, data, out_dir: Path, progress=True, log=print,
                 max_steps=None) -> dict:
    """Train one configuration; returns the fit result plus per-replica busy/idle totals."""
    import numpy as np

    from edgetvm import train
    from edgetvm.pipetrain import schedule as sch
    from edgetvm.pipetrain.emulate import EmulatedStages, check_memory
    from edgetvm.pipetrain.stages import StagePlan

    mb = sch.check_micro_batches(args.batch, args.micro_batches, [len(g) for g in groups])
    plan = StagePlan(model, bounds, mb, _optimizer(args))
    params = train.init_params(model, args.seed)
    ck = out_dir / "checkpoint.npz"
    if args.local:
        reps = sch.local_replicas(plan, [len(g) for g in groups], args.seed)
        ctrl = sch.Controller(reps, args.schedule, args.micro_batches, reduce_dtype=_reduce_dtype(args))
        res = sch.fit(plan, ctrl, data, args.epochs, args.batch, args.seed, ck, progress, max_steps)
    else:
        check_memory(plan, groups, args.micro_batches, args.schedule)
        with EmulatedStages(plan, groups, params, log=log) as es:
            ctrl = sch.Controller(es.replicas, args.schedule, args.micro_batches, es.names, _reduce_dtype(args))
            marks = [es.coordinator_bytes()]
            try:
                res = sch.fit(plan, ctrl, data, args.epochs, args.batch, args.seed, ck, progress, max_steps,
                              on_step=lambda rec: marks.append(es.coordinator_bytes()))
            except UserError as e:
                dead = es.dead()
                if dead:
                    raise UserError(f"{e} (device '{dead[0]}' is gone: its server exited)") from None
                raise
            # the median step's: a validation pass between epochs falls between two marks
            res["coordinator_bytes_per_step"] = float(np.median(np.diff(marks))) if len(marks) > 1 else 0.0
    ctrl.close()
    res["totals"] = {f"{s}.{r}": v for (s, r), v in ctrl.totals.items()}
    res.pop("trainer", None)
    return res


def cmd_run(args) -> None:
    from edgetvm import data as data_mod

    model = _model(args)
    _check(args, model)
    if args.epochs < 1:
        raise UserError("--epochs must be at least 1")
    out = Path(args.output)
    devices = _devices(args)
    bounds, groups, predicted = _assignment(args, model, devices)
    if not args.local:  # before anything is loaded, started or written
        from edgetvm.pipetrain import schedule as sch
        from edgetvm.pipetrain.emulate import check_memory
        from edgetvm.pipetrain.stages import StagePlan

        mb = sch.check_micro_batches(args.batch, args.micro_batches, [len(g) for g in groups])
        check_memory(StagePlan(model, bounds, mb, _optimizer(args)), groups, args.micro_batches, args.schedule)
    data = data_mod.load("fashion-mnist", seed=args.seed)
    if args.train_samples:
        data = _subset(data, args.train_samples)
    out.mkdir(parents=True, exist_ok=True)   # the checkpoint goes here after every epoch, atomically
    stages = " | ".join(f"layers {bounds[s]}-{bounds[s + 1] - 1} on {','.join(d.name for d in g)}"
                        for s, g in enumerate(groups))
    print(f"{model.name}: {stages}; {args.schedule}, {args.micro_batches} micro-batches of "
          f"{args.batch // args.micro_batches}"
          + (f"; replicas' gradients summed in {_reduce_dtype(args)}" if any(len(g) > 1 for g in groups) else ""),
          flush=True)
    res = train_config(model, bounds, groups, args, data, out)
    hist = res["history"]
    steps = len(res["curve"]) / len(hist)
    step_s = hist[-1]["seconds"] / steps
    line = f"measured {step_s * 1e3:.1f} ms/step"
    if predicted:
        line += f", predicted {predicted * 1e3:.1f} ms/step ({step_s / predicted - 1:+.0%})"
    print(line)
    for key, t in res["totals"].items():
        s, r = (int(v) for v in key.split("."))
        print(f"  stage {s} on {groups[s][r].name}: busy {t['busy_s']:.2f} s, in calls {t['call_s']:.2f} s, "
              f"idle {t['idle_s']:.2f} s of {t['wall_s']:.2f} s ({t['busy_s'] / max(t['wall_s'], 1e-9):.0%} busy)")
    _write_atomic(out / "history.json", json.dumps(
        {"bounds": list(bounds), "devices": [[d.name for d in g] for g in groups], "history": hist,
         "reduce_dtype": _reduce_dtype(args),
         "curve": res["curve"], "stages": res["totals"], "predicted_step_s": predicted, "measured_step_s": step_s},
        indent=1))
    tmp = out / f".loss.png.tmp{os.getpid()}.png"
    plot_curves(tmp, {f"{len(groups)} stages, {args.schedule}": res["curve"]}, f"{model.name} on {args.devices}")
    os.replace(tmp, out / "loss.png")
    print(f"wrote {out}/ (checkpoint.npz, history.json, loss.png)")


def _subset(data, n: int):
    from dataclasses import replace

    from edgetvm.data import Split

    if n < 1:
        raise UserError("--train-samples must be at least 1")
    return replace(data, train=Split(data.train.x[:n], data.train.y[:n]),
                   val=Split(data.val.x[:max(500, n // 10)], data.val.y[:max(500, n // 10)]))
