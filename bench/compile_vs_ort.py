"""Latency of the edgetvm host build / onnxruntime, same input, measured side by side, each model in a fresh process.

    python bench/compile_vs_ort.py [--models ocr_cls,resnet,light_squeezenet] [--rounds 5] [--repeat 20] [--threads N]

By default every zoo model (MobileNetV3 cls, PP-OCRv4 det and rec, mlp, cnn, resnet, inception, transformer,
dense_stack, vgg) and the onnx wheel's light_* networks under 10 MiB of weights (random weights in place of
their ConstantOfShape fills). Both use every core of this machine, or N threads each. Rounds alternate between the two engines so that drift
(other load, frequency) hits both alike; each engine's figure is its median over all calls. Each model runs
in a process of its own: after the nine models before it in one process, VGG took 0.94-0.99 ms here and
onnxruntime 0.78 ms on it, against 0.54 and 0.45 ms measured alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgetvm import zoo
from edgetvm.compiler import compile_model, random_inputs
from edgetvm.costmodels.profile import kernel_times
from edgetvm.runtime.artifact import open_artifact
from edgetvm.runtime.session import Runner, model_threads
from edgetvm.targets import load_board


LIGHT = ["light_squeezenet", "light_shufflenet", "light_inception_v1", "light_densenet121", "light_inception_v2"]


def source(name: str, workdir: Path) -> tuple[Path, dict | None]:
    """The ONNX file of a zoo model or of `light_<name>` (written with random weights), and its input shapes."""
    if name.startswith("light_"):
        import onnx

        from edgetvm.conformance import light_with_random_weights

        path = workdir / f"{name}.onnx"
        onnx.save(light_with_random_weights(name.removeprefix("light_")), path)
        return path, None
    return zoo.path(name), zoo.default_input_shapes(name)


def measure(name: str, workdir: Path, rounds: int, repeat: int, threads: int | None = None) -> dict:
    board = load_board("host")
    out = workdir / name
    src, shapes = source(name, workdir)
    t = time.perf_counter()
    compile_model(src, board, out, shapes)
    compile_s = time.perf_counter() - t
    art = open_artifact(out)
    x = random_inputs(art.inputs, seed=0)
    runner = Runner(art)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or board.cores
    sess = ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    ref = sess.run(None, x)
    got = runner.run(x)
    diff = max(float(np.abs(g - r).max()) for g, r in zip(got.values(), ref))

    tvm_s, ort_s = [], []
    for _ in range(rounds):
        tvm_s += runner.time(x, repeat=repeat).seconds
        for _ in range(repeat):
            t = time.perf_counter()
            sess.run(None, x)
            ort_s.append(time.perf_counter() - t)
    tvm_ms, ort_ms = statistics.median(tvm_s) * 1e3, statistics.median(ort_s) * 1e3
    kernels = kernel_times(runner.vm, runner.entry, runner.args(x), runs=repeat)
    total = sum(k.seconds for k in kernels)
    top = ", ".join(f"{k.kernel} {100 * k.seconds / total:.0f}%" for k in kernels[:3])
    return {"model": name, "compile_s": compile_s, "edgetvm_ms": tvm_ms, "ort_ms": ort_ms,
            "ratio": tvm_ms / ort_ms, "max_diff": diff, "top_kernels": top}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(list(zoo.MODELS) + LIGHT),
                   help="zoo models and light_<name> networks, comma-separated (default: the whole zoo and the "
                        "light networks under 10 MiB)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="threads for both engines (default: every core)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # measure this model here and print its row as JSON
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be at least 1")
        # read by TVM's thread pool when it first starts, which no import above has done yet
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    if args.one:
        model_threads()   # TVM's pool as `edgetvm run` sets it up (a TVM_NUM_THREADS set above wins)
        with tempfile.TemporaryDirectory(prefix="bench-") as d:
            print(json.dumps(measure(args.one, Path(d), args.rounds, args.repeat, args.threads)))
        return 0
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in zoo.MODELS and not n.startswith("light_")]
    if unknown:
        p.error(f"unknown model {unknown[0]!r}: choose from {', '.join(zoo.MODELS)} or light_<name>")
    names = [n for n in names if n.startswith("light_") or zoo.available(n)]
    print(f"edgetvm (untuned TVM {__import__('tvm').__version__}) vs onnxruntime {ort.__version__} on "
          f"{os.cpu_count()} cores, {args.threads or 'all'} threads each, {args.rounds} rounds x {args.repeat} calls "
          "each, alternating", flush=True)
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--rounds", str(args.rounds), "--repeat", str(args.repeat)]
        done = subprocess.run(cmd + (["--threads", str(args.threads)] if args.threads else []),
                              stdout=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            print(f"compile_vs_ort: measuring {name} failed (exit {done.returncode}; its error is above)", file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {name}: done", file=sys.stderr, flush=True)
    header = f"{'model':<20} {'edgetvm ms':>10} {'ort ms':>9} {'edgetvm/ort':>11} {'max |diff|':>10} {'compile s':>9}"
    print(header)
    for r in rows:
        print(f"{r['model']:<20} {r['edgetvm_ms']:>10.3f} {r['ort_ms']:>9.3f} {r['ratio']:>10.2f}x "
              f"{r['max_diff']:>10.1e} {r['compile_s']:>9.1f}")
    print("where edgetvm's time goes (share of its kernels' time, `edgetvm run --profile` prints all):")
    for r in rows:
        print(f"  {r['model']:<20} {r['top_kernels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
