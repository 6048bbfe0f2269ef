"""Glue for the CLI and the benchmark: fleet, cost-model predictions, allocation tables, plots."""

from __future__ import annotations

import json
from pathlib import Path

from edgetvm.errors import UserError
from edgetvm.latte import allocate, models
from edgetvm.latte.devices import Profile, list_profiles, load_profile


def fleet_of(n_clients: int, profile_names: list[str] | None = None) -> dict[int, Profile]:
    profs = [load_profile(n) for n in profile_names] if profile_names else list_profiles()
    if not profs:
        raise UserError("no device profiles found; add TOML files to targets/devices/")
    if n_clients < 1:
        raise UserError(f"--clients {n_clients}: give at least one client")
    return {i: profs[i % len(profs)] for i in range(n_clients)}


def fed_metas(data: dict) -> dict[float, dict]:
    from edgetvm.latte.pipeline import current_metas

    fed = {m["dir"]: data["metas"][m["dir"]] for m in data["measurements"] if models.is_fed(m)}
    metas = current_metas({"metas": fed})
    return {float(m["width"]): metas[m["dir"]] for m in data["measurements"] if models.is_fed(m)}


def step_tables(data: dict, model, fleet: dict[int, Profile]):
    """(measured, predicted) seconds per step of the federated model per (profile, width)."""
    measured = {(m["profile"], float(m["width"])): m["step_s"] for m in data["measurements"]
                if models.is_fed(m)}
    metas = fed_metas(data)
    if not metas:
        raise UserError(f"the profile data has no measurements of the federated model {models.FED_ARCH}; "
                        f"run `edgetvm latte profile` with it")
    predicted = {}
    for p in {p.name: p for p in fleet.values()}.values():
        for w, meta in metas.items():
            predicted[(p.name, w)] = model.predict_step(meta, p.to_dict())
        if not any((p.name, w) in measured for w in metas):
            fits_any = any(allocate.fits(p, models.ARCHS[models.FED_ARCH], w, 32) for w in metas)
            if fits_any:
                raise UserError(f"device profile {p.name} has no measurements; run `edgetvm latte profile` "
                                f"including it")
    return measured, predicted


def allocation_table(assign: list[allocate.Assignment], measured: dict, deadline: float | None) -> str:
    lines = []
    if deadline is not None:
        lines.append(f"round deadline {deadline * 1e3:.1f} ms (predicted)")
    lines.append("predicted: the cost model's whole-step wall time (kernels + per-step overhead) x steps; "
                 "measured: the median uninstrumented step in the device's cgroup x steps")
    lines.append(f"{'client':>6} {'device':<14} {'width':>6} {'steps':>5} {'predicted':>10} {'measured':>10} {'pred/meas':>9}")
    for a in assign:
        if a.width is None:
            lines.append(f"{a.client:>6} {a.profile:<14} {'-':>6} {'-':>5} {'left out: ' + a.reason}")
            continue
        meas = measured.get((a.profile, a.width))
        ms = f"{meas * a.steps * 1e3:8.1f}ms" if meas else "         ?"
        ratio = f"{a.predicted_s / (meas * a.steps):9.2f}" if meas else f"{'?':>9}"
        lines.append(f"{a.client:>6} {a.profile:<14} {a.width:>6g} {a.steps:>5} {a.predicted_s * 1e3:8.1f}ms {ms} {ratio}")
    return "\n".join(lines)


def summary(histories: dict, target: float) -> tuple[str, dict]:
    """Time to target accuracy per method (simulated time: sum over rounds of the slowest selected
    client's measured training time) and LATTE's speed-up over each baseline."""
    tt = {m: h.time_to(target) for m, h in histories.items()}
    lines = [f"time to {target:.0%} test accuracy (simulated: per round, the slowest selected client's "
             f"measured TVM training time)",
             f"{'method':<10} {'rounds':>6} {'final acc':>9} {'best acc':>9} {'sim time to target':>19} {'LATTE speed-up':>15}"]
    for m, h in histories.items():
        final = h.rounds[-1]["accuracy"] if h.rounds else float("nan")
        best = max((r["accuracy"] or 0) for r in h.rounds) if h.rounds else float("nan")
        t = tt[m]
        sp = ""
        if m != "latte" and tt.get("latte") is not None:
            sp = f"{t / tt['latte']:.2f}x" if t is not None else f">{h.rounds[-1]['sim_time_s'] / tt['latte']:.2f}x"
        ts = f"{t:.2f} s" if t is not None else "not reached"
        lines.append(f"{m:<10} {len(h.rounds):>6} {final:>9.3f} {best:>9.3f} {ts:>19} {sp:>15}")
    return "\n".join(lines), tt


def plot(histories: dict, path: Path, target: float | None = None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, h in histories.items():
        xs = [r["sim_time_s"] for r in h.rounds]
        ys = [r["accuracy"] for r in h.rounds]
        ax.plot(xs, ys, marker=".", label=m)
    if target:
        ax.axhline(target, color="grey", ls=":", lw=1)
    ax.set_xlabel("simulated time (s): sum of slowest selected client's measured training time per round")
    ax.set_ylabel("test accuracy (digits)")
    ax.set_title("Federated training on an emulated heterogeneous fleet")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dump_histories(histories: dict, path: Path) -> None:
    Path(path).write_text(json.dumps({m: h.rounds for m, h in histories.items()}, indent=1))
