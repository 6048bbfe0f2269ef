"""p-Meta against MAML, ANIL and bias-only: few-shot accuracy and adaptation memory, side by side in one run.

    .venv/bin/python bench/pmeta.py                       # about 14 minutes on 2 busy cores (833 s) before the
                                                          # task-attention row, which adds 2-5 minutes
    .venv/bin/python bench/pmeta.py --iterations 40 --tasks 20 --quick     # a smoke run
    .venv/bin/python bench/pmeta.py --pmeta-budget 0                       # no budgeted p-Meta row
    .venv/bin/python bench/pmeta.py --methods pmeta --pmeta-attention static,task   # the two attentions only

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
p-Meta runs with each attention of --pmeta-attention (default both): "static" (one learned step size per channel
for every task) and "task" (the task-conditioned attention, adapt/attention.py: per task, a statistics step on
one support image per class, then the masked step of that task's layers with its rates). A task row's memory is
that of the sample task's two steps, run one after the other: its peak is the larger of the two (planned:
each step's own figure; measured: each step in its own cgroup run, the statistics step measured as the union's
update step on the chunk, an upper bound of its gradient step). The layer sets the test tasks picked, and the
planned memory of the most expensive of them at 5-shot, are printed under the table.
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
    ap.add_argument("--pmeta-attention", default=",".join(meta.ATTENTIONS),
                    help="p-Meta's attentions to compare: static, task or both (default static,task); the budgeted "
                         "row uses the first")
    a = ap.parse_args(argv)
    if a.pmeta_budget < 0:
        ap.error(f"--pmeta-budget {a.pmeta_budget}: give MiB of planned memory, or 0 for no budgeted row")
    attentions = a.pmeta_attention.split(",")
    if not attentions or any(x not in meta.ATTENTIONS for x in attentions):
        ap.error(f"--pmeta-attention {a.pmeta_attention}: give static, task or static,task")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    fs = data.load_fewshot("kanji")
    mnist = data.load_fewshot("mnist")
    rows, t_start = {}, time.perf_counter()
    runs = []
    for m in a.methods.split(","):
        if m != "pmeta":
            runs.append((m, m, 0.0, "static"))
            continue
        runs += [(TASK_ROW if att == "task" else "pmeta", m, 0.0, att) for att in attentions]
    budget_row = f"pmeta, budget {a.pmeta_budget:g} MiB" + (", task attention" if attentions[0] == "task" else "")
    if a.pmeta_budget:
        runs.append((budget_row, "pmeta", a.pmeta_budget, attentions[0]))
    for label, method, budget, attention in runs:
        cfg = meta.MetaConfig(method=method, iterations=a.iterations, inner_steps=a.steps, memory_budget=budget,
                              val_every=max(a.iterations // 10, 1), val_tasks=10 if a.quick else 30,
                              attention=attention)
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
        if attention == "task":   # planned memory of the most expensive layer set the 5-shot test tasks picked
            union = learner.mask()
            worst = (0, "")
            for layers in row["kanji_5shot"]["task_layers"]:
                mask = {n: m for n, m in union.items() if n.split(".")[0] in layers.split()}
                planned = st.planned_memory(st.step_module(learner.model, 25, mask, 0.1, conv_as_matmul=False),
                                            "adapt_step").dynamic
                worst = max(worst, (planned, layers))
            row["task_worst_5shot"] = {"planned": worst[0], "layers": worst[1]}
            row["mean_features"] = {f"kanji_{k}shot": meta.evaluate_compiled(
                _mean_features(learner, fs, a.tasks), fs, "test", k, a.tasks, seed=1, steps=a.steps) for k in (1, 5)}
        rows[label] = row
        print(f"{label}: {json.dumps(row)}", file=sys.stderr)

    # ---- memory -------------------------------------------------------------------------------------
    model = train.conv4(5, channels=32)
    learners = {m: meta.load(out / _dirname(m)) for m in rows}
    mem = {}
    configs = [(m, "task" if learners[m].attention is not None else "masked") for m in rows] + \
        [("full (TVM Gradient)", "full")]
    if "pmeta" in rows:
        learners["pmeta, byte masks"] = learners["pmeta"]
        configs.append(("pmeta, byte masks", "masked8"))
    for k in (1, 5):
        rng = np.random.default_rng(k)
        sx, sy, _, _ = data.sample_task(fs, "test", 5, k, 1, rng)
        for name, kind in configs:
            if kind == "task":
                mem[(name, k)] = _task_memory(learners[name], sx, sy, a, model)
                print(f"memory {name} {k}-shot: {mem[(name, k)]}", file=sys.stderr)
                continue
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
        if "task_layers" in r.get("kanji_5shot", {}):
            print(f"{name}: layers updated per test task (1-shot / 5-shot / MNIST): "
                  + " / ".join(", ".join(f"{{{k}}} {v}x" for k, v in r[f].get("task_layers", {}).items())
                               for f in ("kanji_1shot", "kanji_5shot", "mnist_5shot"))
                  + f"; the most expensive at 5-shot ({{{r['task_worst_5shot']['layers']}}}) plans "
                  f"{r['task_worst_5shot']['planned'] / MIB:.2f} MiB")
        for k in (1, 5):
            e = mem.get((name, k), {})
            if "planned_stats" in e:
                print(f"{name}, {k}-shot sample task: statistics step {e['planned_stats'] / MIB:.2f} MiB planned"
                      + (f" / {e['measured_stats'] / MIB:.2f} measured" if "measured_stats" in e else "")
                      + f", then the step of {{{' '.join(e['layers'])}}} {e['planned_step'] / MIB:.2f} planned"
                      + (f" / {e['measured_step'] / MIB:.2f} measured" if "measured_step" in e else ""))
        if "mean_features" in r:
            mf = r["mean_features"]
            print(f"{name}: the same learner with every task's features replaced by their mean over {a.tasks} "
                  f"meta-training tasks (no conditioning, the same multipliers on average): 1-shot "
                  f"{pct(mf['kanji_1shot'])}%, 5-shot {pct(mf['kanji_5shot'])}% (conditioned: "
                  f"{pct(r['kanji_1shot'])}%, {pct(r['kanji_5shot'])}%)")
        if "budget_planned_mib" in r:
            print(f"{name}: the kept selection plans {r['budget_planned_mib']:.2f} MiB at 5-shot; the fits dropped "
                  + "; ".join(", ".join(d) for d in r["budget_dropped"]))
    (out / "results.json").write_text(json.dumps(
        {"args": vars(a), "accuracy": rows, "memory": {f"{n}|{k}": v for (n, k), v in mem.items()}}, indent=1))
    return 0


TASK_ROW = "pmeta, task attention"


def _dirname(label: str) -> str:
    return label.replace(", budget ", "-budget-").replace(", task attention", "-task").replace(" ", "")


def _mean_features(learner, fs, tasks: int):
    """The learner with an attention whose features are the mean of the features of `tasks` meta-training
    tasks, whatever the task: what the task-conditioned attention does without conditioning."""
    import copy

    from edgetvm import data
    from edgetvm.adapt import attention as at
    from edgetvm.adapt import meta

    adapter = meta.TaskAdapter(learner, learner.config.n_way, conv_as_matmul=False)
    rng = np.random.default_rng(97)
    feats = [adapter.plan(*data.sample_task(fs, "train", learner.config.n_way, 1, 1, rng)[:2])["features"]
             for _ in range(tasks)]
    mean = {kind: {n: np.mean([f[kind][n] for f in feats], 0) for n in feats[0][kind]} for kind in feats[0]}

    class MeanFeatures(at.TaskAttention):
        def features(self, grads, weights, union):
            return mean

    fixed = copy.copy(learner)
    fixed.attention = MeanFeatures(learner.attention.theta, learner.attention.threshold)
    return fixed


def _task_memory(learner, sx, sy, a, model) -> dict:
    """Memory of adapting to one task with the task-conditioned attention: the statistics step (the union's
    gradients on one image a class), then the masked step of the layers this task's attention kept. They
    run one after the other, so the adaptation's peak is the larger of the two."""
    from edgetvm.adapt import measure as me
    from edgetvm.adapt import meta
    from edgetvm.adapt import step as st

    union = learner.mask()
    idx = meta.stats_chunk(sy, learner.config.n_way)
    ta = meta.TaskAdapter(learner, len(sx), conv_as_matmul=False).plan(sx, sy)
    mask, rates = ta["mask"], ta["rates"]
    stats = st.planned_memory(st.step_module(model, len(idx), union, 0.0, output="grad", conv_as_matmul=False),
                              "adapt_step")
    step = st.planned_memory(st.step_module(model, len(sx), mask, {n: rates[n][mask[n]] for n in mask},
                                            conv_as_matmul=False), "adapt_step")
    entry = {"planned": max(stats.dynamic, step.dynamic), "planned_total": max(stats.total, step.total),
             "planned_stats": stats.dynamic, "planned_step": step.dynamic,
             "layers": list(dict.fromkeys(n.split(".")[0] for n in mask))}
    if not a.no_measure:
        runs = {}
        for what, m, r, x, y in (("stats", union, learner.rates, sx[idx], sy[idx]), ("step", mask, rates, sx, sy)):
            with tempfile.TemporaryDirectory() as d:
                me.export(model, len(x), m, r, learner.params, x, y, d, conv_as_matmul=False)
                runs[what] = me.measure(d, steps=1 if what == "stats" else a.steps)
        entry |= {"measured_stats": runs["stats"]["peak"] - runs["stats"]["idle"],
                  "measured_step": runs["step"]["peak"] - runs["step"]["idle"],
                  "idle": runs["step"]["idle"]}
        entry["measured"] = max(entry["measured_stats"], entry["measured_step"])
    return entry


if __name__ == "__main__":
    from edgetvm.runtime import signals

    with signals.sigterm_raises():   # SIGTERM unwinds, so the measuring cgroups are removed
        sys.exit(main())
