"""Where the cost model misses, from data: held-out residuals by device, architecture, width and
schedule; per-kernel residuals by kernel kind; and how much each feature group is worth (refit without it).

`python bench/latte.py --diagnose` prints all three for the profile at hand.
"""

from __future__ import annotations

import math

import numpy as np

# Feature groups whose values depend on the machine the profile was measured on, or were designed on one.
GROUPS = {
    "cache overflow": ("inner_l1_overflow", "inner_l2_overflow"),
    "tuning latency": ("log_tune_per_work",),
    "loop structure": ("n_loops", "loop_depth", "n_blocks", "n_parallel", "n_vectorized", "n_unrolled",
                       "auto_unroll", "n_cache_stages", "inner_extent", "inner_reduce", "inner_stride"),
    "step context": ("calls", "step_log_flops", "step_log_bytes", "step_kernels"),
    "share effect": ("device_rows",),
}


def _group_errors(rows: list[dict], key) -> list[tuple]:
    """(group, n, mean signed error %, MAPE %) of predicted against measured whole steps."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r["latte_s"] / r["measured_s"] - 1)
    return [(g, len(e), float(np.mean(e) * 100), float(np.mean(np.abs(e)) * 100))
            for g, e in sorted(groups.items(), key=lambda kv: str(kv[0]))]


def step_residuals(report: dict) -> dict:
    """Held-out whole-step errors of every test set, grouped four ways."""
    rows = [r for s in report["sets"].values() for r in s["rows"]]
    return {"device": _group_errors(rows, lambda r: r["profile"]),
            "architecture": _group_errors(rows, lambda r: r["arch"]),
            "width": _group_errors(rows, lambda r: r["width"]),
            "schedule": _group_errors(rows, lambda r: r["schedule"])}


def kernel_residuals(model, measurements: list[dict], metas: dict) -> list[tuple]:
    """Per kernel kind and schedule: its share of the measured kernel time, and the time-weighted mean
    and mean absolute log error (pred/meas, as %) of the model's per-call CPU time."""
    from edgetvm.costmodels.latte import decompose

    acc: dict = {}
    for m in measurements:
        meta = metas[m["dir"]]
        meas = decompose(m, meta)["per_call_s"]
        calls = {s: k["calls"] for s, k in m["kernels"].items()}
        pred = model.predict_parts(meta, m["device"], calls, m.get("host"))["per_call_cpu_s"]
        for s, t in meas.items():
            if s not in pred:
                continue
            p = pred[s]
            key = (meta["kernels"][s].get("kind", "other"), m.get("schedule", "default"))
            a = acc.setdefault(key, [0.0, 0.0, 0.0])
            w = t * calls[s]
            a[0] += w
            a[1] += w * math.log(p / t)
            a[2] += w * abs(math.log(p / t))
    total = sum(a[0] for a in acc.values()) or 1.0
    return sorted(((k, a[0] / total * 100, (math.exp(a[1] / a[0]) - 1) * 100, (math.exp(a[2] / a[0]) - 1) * 100)
                   for k, a in acc.items()), key=lambda r: -r[1])


def ablation(data: dict, groups: dict = GROUPS) -> list[tuple]:
    """Held-out MAPE of each test set with the full model and with each feature group withheld."""
    from edgetvm.costmodels.latte import LatteModel, errors
    from edgetvm.latte.pipeline import current_metas, split

    train, sets = split(data)
    metas = current_metas(data)
    out = []
    for name, drop in [("full model", ())] + list(groups.items()):
        model = LatteModel(drop=drop).fit(train, metas)
        row = {}
        for sname, ms in sets.items():
            pred = [model.predict_step(metas[m["dir"]], m["device"], host=m.get("host")) for m in ms]
            row[sname] = errors(pred, [m["step_s"] for m in ms])["mape"]
        out.append((name, row))
    return out


def format_diagnosis(steps: dict, kernels: list[tuple], ablations: list[tuple] | None = None) -> str:
    lines = ["held-out whole steps, error by group (signed mean: + = predicted too slow; MAPE)"]
    for what, rows in steps.items():
        lines.append(f"  by {what}: " + ", ".join(f"{g} {m:+.1f}%/{a:.1f}% (n={n})" for g, n, m, a in rows))
    lines.append("held-out kernels by kind and schedule: share of measured kernel time, time-weighted mean "
                 "error, mean |error| (per-call CPU time)")
    for (kind, sched), share, bias, spread in kernels:
        if share >= 0.5:
            lines.append(f"  {kind:<22} {sched:<8} {share:5.1f}%  {bias:+6.1f}%  {spread:5.1f}%")
    if ablations:
        names = list(ablations[0][1])
        lines.append(f"{'refit without':<18}" + "".join(f"{n:>20}" for n in names))
        for name, row in ablations:
            lines.append(f"{name:<18}" + "".join(f"{row[n]:>19.1f}%" for n in names))
    return "\n".join(lines)
