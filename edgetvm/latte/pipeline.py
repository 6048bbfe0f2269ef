"""profile -> fit -> evaluate: measurements of the model family on the emulated fleet, the cost model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgetvm.errors import UserError
from edgetvm.latte import models, training
from edgetvm.latte.devices import Profile, cgroups_unavailable

DEFAULT_DIR = training.CACHE / "run"
HELD_OUT_ARCHS = ("mlp-d", "cnn-c", "fedmlp")
HELD_OUT_PROFILES = ("tablet-old", "iot-gw")


def progress(done: int, total: int, what: str, stream=sys.stderr) -> None:
    width = 28
    fill = int(width * done / max(total, 1))
    stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {what[:48]:<48}")
    if done >= total:
        stream.write("\n")
    stream.flush()


def compile_family(arch_names, widths, quiet=False) -> list[dict]:
    items = [(a, w) for a in arch_names for w in widths]
    out = []
    for i, (a, w) in enumerate(items):
        if a not in models.ARCHS:
            raise UserError(f"unknown architecture '{a}'; known: {', '.join(models.ARCHS)}")
        if not quiet:
            progress(i, len(items), f"compile {models.arch_key(a, w)}")
        out.append({"arch_name": a, "width": w, "dir": str(training.compile_trainer(models.ARCHS[a], w))})
    if not quiet:
        progress(len(items), len(items), "compiled")
    return out


def profile_fleet(profiles: list[Profile], arch_names=None, widths=models.WIDTHS, out: Path | None = None,
                  min_time: float = 0.06, quiet: bool = False) -> dict:
    """Measure every (architecture, width) training step on every profile, each in its cgroup."""
    from edgetvm.costmodels.latte import calibrate_overhead, kernel_targets

    reason = cgroups_unavailable()
    if reason:
        raise UserError(f"cannot emulate devices here: {reason}; run as root on a machine with cgroup v1")
    arch_names = list(arch_names or models.ARCHS)
    compiled = compile_family(arch_names, widths, quiet)
    metas = {c["dir"]: json.loads(Path(c["dir"], "meta.json").read_text()) for c in compiled}
    measurements, runs = [], {}
    for i, p in enumerate(profiles):
        if not quiet:
            progress(i, len(profiles), f"measure on {p.name} (quota {p.cpu_quota:g} CPU)")
        try:
            res = _measure(p, compiled, min_time)
        except RuntimeError as e:
            print(f"\nwarning: {e}; profile {p.name} left out", file=sys.stderr)
            continue
        c = calibrate_overhead(res["results"])
        runs[p.name] = {"cgroup_peak_bytes": res["cgroup_peak_bytes"], "throttled_s": res["throttled_s"],
                        "wall_s": res["wall_s"], "instrument_overhead_s": c}
        for r in res["results"]:
            measurements.append({**r, "profile": p.name, "device": p.to_dict(),
                                 "kernel_s": kernel_targets(r, c)})
    if not quiet:
        progress(len(profiles), len(profiles), "measured")
    data = {"measurements": measurements, "metas": metas, "runs": runs,
            "profiles": {p.name: p.to_dict() for p in profiles}}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.rename(out)
    return data


def _measure(p: Profile, compiled, min_time):
    from edgetvm.latte.measure import measure_profile

    return measure_profile(p, compiled, min_time=min_time)


def load_profile_data(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; run `edgetvm latte profile -o {path}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not a profile file ({e}); run `edgetvm latte profile` again") from None


def split(data: dict, held_archs=HELD_OUT_ARCHS, held_profiles=HELD_OUT_PROFILES):
    ms = data["measurements"]
    train = [m for m in ms if m["arch_name"] not in held_archs and m["profile"] not in held_profiles]
    sets = {
        "held-out archs": [m for m in ms if m["arch_name"] in held_archs and m["profile"] not in held_profiles],
        "held-out profiles": [m for m in ms if m["arch_name"] not in held_archs and m["profile"] in held_profiles],
        "both held out": [m for m in ms if m["arch_name"] in held_archs and m["profile"] in held_profiles],
    }
    return train, sets


def fit_and_evaluate(data: dict, held_archs=HELD_OUT_ARCHS, held_profiles=HELD_OUT_PROFILES, save: Path | None = None):
    """Fit LATTE and the FLOPs baseline on the training split; errors on each held-out set."""
    from edgetvm.costmodels.latte import FlopsBaseline, LatteModel, errors

    train, sets = split(data, held_archs, held_profiles)
    if not train:
        raise UserError("no training measurements left after holding out architectures and profiles; "
                        "profile more architectures/devices")
    metas = data["metas"]
    latte = LatteModel().fit(train, metas)
    flops = FlopsBaseline().fit(train, metas)
    report = {"n_train": len(train), "held_out_archs": list(held_archs), "held_out_profiles": list(held_profiles),
              "sets": {}}
    for name, ms in sets.items():
        if not ms:
            continue
        true = [m["step_s"] for m in ms]
        ours = [latte.predict_step(metas[m["dir"]], m["device"]) for m in ms]
        base = [flops.predict_step(metas[m["dir"]], m["device"]) for m in ms]
        report["sets"][name] = {"latte": errors(ours, true), "flops": errors(base, true)}
    if save is not None:
        # The model the allocator uses: fitted on every profiled device (they are the fleet), still
        # never on the federated architecture, which stays an unseen architecture for it.
        deploy = [m for m in data["measurements"] if m["arch_name"] != models.FED_ARCH]
        LatteModel().fit(deploy, metas).save(save)
        Path(save, "report.json").write_text(json.dumps(report, indent=1))
    return latte, flops, report


def format_report(report: dict) -> str:
    lines = [f"estimator: per-step training time, {report['n_train']} training measurements; "
             f"held out: archs {', '.join(report['held_out_archs'])}; profiles {', '.join(report['held_out_profiles'])}",
             f"{'test set':<18} {'n':>4} {'LATTE MAPE':>11} {'<=10%':>7} {'FLOPs MAPE':>11} {'<=10%':>7}"]
    for name, s in report["sets"].items():
        lines.append(f"{name:<18} {s['latte']['n']:>4} {s['latte']['mape']:>10.1f}% {s['latte']['within10']:>6.0f}% "
                     f"{s['flops']['mape']:>10.1f}% {s['flops']['within10']:>6.0f}%")
    return "\n".join(lines)
