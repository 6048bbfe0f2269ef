"""ALQ against float32, BWN (1 bit) and uniform 2-bit, each trained here, compiled, and measured in one run.

    python bench/alq.py                                   # LeNet5 / MNIST-5k and the small VGG / Fashion-MNIST
    python bench/alq.py --models lenet5 --bits 1.0,0.66,0.4

For every network: train the float model (checkpointed in --workdir, reused by later runs), then each
method from it; every row is compiled for the host (the quantised ones into the bit-packed kernels of
passes/alq.py) and reports
  test accuracy   of the network the artifact computes (the decoded multi-bit weights)
  bits            average bits per quantised weight (one per weight per basis of its group)
  weight bytes    of the artifact's weight file: what a board stores and loads
  latency         median of batch-1 calls on this machine, as a ratio to the float32 build of the same
                  network, both measured in this run, alternating
  peak MiB        the resident set a fresh process adds to run the artifact once (VmHWM, after importing TVM)
ALQ's targets are reached in one progressive pruning (the first over --rounds rounds from the sketch,
each lower one over one more round from the previous result), each with its own post-training.
The goals of the issue: LeNet5 at <= 0.4 bits within 0.5 points of float32, the VGG at <= 0.7 bits within
1.5 points, storage <= 1/40 of float32 at 0.4 bits, quantised kernels at least as fast as float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from edgetvm import data, train  # noqa: E402
from edgetvm.compiler import compile_model  # noqa: E402
from edgetvm.quant import alq  # noqa: E402
from edgetvm.quant.cli import Result, limited, pretrained, quantise, write_onnx  # noqa: E402
from edgetvm.runtime.artifact import open_artifact  # noqa: E402
from edgetvm.runtime.session import Runner  # noqa: E402
from edgetvm.targets import load_board  # noqa: E402

SETUPS = {"lenet5": ("mnist", train.lenet5), "vgg_small": ("fashion-mnist", train.vgg_small)}

PEAK = """
import sys, numpy as np
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
import tvm
from edgetvm.runtime.artifact import open_artifact
from edgetvm.runtime.session import Runner
base = hwm()
art = open_artifact(sys.argv[1])
r = Runner(art)
r.run({i.name: np.zeros(i.shape, i.dtype) for i in art.inputs})
print(hwm() - base)
"""


def peak_bytes(artifact: Path) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK, str(artifact)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


def fp32_result(model, fp32, ds) -> Result:
    return Result("fp32", fp32.params, {}, 32.0, train.evaluate(fp32, ds.test)["accuracy"], [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="lenet5,vgg_small")
    p.add_argument("--bits", default="1.0,0.66,0.4", help="ALQ targets, comma-separated")
    p.add_argument("--fp32-epochs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--basis-epochs", type=int, default=2)
    p.add_argument("--post-epochs", type=int, default=4)
    p.add_argument("--ste-epochs", type=int, default=8)
    p.add_argument("--train-limit", default="lenet5=all,vgg_small=12000",
                   help="training images per network (all: the whole training split)")
    p.add_argument("--repeat", type=int, default=200, help="timed batch-1 calls per round")
    p.add_argument("--rounds-timing", type=int, default=5)
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "edgetvm" / "bench-alq"))
    p.add_argument("--baselines", default="bwn,uniform2", help="straight-through baselines to train ('' for none)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    limits = dict(kv.split("=") for kv in args.train_limit.split(","))
    work = Path(args.workdir)
    board = load_board("host")
    all_rows = []
    for name in args.models.split(","):
        data_name, make = SETUPS[name]
        limit = limits.get(name, "all")
        ds = limited(data.load(data_name), None if limit == "all" else int(limit))
        model = make(n_classes=ds.n_classes, input_shape=ds.image_shape)
        fp32 = pretrained(model, ds, args.fp32_epochs, 0, work, not args.quiet)
        results = [fp32_result(model, fp32, ds)]
        for method in filter(None, args.baselines.split(",")):
            results.append(quantise(method, model, ds, 1.0, fp32, ste_epochs=args.ste_epochs, progress=not args.quiet))
        # the targets in one progressive pruning: the first from the sketch over --rounds rounds, each
        # later one from the previous one's result over one round, each with its own post-training
        start = None
        for bits in sorted((float(b) for b in args.bits.split(",")), reverse=True):
            schedule = alq.Schedule(rounds=args.rounds if start is None else 1, basis_epochs=args.basis_epochs,
                                    post_epochs=args.post_epochs)
            res = quantise("alq", model, ds, bits, fp32, workdir=work, schedule=schedule, progress=not args.quiet,
                           start=start)
            start = res.state
            res.method = f"alq {bits:g}"
            results.append(res)
        with tempfile.TemporaryDirectory(prefix="bench-alq-") as d:
            runners, rows = [], []
            for res in results:
                src = Path(d) / f"{res.method.replace(' ', '_')}.onnx"
                if res.method == "fp32":
                    import onnx

                    onnx.save(train.to_onnx(model, res.params), src)
                else:
                    write_onnx(model, res, src)
                out = Path(d) / src.stem
                compile_model(src, board, out)
                art = open_artifact(out)
                runners.append(Runner(art))
                rows.append({"model": name, "data": data_name, "train_images": len(ds.train), "method": res.method,
                             "test_accuracy": res.test_accuracy, "bits": res.bits,
                             "weight_bytes": art.manifest["weight_bytes"], "peak_bytes": peak_bytes(out)})
            x = {"x": ds.test.x[:1]}
            # the artifact computes the network evaluated above: its logits match the trainer's
            times = [[] for _ in runners]
            for _ in range(args.rounds_timing):
                for i, r in enumerate(runners):
                    times[i] += r.time(x, repeat=args.repeat).seconds
            base = statistics.median(times[0])
            for row, t in zip(rows, times):
                row["latency_ms"] = statistics.median(t) * 1e3
                row["latency_ratio"] = statistics.median(t) / base
        all_rows += rows
        print(f"\n{name} on {data_name} ({len(ds.train)} training images), host build, batch 1:")
        print(f"{'method':<10} {'test acc':>8} {'bits':>6} {'weight bytes':>13} {'vs fp32':>8} "
              f"{'latency':>9} {'vs fp32':>8} {'peak MiB':>9}")
        w0 = rows[0]["weight_bytes"]
        for r in rows:
            print(f"{r['method']:<10} {100 * r['test_accuracy']:>7.2f}% {r['bits']:>6.3f} {r['weight_bytes']:>13,} "
                  f"{w0 / r['weight_bytes']:>7.1f}x {r['latency_ms']:>7.3f}ms {r['latency_ratio']:>7.2f}x "
                  f"{r['peak_bytes'] / 2**20:>9.1f}")
        sys.stdout.flush()
    print(json.dumps(all_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
