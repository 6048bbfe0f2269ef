"""p-Meta against MAML, ANIL and bias-only: few-shot accuracy and adaptation memory, side by side in one run.

    .venv/bin/python bench/pmeta.py                       # about 14 minutes on 2 busy cores (833 s)
    .venv/bin/python bench/pmeta.py --iterations 40 --tasks 20 --quick     # a smoke run
    .venv/bin/python bench/pmeta.py --pmeta-budget 0                       # no budgeted p-Meta row

Each method meta-trains the same Conv4 (32 channels, no batch norm) on 5-way 1-shot tasks of kanji renders
(first-order, short runs); each is then tested on held-out characters, 5-way 1-shot and 5-shot (the
1-shot-trained model, S adaptation steps by the compiled masked step), and on MNIST digits (cross-domain).
Memory: each method's compiled step (no im2col: the memory-lean build) at the 1-shot and 5-shot support
sizes: planned (Relax's memory planner + kernel scratch) and measured (peak charged to a cgroup, minus the
same process loading everything and running no step), with TVM's own full step (relax.training Gradient)
as the full fine-tuning reference. A second p-Meta row is meta-trained under a memory budget (--pmeta-budget MiB
of planned memory at 5-shot, adapt/budget.py); a "byte masks" row is p-Meta's step with one-byte ReLU / max-pool
masks instead of bits, for the planned and measured difference the packing makes. Accuracy is measured with the im2col build of the same masked step
(the same arithmetic, faster here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 1 << 20


def main(argv=None) -> int:
    from edgetvm import data, train
    from edgetvm.adapt import measure as me
    from edgetvm.adapt import meta
    from edgetvm.adapt import step as st

    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--tasks", type=int, default=100, help="meta-test tasks per figure")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--methods", default=",".join(meta.METHODS))
    ap.add_argument("--out", default="results/pmeta", help="artifacts and results.json go here")
    ap.add_argument("--no-measure", action="store_true", help="skip the cgroup measurements")
    ap.add_argument("--quick", action="store_true", help="fewer validation tasks")
    ap.add_argument("--pmeta-budget", type=float, default=6.0, metavar="MIB",
                    help="also meta-train p-Meta under this planned-memory budget at 5-shot (0: do not)")
    a = ap.parse_args(argv)
    if a.pmeta_budget < 0:
        ap.error(f"--pmeta-budget {a.pmeta_budget}: give MiB of planned memory, or 0 for no budgeted row")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    fs = data.load_fewshot("kanji")
    mnist = data.load_fewshot("mnist")
    rows, t_start = {}, time.perf_counter()
    runs = [(m, m, 0.0) for m in a.methods.split(",")]
    budget_row = f"pmeta, budget {a.pmeta_budget:g} MiB"
    if a.pmeta_budget:
        runs.append((budget_row, "pmeta", a.pmeta_budget))
    for label, method, budget in runs:
        cfg = meta.MetaConfig(method=method, iterations=a.iterations, inner_steps=a.steps, memory_budget=budget,
                              val_every=max(a.iterations // 10, 1), val_tasks=10 if a.quick else 30)
        t0 = time.perf_counter()
        learner = meta.meta_train(cfg, progress=lambda i, r: print(
            f"\r{method}: iteration {i}/{cfg.iterations}  query acc {100 * r['query_accuracy']:.0f}%"
            + (f"  val {100 * r['val_accuracy']:.1f}%" if "val_accuracy" in r else ""), end="", file=sys.stderr))
        print(file=sys.stderr)
        meta.save(learner, out / _dirname(label))
        row = {"meta_train_s": time.perf_counter() - t0, "updated_share": learner.updated_share(),
               "best_iteration": learner.best_iteration,
               "mask": {n: int(m.sum()) for n, m in learner.mask().items()}}
        if budget:
            row["budget_planned_mib"] = learner.planned / MIB
            row["budget_dropped"] = [r["budget_dropped"] for r in learner.history if "budget_dropped" in r]
        for k in (1, 5):
            row[f"kanji_{k}shot"] = meta.evaluate_compiled(learner, fs, "test", k, a.tasks, seed=1, steps=a.steps)
        row["mnist_5shot"] = meta.evaluate_compiled(learner, mnist, "test", 5, a.tasks, seed=1, steps=a.steps)
        rows[label] = row
        print(f"{label}: {json.dumps(row)}", file=sys.stderr)

    # ---- memory -------------------------------------------------------------------------------------
    model = train.conv4(5, channels=32)
    learners = {m: meta.load(out / _dirname(m)) for m in rows}
    mem = {}
    configs = [(m, "masked") for m in rows] + [("full (TVM Gradient)", "full")]
    if "pmeta" in rows:
        learners["pmeta, byte masks"] = learners["pmeta"]
        configs.append(("pmeta, byte masks", "masked8"))
    for k in (1, 5):
        rng = np.random.default_rng(k)
        sx, sy, _, _ = data.sample_task(fs, "test", 5, k, 1, rng)
        for name, kind in configs:
            masked = kind != "full"
            bits = 8 if kind == "masked8" else 1
            lr = learners[name].rates if masked else 0.1
            mask = learners[name].mask() if masked else None
            params = learners[name].params if masked else next(iter(learners.values())).params
            if masked:
                planned = st.planned_memory(st.step_module(model, len(sx), st.check_mask(model, mask),
                                                           {n: lr[n][mask[n]] for n in mask}, conv_as_matmul=False,
                                                           mask_bits=bits), "adapt_step")
            else:
                planned = st.planned_memory(st.full_step_module(model, len(sx), conv_as_matmul=False),
                                            "backbone_loss_adjoint")
            entry = {"planned": planned.dynamic, "planned_total": planned.total}
            if not a.no_measure:
                with tempfile.TemporaryDirectory() as d:
                    me.export(model, len(sx), mask, lr, params, sx, sy, d, kind="masked" if masked else "full",
                              conv_as_matmul=False, mask_bits=bits)
                    r = me.measure(d, steps=a.steps)
                entry |= {"measured": r["peak"] - r["idle"], "idle": r["idle"]}
            mem[(name, k)] = entry
            print(f"memory {name} {k}-shot: {entry}", file=sys.stderr)

    # ---- the table ------------------------------------------------------------------------------------
    def pct(r):
        return f"{100 * r['accuracy']:5.1f} +- {100 * r['ci95']:.1f}"

    full = "full (TVM Gradient)"
    print(f"\n5-way few-shot on kanji renders (test characters), Conv4-32, first-order meta-training "
          f"{a.iterations} iterations (1-shot), {a.steps} adaptation steps, {a.tasks} tasks per figure")
    head = (f"{'method':<24} {'updated':>8} {'1-shot %':>13} {'5-shot %':>13} {'MNIST 5-shot':>13} "
            f"{'planned MiB 1/5-shot':>21} {'measured MiB 1/5-shot':>22} {'full/this (5-shot, measured)':>29}")
    print(head)
    print("-" * len(head))
    for name, kind in configs:
        r = rows.get(name)
        p1, p5 = mem[(name, 1)], mem[(name, 5)]
        if kind == "masked8":
            r = None
        meas = (f"{p1['measured'] / MIB:9.2f} / {p5['measured'] / MIB:6.2f}" if "measured" in p1 else "-")
        ratio = (f"{mem[(full, 5)]['measured'] / p5['measured']:.2f}x" if "measured" in p5 else
                 f"{mem[(full, 5)]['planned'] / p5['planned']:.2f}x (planned)")
        acc = (f"{100 * r['updated_share']:7.1f}% {pct(r['kanji_1shot']):>13} {pct(r['kanji_5shot']):>13} "
               f"{pct(r['mnist_5shot']):>13}") if r else \
            f"{'100.0%' if kind == 'full' else '(= pmeta)':>8} {'-':>13} {'-':>13} {'-':>13}"
        print(f"{name:<24} {acc} {p1['planned'] / MIB:12.2f} / {p5['planned'] / MIB:6.2f} {meas:>22} {ratio:>29}")
    print(f"\n({time.perf_counter() - t_start:.0f} s in all; memory: the step's own, above the loaded process; "
          "renders of real characters, not handwriting)")
    for name, r in rows.items():
        if "budget_planned_mib" in r:
            print(f"{name}: the kept selection plans {r['budget_planned_mib']:.2f} MiB at 5-shot; the fits dropped "
                  + "; ".join(", ".join(d) for d in r["budget_dropped"]))
    (out / "results.json").write_text(json.dumps(
        {"args": vars(a), "accuracy": rows, "memory": {f"{n}|{k}": v for (n, k), v in mem.items()}}, indent=1))
    return 0


def _dirname(label: str) -> str:
    return label.replace(", budget ", "-budget-").replace(" ", "")


if __name__ == "__main__":
    from edgetvm.runtime import signals

    with signals.sigterm_raises():   # SIGTERM unwinds, so the measuring cgroups are removed
        sys.exit(main())
