"""Tuned vs untuned vs onnxruntime on this machine, measured side by side in one run.

    python bench/tune.py [--trials N] [--models ocr_cls,dense_stack] [--dense-n 8 --dense-d 3072]

For each model: tune every kernel for the host with `edgetvm tune`'s driver (N trials per task,
MetaSchedule + XGBoost; the database is kept in --work-dir, so a second run with the same budget
only measures), compile it untuned and with the database, check that the outputs agree, then time
the untuned build, the tuned build and onnxruntime in interleaved rounds so that all three see the
same machine load. Latencies are medians of per-call times: TVM's on-device time_evaluator, and
perf_counter around InferenceSession.run for onnxruntime (its Python call overhead, ~10 us,
included). Both use the board's core count as threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgetvm import tuning, zoo  # noqa: E402
from edgetvm.compiler import compile_model  # noqa: E402
from edgetvm.runtime.artifact import open_artifact  # noqa: E402
from edgetvm.runtime.session import Runner, model_threads  # noqa: E402
from edgetvm.targets import load_board  # noqa: E402


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def side_by_side(untuned: Runner, tuned: Runner, sess, inputs: dict, rounds: int, per_round: int) -> dict:
    """Median per-call latency (ms) of each, over `rounds` interleaved rounds of `per_round` calls."""
    samples = {"untuned": [], "tuned": [], "onnxruntime": []}
    for _ in range(2):  # warm-up: page in weights, start thread pools
        untuned.run(inputs)
        tuned.run(inputs)
        sess.run(None, inputs)
    for _ in range(rounds):
        samples["untuned"] += [s * 1e3 for s in untuned.time(inputs, repeat=per_round).seconds]
        samples["tuned"] += [s * 1e3 for s in tuned.time(inputs, repeat=per_round).seconds]
        for _ in range(per_round):
            t = time.perf_counter()
            sess.run(None, inputs)
            samples["onnxruntime"].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench_model(name: str, kw: dict, args, board) -> dict:
    work = Path(args.work_dir)
    path = zoo.path(name, work / "models", **kw)
    shapes = zoo.default_input_shapes(name, **kw)
    label = name + ("(" + ",".join(f"{k}={v}" for k, v in kw.items()) + ")" if kw else "")
    tag = "-".join([name] + [f"{k}{v}" for k, v in kw.items()])
    print(f"\n== {label}: {path.name}, inputs {shapes}", file=sys.stderr, flush=True)

    t = time.monotonic()
    res = tuning.tune(path, board, work / f"{tag}.{board.name}.tuningdb", shapes, trials=args.trials,
                      trials_per_batch=args.trials_per_batch, seed=0)
    tune_s = time.monotonic() - t
    tuning.print_summary(res, out=sys.stderr)
    if res.interrupted:
        raise KeyboardInterrupt

    plain = compile_model(path, board, work / f"{tag}.untuned", shapes)
    db = tuning.open_database(res.path, board, path, shapes)
    fast = compile_model(path, board, work / f"{tag}.tuned", shapes, tuning_db=db)

    inputs = zoo.sample_inputs(name, seed=0, shapes=shapes, **kw)
    r_plain, r_fast = Runner(open_artifact(plain.path)), Runner(open_artifact(fast.path))
    sess = ort_session(path, board.cores)
    y_plain, y_fast = r_plain.run(inputs), r_fast.run(inputs)
    y_ort = sess.run(None, inputs)
    diff_tuned = max(float(np.abs(y_fast[k] - y_plain[k]).max()) for k in y_plain)
    diff_ort = max(float(np.abs(a - b).max()) for a, b in zip(y_fast.values(), y_ort))
    lat = side_by_side(r_plain, r_fast, sess, inputs, args.rounds, args.per_round)
    return {"model": label, "tasks": len(res.tasks), "trials": sum(t.trials for t in res.tasks),
            "tune_s": tune_s, "new_trials": res.new_trials, **lat,
            "diff_tuned": diff_tuned, "diff_ort": diff_ort}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=16, help="trials per task (default 16)")
    p.add_argument("--trials-per-batch", type=int, default=16)
    p.add_argument("--models", default="ocr_cls,dense_stack", help="comma-separated zoo models")
    p.add_argument("--dense-n", type=int, default=8, help="dense_stack layers (default 8)")
    p.add_argument("--dense-d", type=int, default=3072, help="dense_stack width (default 3072)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--per-round", type=int, default=20, help="calls per round and engine (default 20)")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "edgetvm" / "bench-tune"),
                   help="models, tuning databases (kept: a rerun resumes) and artifacts")
    args = p.parse_args(argv)
    # TVM's pool as `edgetvm run` sets it up: without it, one thread on x86 (TVM takes half the hardware
    # threads for hyperthread pairs) against onnxruntime's board.cores
    model_threads()
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    board = load_board("host")
    rows = []
    t0 = time.monotonic()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        kw = {"n": args.dense_n, "d": args.dense_d} if name == "dense_stack" else {}
        if name == "dense_stack" and (args.dense_n, args.dense_d) == (8, 3072):
            kw = {}  # the zoo default: its cached file has no suffix
        if not zoo.available(name):
            print(f"skipping {name}: its package is not installed", file=sys.stderr)
            continue
        rows.append(bench_model(name, kw, args, board))

    print(f"\nhost: {board.tvm_target.get('mcpu', '?')}, {board.cores} cores; budget {args.trials} trials per task; "
          f"load average at the end {os.getloadavg()[0]:.2f}; total {time.monotonic() - t0:.0f} s")
    header = ["model", "tasks", "trials", "tune s", "untuned ms", "tuned ms", "onnxruntime ms",
              "tuned/untuned", "tuned/onnxruntime", "max|tuned-untuned|", "max|tuned-ort|"]
    table = [[r["model"], str(r["tasks"]), str(r["trials"]), f"{r['tune_s']:.0f}",
              f"{r['untuned']:.3f}", f"{r['tuned']:.3f}", f"{r['onnxruntime']:.3f}",
              f"{r['tuned'] / r['untuned']:.3f}", f"{r['tuned'] / r['onnxruntime']:.3f}",
              f"{r['diff_tuned']:.1e}", f"{r['diff_ort']:.1e}"] for r in rows]
    widths = [max(len(x[i]) for x in table + [header]) for i in range(len(header))]
    for r in [header] + table:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print("(ratios < 1: tuned is faster; latencies are medians of "
          f"{args.rounds} x {args.per_round} interleaved calls each)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench/tune.py: interrupted; the tuning databases in --work-dir are kept: run it again to continue",
              file=sys.stderr)
        sys.exit(130)
