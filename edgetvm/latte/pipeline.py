"""profile -> fit -> evaluate: measurements of the model family on the emulated fleet, the cost model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from edgetvm.errors import UserError
from edgetvm.latte import models, training
from edgetvm.latte.devices import Profile, cgroups_unavailable

DEFAULT_DIR = training.CACHE / "run"
HELD_OUT_ARCHS = ("mlp-d", "cnn-c", "fedmlp")
HELD_OUT_PROFILES = ("tablet-old", "iot-gw")
# Architectures also compiled with MetaSchedule-tuned kernels: two the model trains on, and the two
# held-out ones (whose tuned steps it then predicts without having seen them either).
TUNED_ARCHS = ("mlp-a", "cnn-a", "mlp-d", "cnn-c")
# The step every measuring process times on the bare host first: the cost model's unit of time.
REFERENCE = ("mlp-a", 1.0)


def progress(done: int, total: int, what: str, stream=sys.stderr) -> None:
    width = 28
    fill = int(width * done / max(total, 1))
    stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {what[:48]:<48}")
    if done >= total:
        stream.write("\n")
    stream.flush()


def compile_family(arch_names, widths, quiet=False, tuned_archs=()) -> list[dict]:
    """Compile every (architecture, width) with the default schedule, and those of `tuned_archs` tuned too
    (MetaSchedule on this host: about 40 s per MLP step, longer for a CNN; cached like the rest)."""
    for a in [*arch_names, *tuned_archs]:
        if a not in models.ARCHS:
            raise UserError(f"unknown architecture '{a}'; known: {', '.join(models.ARCHS)}")
    items = [(a, w, "default") for a in arch_names for w in widths]
    items += [(a, w, "tuned") for a in tuned_archs for w in widths]
    out = []
    for i, (a, w, sched) in enumerate(items):
        if not quiet:
            progress(i, len(items), f"{'tune and ' if sched == 'tuned' else ''}compile {models.arch_key(a, w)}")
        out.append({"arch_name": a, "width": w, "schedule": sched,
                    "dir": str(training.compile_trainer(models.ARCHS[a], w, schedule=sched))})
    if not quiet:
        progress(len(items), len(items), "compiled")
    return out


def profile_fleet(profiles: list[Profile], arch_names=None, widths=models.WIDTHS, out: Path | None = None,
                  min_time: float = 0.1, repeats: int = 2, quiet: bool = False, session=None,
                  tuned_archs=TUNED_ARCHS) -> dict:
    """Measure every (architecture, width, schedule) training step on every profile, each in its cgroup,
    or on its board over the RPC `session` for a profile that names one (default schedules only: the
    tuned ones are tuned on this host's CPU).

    Every profile is measured `repeats` times, each time by a fresh process (the rounds go over the
    whole fleet, so slow drifts of the host spread over all devices); a measurement's times are the
    median over its repeats, and `step_s_runs` keeps each repeat's whole-step time for the noise floor."""
    reason = cgroups_unavailable() if any(not p.board for p in profiles) else None
    if reason:
        raise UserError(f"cannot emulate devices here: {reason}; run as root on a machine with cgroup v1")
    boards = [p.name for p in profiles if p.board]
    if boards and session is None:
        raise UserError(f"{', '.join(boards)}: a real board is measured over TVM RPC; give --rpc HOST:PORT or "
                        f"--tracker HOST:PORT --key KEY")
    if boards:
        from edgetvm.latte.remote import check_board

        for p in profiles:
            if p.board:
                check_board(p)  # an unknown board fails before anything is compiled
    if repeats < 1:
        raise UserError(f"--repeats {repeats}: measure at least once")
    arch_names = list(arch_names or models.ARCHS)
    compiled = compile_family(arch_names, widths, quiet, tuned_archs)
    metas = {c["dir"]: training.load_meta(Path(c["dir"])) for c in compiled}
    reference = (str(training.compile_trainer(models.ARCHS[REFERENCE[0]], REFERENCE[1]))
                 if any(not p.board for p in profiles) else None)  # boards are not calibrated
    runs: dict[str, dict] = {}
    results: dict[str, list] = {}  # profile -> each run's results
    hosts: list[dict] = []
    total, done = len(profiles) * repeats, 0

    def ok(p: Profile) -> bool:
        return not runs.get(p.name, {}).get("failed")

    def measure(p: Profile, label: str):
        nonlocal done
        if not quiet:
            progress(done, total, f"measure on {p.name} (quota {p.cpu_quota:g} CPU), {label}")
        done += 1
        try:
            res = _measure(p, compiled, min_time, session, reference)
        except RuntimeError as e:
            print(f"\nwarning: {e}; profile {p.name} left out", file=sys.stderr)
            runs[p.name] = {"failed": str(e)}
            return None
        r = runs.setdefault(p.name, {"cgroup_peak_bytes": 0, "throttled_s": 0.0, "wall_s": 0.0})
        r["cgroup_peak_bytes"] = max(r["cgroup_peak_bytes"], res["cgroup_peak_bytes"])
        r["throttled_s"] += res["throttled_s"]
        r["wall_s"] += res["wall_s"]
        if res.get("host"):
            hosts.append(res["host"])
        return res["results"]

    for rep in range(repeats):
        for p in filter(ok, profiles):
            got = measure(p, f"run {rep + 1}/{repeats}")
            if got is not None:
                results.setdefault(p.name, []).append(got)
    for p in filter(ok, profiles):
        for i in disturbed_runs(results.get(p.name, [])):
            total += 1
            got = measure(p, f"run {i + 1} again (disturbed)")
            if got is None:
                break
            results[p.name][i] = got
            runs[p.name]["remeasured"] = runs[p.name].get("remeasured", 0) + 1
    if not quiet:
        progress(total, total, "measured")
    per: dict[tuple, list] = {}
    for p in filter(ok, profiles):
        for got in results.get(p.name, []):
            for x in got:
                per.setdefault((p.name, x["arch_name"], x["width"], x.get("schedule", "default")), []).append((p, x))
    measurements = [combine(reps) for reps in per.values()]
    host = combine_hosts(hosts)
    for m in measurements:
        if m["profile"] not in boards:
            m["host"] = host  # one calibration for the whole profile: per-process noise stays out of the unit
    runs = {k: v for k, v in runs.items() if "failed" not in v}
    data = {"measurements": measurements, "metas": metas, "runs": runs, "repeats": repeats, "host": host,
            "profiles": {p.name: p.to_dict() for p in profiles}}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.rename(out)
    return data


DISTURBED = 0.15  # a run whose steps take this much longer (median) than in the device's other runs


def disturbed_runs(results: list[list[dict]]) -> list[int]:
    """The runs of one device (each a fresh process's results) whose steps took, by their median, more than
    DISTURBED longer than the same step's median over all the device's runs (of two runs, than the other
    one). Something else held the core for the whole process: in two profiles of 27 processes each
    (2026-12-08), one process ran every step 1.46x and 1.54x slower, CPU time as well, where the others
    were within 5%; without those two runs the steps of one device differed 5.3% between processes
    instead of 7.7-7.9%. Interference only ever slows a run down, so a fast run is kept."""
    import numpy as np

    if len(results) < 2:
        return []
    key = lambda x: (x["arch_name"], x["width"], x.get("schedule", "default"))  # noqa: E731
    times = [{key(x): x["step_s"] for x in run} for run in results]
    out = []
    for i, run in enumerate(times):
        ratios = [t / float(np.median(ref)) for k, t in run.items()
                  if (ref := [o[k] for j, o in enumerate(times) if k in o and (len(times) > 2 or j != i)])]
        if ratios and float(np.median(ratios)) > 1 + DISTURBED:
            out.append(i)
    return out


def combine(reps: list) -> dict:
    """One measurement from its repeats: medians of the step times and of every kernel's time."""
    import numpy as np

    p, first = reps[0]
    xs = [x for _, x in reps]
    med = lambda key: float(np.median([x[key] for x in xs]))  # noqa: E731
    kernels = {}
    for s in first["kernels"]:
        vals = [x["kernels"][s] for x in xs if s in x["kernels"]]
        kernels[s] = {"calls": vals[0]["calls"], "time_s": float(np.median([v["time_s"] for v in vals]))}
    m = {k: first[k] for k in ("arch_name", "width", "dir", "clock") if k in first}
    m["schedule"] = first.get("schedule", "default")
    if all("process_cpu_step_s" in x for x in xs):  # older profiles and boards lack it
        m["process_cpu_step_s"] = med("process_cpu_step_s")
    m.update({"profile": p.name, "device": p.to_dict(), "step_s": med("step_s"), "cpu_step_s": med("cpu_step_s"),
              "step_s_runs": [x["step_s"] for x in xs], "cpu_step_s_runs": [x["cpu_step_s"] for x in xs],
              "window_step_s": [x["window_step_s"] for x in xs],
              "instrumented_step_s": med("instrumented_step_s"), "steps": sum(x["steps"] for x in xs),
              "kernels": kernels})
    return m


def combine_hosts(hosts: list[dict]) -> dict | None:
    """The machine's record from every measuring process's calibration: the median reference step."""
    import numpy as np

    if not hosts:
        return None
    out = dict(hosts[0])
    out["ref_step_s"] = float(np.median([h["ref_step_s"] for h in hosts]))
    out["ref_step_s_runs"] = [h["ref_step_s"] for h in hosts]
    return out


def _measure(p: Profile, compiled, min_time, session=None, reference=None):
    if p.board:
        from edgetvm.latte.remote import check_board, measure_board

        board = check_board(p)
        try:
            default = [c for c in compiled if c.get("schedule", "default") == "default"]
            return measure_board(p, default, session, board, min_time=min_time)
        except (RuntimeError, OSError) as e:  # a board that drops mid-run is left out like a failed device
            raise RuntimeError(f"measuring on board {p.name} failed: {e}") from None
    from edgetvm.latte.measure import measure_profile

    return measure_profile(p, compiled, min_time=min_time, reference=reference)


def noise_floor(data: dict, measurements: list[dict] | None = None) -> dict | None:
    """Repeatability of the whole-step wall time: the same compiled step on the same profile, measured by
    separate processes. `pair_mape`: mean |run_i - run_j| / mean over every pair of runs; `floor_mape`:
    the MAPE a perfect model would still score against the median of the repeats (about half the
    pairwise figure for 2 runs); `within10`: share of pairs within +-10% of each other. Over
    `measurements` (e.g. one test set) when given."""
    import itertools

    import numpy as np

    rel, per_profile = [], {}
    ms = data["measurements"] if measurements is None else measurements
    for m in ms:
        r = m.get("step_s_runs") or []
        for a, b in itertools.combinations(r, 2):
            d = abs(a - b) / ((a + b) / 2)
            rel.append(d)
            per_profile.setdefault(m["profile"], []).append(d)
    if not rel:
        return None
    rel = np.array(rel)
    n = int(np.median([len(m["step_s_runs"]) for m in ms if len(m.get("step_s_runs") or []) >= 2]))
    return {"n": sum(len(m.get("step_s_runs") or []) >= 2 for m in ms), "repeats": n, "pair_mape": float(rel.mean() * 100),
            "pair_median": float(np.median(rel) * 100), "within10": float((rel <= 0.10).mean() * 100),
            "floor_mape": float(rel.mean() * 100 / 2 * math.sqrt(2 / n)),
            "per_profile": {k: float(np.mean(v) * 100) for k, v in sorted(per_profile.items())}}


def tuned_speedups(data: dict) -> list[float]:
    """Measured default / tuned wall time of the same step (architecture, width) on the same device."""
    steps = {(m["profile"], m["arch_name"], m["width"], m.get("schedule", "default")): m["step_s"]
             for m in data["measurements"]}
    return [steps[(p, a, w, "default")] / t for (p, a, w, sched), t in steps.items()
            if sched == "tuned" and (p, a, w, "default") in steps]


def load_profile_data(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; run `edgetvm latte profile -o {path}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not a profile file ({e}); run `edgetvm latte profile` again") from None


def split(data: dict, held_archs=HELD_OUT_ARCHS, held_profiles=HELD_OUT_PROFILES):
    """(training measurements, held-out test sets). A training measurement never shares a held-out
    architecture's compiled step (a width-sliced CNN can equal another CNN at another width) nor a
    held-out device."""
    ms = data["measurements"]
    held_dirs = {m["dir"] for m in ms if m["arch_name"] in held_archs}
    train = [m for m in ms if m["arch_name"] not in held_archs and m["dir"] not in held_dirs
             and m["profile"] not in held_profiles]
    sets = {
        "held-out archs": [m for m in ms if m["arch_name"] in held_archs and m["profile"] not in held_profiles],
        "held-out profiles": [m for m in ms if m["arch_name"] not in held_archs and m["profile"] in held_profiles],
        "both held out": [m for m in ms if m["arch_name"] in held_archs and m["profile"] in held_profiles],
    }
    return train, sets


def current_metas(data: dict) -> dict:
    """Static kernel features of every compiled step, recomputed where the features changed since profiling."""
    out = {}
    for d, meta in data["metas"].items():
        if Path(d, "meta.json").exists():
            out[d] = training.load_meta(Path(d))
        elif meta.get("feature_version") == training.FEATURE_VERSION:
            out[d] = meta
        else:
            raise UserError(f"compiled step {d} of the profile data is gone and its features are outdated; "
                            f"run `edgetvm latte profile` again")
    return out


def _evaluate(latte, flops, ms, metas) -> dict:
    from edgetvm.costmodels.latte import decompose, errors

    true = [m["step_s"] for m in ms]
    parts = [latte.predict_parts(metas[m["dir"]], m["device"], host=m.get("host")) for m in ms]
    ours = [p["step_s"] for p in parts]
    base = [flops.predict_step(metas[m["dir"]], m["device"]) for m in ms]
    meas_ov = [decompose(m, metas[m["dir"]]) for m in ms]
    by_schedule = {}
    for sched in sorted({m.get("schedule", "default") for m in ms}):
        idx = [i for i, m in enumerate(ms) if m.get("schedule", "default") == sched]
        by_schedule[sched] = {"latte": errors([ours[i] for i in idx], [true[i] for i in idx]),
                              "flops": errors([base[i] for i in idx], [true[i] for i in idx])}
    return {"latte": errors(ours, true), "flops": errors(base, true), "by_schedule": by_schedule,
            # share of the step outside TIR kernels: predicted vs measured (CPU time)
            "overhead_share_pred": float(sum(p["overhead_s"] / p["step_s"] for p in parts) / len(ms) * 100),
            "overhead_share_meas": float(sum(d["overhead_s"] / d["cpu_step_s"] for d in meas_ov) / len(ms) * 100),
            "rows": [{"profile": m["profile"], "arch": m["arch_name"], "width": m["width"],
                      "schedule": m.get("schedule", "default"), "measured_s": t,
                      "latte_s": o, "flops_s": b} for m, t, o, b in zip(ms, true, ours, base)]}


def fit_and_evaluate(data: dict, held_archs=HELD_OUT_ARCHS, held_profiles=HELD_OUT_PROFILES, save: Path | None = None):
    """Fit LATTE and the FLOPs baseline on the training split; whole-step wall-time errors on each held-out set."""
    from edgetvm.costmodels.latte import FlopsBaseline, LatteModel

    train, sets = split(data, held_archs, held_profiles)
    if not train:
        raise UserError("no training measurements left after holding out architectures and profiles; "
                        "profile more architectures/devices")
    metas = current_metas(data)
    latte = LatteModel().fit(train, metas)
    flops = FlopsBaseline().fit(train, metas)
    report = {"n_train": len(train), "held_out_archs": list(held_archs), "held_out_profiles": list(held_profiles),
              "sets": {}, "noise": noise_floor(data), "overhead_coef": dict(zip(("one", "builtin_call", "kernel_call",
                                                                                "param"), latte.overhead)),
              "wall_coef": latte.wall}
    for name, ms in sets.items():
        if ms:
            report["sets"][name] = _evaluate(latte, flops, ms, metas)
            report["sets"][name]["noise"] = noise_floor(data, ms)
    if save is not None:
        # The model the allocator uses: fitted on every profiled device (they are the fleet), still
        # never on the federated architecture, which stays an unseen architecture for it.
        fed_dirs = {m["dir"] for m in data["measurements"] if m["arch_name"] == models.FED_ARCH}
        deploy = [m for m in data["measurements"] if m["arch_name"] != models.FED_ARCH and m["dir"] not in fed_dirs]
        LatteModel().fit(deploy, metas).save(save)
        Path(save, "report.json").write_text(json.dumps(report, indent=1))
    return latte, flops, report


def format_report(report: dict) -> str:
    lines = [f"estimator: whole-step wall time (kernels + per-step overhead), {report['n_train']} training "
             f"measurements; held out: archs {', '.join(report['held_out_archs'])}; "
             f"profiles {', '.join(report['held_out_profiles'])}",
             f"{'test set':<18} {'n':>4} {'LATTE MAPE':>11} {'<=10%':>7} {'perfect':>8} {'FLOPs MAPE':>11} "
             f"{'<=10%':>7} {'overhead pred/meas':>19}"]
    for name, s in report["sets"].items():
        nz = s.get("noise")
        perfect = f"{nz['floor_mape']:>7.1f}%" if nz else f"{'?':>8}"
        lines.append(f"{name:<18} {s['latte']['n']:>4} {s['latte']['mape']:>10.1f}% {s['latte']['within10']:>6.0f}% "
                     f"{perfect} {s['flops']['mape']:>10.1f}% {s['flops']['within10']:>6.0f}% "
                     f"{s['overhead_share_pred']:>8.0f}% / {s['overhead_share_meas']:.0f}%")
        if len(s.get("by_schedule", {})) > 1:  # the same set split by which kernels TVM ran
            for sched, e in s["by_schedule"].items():
                lines.append(f"{'  ' + sched + ' schedule':<18} {e['latte']['n']:>4} {e['latte']['mape']:>10.1f}% "
                             f"{e['latte']['within10']:>6.0f}% {'':>8} {e['flops']['mape']:>10.1f}% "
                             f"{e['flops']['within10']:>6.0f}%")
    nz = report.get("noise")
    if nz:
        lines.append(f"noise floor: {nz['n']} steps measured {nz['repeats']}x by separate processes differ by "
                     f"{nz['pair_mape']:.1f}% on average (median {nz['pair_median']:.1f}%, {nz['within10']:.0f}% "
                     f"within +-10%); a perfect model would score about {nz['floor_mape']:.1f}% MAPE "
                     f"(column 'perfect': the same for each test set)")
    else:
        lines.append("noise floor: unknown (profile with --repeats 2 or more)")
    return "\n".join(lines)


def cross_validate(data: dict, quiet: bool = False) -> dict:
    """Leave-one-architecture-out and leave-one-device-out: every measurement is predicted once by a model
    that never saw its architecture (resp. its device); whole-step MAPE of LATTE and the FLOPs baseline."""
    from edgetvm.costmodels.latte import FlopsBaseline, LatteModel, errors

    metas = current_metas(data)
    ms = data["measurements"]
    out = {}
    for what, key in (("architecture", "arch_name"), ("device", "profile")):
        groups = sorted({m[key] for m in ms})
        pred, base, true = [], [], []
        for i, g in enumerate(groups):
            if not quiet:
                progress(i, len(groups), f"leave out {what} {g}")
            test = [m for m in ms if m[key] == g]
            dirs = {m["dir"] for m in test} if key == "arch_name" else set()
            train = [m for m in ms if m[key] != g and m["dir"] not in dirs]
            lm, fb = LatteModel().fit(train, metas), FlopsBaseline().fit(train, metas)
            pred += [lm.predict_step(metas[m["dir"]], m["device"]) for m in test]
            base += [fb.predict_step(metas[m["dir"]], m["device"]) for m in test]
            true += [m["step_s"] for m in test]
        if not quiet:
            progress(len(groups), len(groups), f"leave-one-{what}-out done")
        out[f"leave one {what} out"] = {"latte": errors(pred, true), "flops": errors(base, true)}
    return out


def format_cv(cv: dict) -> str:
    lines = [f"{'cross-validation':<28} {'n':>4} {'LATTE MAPE':>11} {'<=10%':>7} {'FLOPs MAPE':>11} {'<=10%':>7}"]
    for name, s in cv.items():
        lines.append(f"{name:<28} {s['latte']['n']:>4} {s['latte']['mape']:>10.1f}% {s['latte']['within10']:>6.0f}% "
                     f"{s['flops']['mape']:>10.1f}% {s['flops']['within10']:>6.0f}%")
    return "\n".join(lines)


def cross_machine(fit_data: dict, test_data: dict) -> dict:
    """Fit on one machine's profile (its training split) and predict the steps measured on another, each
    with the other machine's calibration and caches: MAPE per test set of the other profile (the
    training architectures and devices, seen only on the first machine, then the held-out sets) next
    to that profile's own noise floor."""
    from edgetvm.costmodels.latte import LatteModel, errors

    metas_a, metas_b = current_metas(fit_data), current_metas(test_data)
    train, _ = split(fit_data)
    model = LatteModel().fit(train, metas_a)
    seen, sets = split(test_data)
    out = {"fit_host": model.host, "test_host": test_data.get("host"), "sets": {}}
    for name, ms in {"same archs+devices": seen, **sets}.items():
        if not ms:
            continue
        pred = [model.predict_step(metas_b[m["dir"]], m["device"], host=m.get("host")) for m in ms]
        nz = noise_floor(test_data, ms)
        out["sets"][name] = {**errors(pred, [m["step_s"] for m in ms]), "floor": nz["floor_mape"] if nz else None}
    return out


def format_cross(cross: dict) -> str:
    a, b = cross["fit_host"] or {}, cross["test_host"] or {}
    lines = [f"across machines: fitted on {a.get('cpu', '?')} (reference step {a.get('ref_step_s', 0) * 1e3:.2f} ms), "
             f"predicting {b.get('cpu', '?')} (reference step {b.get('ref_step_s', 0) * 1e3:.2f} ms)",
             f"{'test set':<20} {'n':>4} {'LATTE MAPE':>11} {'<=10%':>7} {'perfect':>8}"]
    for name, e in cross["sets"].items():
        fl = f"{e['floor']:>7.1f}%" if e["floor"] is not None else f"{'?':>8}"
        lines.append(f"{name:<20} {e['n']:>4} {e['mape']:>10.1f}% {e['within10']:>6.0f}% {fl}")
    return "\n".join(lines)
