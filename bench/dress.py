"""DRESS: nested row-sparse subnets of one backbone against a dense model and independently pruned ones.

    python bench/dress.py                                        # LeNet5 / MNIST-5k, levels 0,0.5,0.7,0.9
    python bench/dress.py --train-limit 512 --fp32-epochs 1 --epochs 1 --repeat 20     # a quick look

For each network: train the dense model (checkpointed in --workdir, reused), then all subnets jointly
(edgetvm/sparse/train.py) and, for each level, an independently pruned (same row-balanced masks, by
magnitude) and retrained network with as many epochs as the joint training, and a slimmable-width network
(edgetvm/sparse/slimmable.py: one store, width k the first channels of every hidden layer) trained
jointly over K widths from the same dense network with the same weighted loss and epochs, each width
sized so its MACs match DRESS subnet k's as closely as integer channel counts allow. Everything is compiled for
the host: the DRESS model into one artifact (sparse kernels, one store, a `subnet` input), the dense
network with the default pipeline, each pruned network into its own one-subnet sparse artifact, and each
slimmable width as a narrower dense network with the default pipeline.
Per subnet it reports
  accuracy        test accuracy of the subnet, and of the independently pruned network at that sparsity
  nonzeros        of the sparse weights (the first layer stays dense, see sparse/train.py)
  weight bytes    the prefix of the store the subnet reads (+ the dense weights)
  latency ratio   median batch-1 latency over the dense build's, both default schedules, measured
                  alternately in this run (this machine is shared and loaded: figures are noisy)
  peak MiB        the resident set a fresh process adds to run the artifact once on that subnet
and per slimmable width: its channels, MACs against the DRESS subnet's, accuracy, and latency ratio (the
narrow dense build over the full dense build, timed in the same alternation);
then storage (one store against K separately stored pruned models), the switching cost, and a budget
trace replayed on an emulated device (--device, default phone-hi; runtime/dress_device.py: the CPU quota
of its cgroup follows the trace's CPU shares, its memory limit the memory budgets) for DRESS, a single
dense model and K separately stored pruned models that must be loaded when the choice changes (only one
fits the memory budget at a time). DRESS runs it three times, line by line in turn on three devices: with
the per-call prediction and the prefetch at budget changes, corrected by its calls' own times (the
default), the same without that correction ("no adapt"), and as before (the calibration scaled by
1 / share, no prefetch). Every call's record goes to --workdir/trace-records-DEVICE.json. The prefetch
assumes each budget change is announced before the next inference; its time is reported apart from the
calls.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from edgetvm import data, train  # noqa: E402
from edgetvm.compiler import compile_model  # noqa: E402
from edgetvm.quant.cli import limited, pretrained  # noqa: E402
from edgetvm.runtime import subnets as rt  # noqa: E402
from edgetvm.runtime.artifact import open_artifact  # noqa: E402
from edgetvm.runtime.dress_device import DeviceWorker, replay_alternately, summarize  # noqa: E402
from edgetvm.runtime.session import Runner  # noqa: E402
from edgetvm.sparse import masks  # noqa: E402
from edgetvm.sparse import slimmable as sl  # noqa: E402
from edgetvm.sparse import train as st  # noqa: E402
from edgetvm.sparse.cli import parse_levels, write_onnx  # noqa: E402
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
x = {i.name: np.zeros(i.shape, i.dtype) for i in art.inputs}
if "subnet" in x:
    x["subnet"][:] = int(sys.argv[2])
r.run(x)
print(hwm() - base)
"""


def peak_bytes(artifact: Path, level: int = 0) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK, str(artifact), str(level)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


def median_ms(runner: Runner, inputs: dict, repeat: int) -> float:
    return runner.time(inputs, repeat=repeat).median_ms


def bench_model(name: str, args) -> dict:
    ds_name, make = SETUPS[name]
    limit = None if args.train_limit == "all" else int(args.train_limit)
    ds = limited(data.load(ds_name, seed=args.seed), limit)
    model = make(n_classes=ds.n_classes, input_shape=ds.image_shape)
    work = Path(args.workdir)
    levels = parse_levels(args.levels)
    progress = not args.quiet
    t = time.perf_counter()
    fp32 = pretrained(model, ds, args.fp32_epochs, args.seed, work, progress)
    dense_acc = train.evaluate(fp32, ds.test)["accuracy"]
    sub = st.joint_train(model, ds, levels, fp32.params, args.epochs, lr=args.lr, seed=args.seed, progress=progress)
    joint_s = time.perf_counter() - t
    independent = [st.pruned_retrained(model, ds, s, fp32.params, args.epochs, lr=args.lr, seed=args.seed,
                                       progress=progress) for s in levels]
    dress_macs = sl.dress_macs(model, levels)
    widths = sl.match_widths(model, dress_macs)
    slim = sl.joint_train(model, ds, widths, fp32.params, args.epochs, lr=args.lr, seed=args.seed, progress=progress)
    board = load_board("host")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_onnx(model, sub, tmp / "dress.onnx")
        onnx.save(train.to_onnx(model, fp32.params, batch=1), tmp / "dense.onnx")
        dress_art = compile_model(tmp / "dress.onnx", board, tmp / "dress").path
        dense_art = compile_model(tmp / "dense.onnx", board, tmp / "dense").path
        pruned_arts = []
        for k, (s, (params, acc)) in enumerate(zip(levels, independent)):
            one = st.Subnets((s,), params, {n: masks.ranking(n, params[n]) for n in st.sparse_weights(model)}, [acc])
            write_onnx(model, one, tmp / f"pruned{k}.onnx")
            pruned_arts.append(compile_model(tmp / f"pruned{k}.onnx", board, tmp / f"pruned{k}").path)
        slim_runners = []
        for k in range(len(widths)):
            onnx.save(train.to_onnx(slim.model(model, k), slim.width_params(model, k), batch=1), tmp / f"slim{k}.onnx")
            slim_art = compile_model(tmp / f"slim{k}.onnx", board, tmp / f"slim{k}").path
            slim_runners.append(Runner(open_artifact(slim_art)))

        x = {"x": ds.test.x[:1]}
        sr = rt.SubnetRunner(open_artifact(dress_art))
        dense = Runner(open_artifact(dense_art))
        dense_ms, sub_ms, slim_ms = [], [[] for _ in levels], [[] for _ in levels]
        for _ in range(args.rounds_timing):     # alternate, so that load changes hit all alike
            dense_ms.append(median_ms(dense, x, args.repeat))
            for k in range(len(levels)):
                sub_ms[k].append(median_ms(sr.runner, {**x, "subnet": np.array([k], np.int32)}, args.repeat))
                slim_ms[k].append(median_ms(slim_runners[k], x, args.repeat))
        d_ms = statistics.median(dense_ms)
        dress_table = sr.dress
        rows = []
        for k, s in enumerate(levels):
            info = dress_table["subnets"][k]
            rows.append({"sparsity": s, "accuracy": sub.accuracy[k], "independent_accuracy": independent[k][1],
                         "macs": dress_macs[k],
                         "nonzeros": info["nonzeros"], "weight_bytes": info["weight_bytes"],
                         "latency_ms": statistics.median(sub_ms[k]),
                         "latency_ratio": statistics.median(sub_ms[k]) / d_ms,
                         "peak_bytes": peak_bytes(dress_art, k)})
        slim_rows = [{"width": list(widths[k]), "macs": slim.macs[k], "dress_macs": dress_macs[k],
                      "accuracy": slim.accuracy[k], "latency_ms": statistics.median(slim_ms[k]),
                      "latency_ratio": statistics.median(slim_ms[k]) / d_ms} for k in range(len(levels))]
        separate = sum(open_artifact(a).manifest["weight_bytes"] for a in pruned_arts)
        one_store = open_artifact(dress_art).manifest["weight_bytes"]

        sr.calibrate(x)
        switch = rt.switch_cost(sr, x)
        dense_weight_bytes = open_artifact(dense_art).manifest["weight_bytes"]
        # The trace runs on the emulated device: this process lets go of every artifact it mapped, or the
        # device would find those weight pages in memory already (charged here, not to it).
        del sr, dense, slim_runners
        gc.collect()
        dense_peak = peak_bytes(dense_art)
        trace = device_trace(dress_art, dense_art, pruned_arts, [a for _, a in independent], sub.accuracy, dense_acc,
                             x, args)
    return {"model": name, "data": ds.name, "train_images": len(ds.train), "dense_accuracy": dense_acc,
            "dense_latency_ms": d_ms, "dense_peak_bytes": dense_peak, "training_seconds": joint_s,
            "subnets": rows, "slimmable": slim_rows, "dense_macs": sl.macs(model),
            "slimmable_training_seconds": sum(h["seconds"] for h in slim.history),
            "full_width": list(sl.full_width(model)),
            "one_store_bytes": one_store, "separate_bytes": separate, "dense_weight_bytes": dense_weight_bytes,
            "switch": switch, "trace": trace}


def device_trace(dress_art, dense_art, pruned_arts, pruned_acc, dress_acc, dense_acc, x, args) -> dict:
    """The budget trace on emulated device --device (runtime/dress_device.py: its CPU quota follows the
    trace's CPU shares, its memory limit the memory budgets), for DRESS, the single dense model and the K
    separately stored pruned models (chosen by DRESS's rule and calibration; loaded when the choice
    changes, the load counted in that inference's time). Each method in a fresh device and worker."""
    # DRESS as the runtime now chooses (per call: the CFS quota left, resident pages, a prefetch at each budget
    # change) and as before (the calibration scaled by 1 / share, no prefetch), line by line in turn on two
    # devices: the same trace, the same load and the same calibrated latencies; a third runs the per-call rule
    # without its correction from the calls' own times (adapt=False). The others read their own copies of the
    # artifact, so that none finds another's weight pages in the page cache (charged to that one's cgroup).
    copies = []
    for name in ("mean", "static"):
        copies.append(Path(tempfile.mkdtemp(prefix=f"dress-{name}-", dir=Path(dress_art).parent)) / "art")
        shutil.copytree(dress_art, copies[-1])
    with DeviceWorker(args.device, "dress", [dress_art], x) as dev, \
            DeviceWorker(args.device, "dress", [copies[0]], x, policy="mean") as before, \
            DeviceWorker(args.device, "dress", [copies[1]], x, adapt=False) as static:
        cal = dev.calibrate()
        before_cal = before.calibrate()
        static.calibrate()
        before.use_latencies(cal["predicted_ms"])   # one calibration: both rules agree on what the trace allows
        trace = make_trace(cal["predicted_ms"], cal["memory_bytes"], args.trace_length, args.seed)
        dress_run, mean_run, static_run = replay_alternately([dev, before, static], trace)
    with DeviceWorker(args.device, "dense", [dense_art], x) as dev:
        dense_cal = dev.calibrate()
        dense_run = dev.replay(trace)
    plan = {k: cal[k] for k in ("subnets", "predicted_ms", "cold_ms", "warmup_ms", "after_ms", "memory_bytes",
                                   "file_bytes")}
    # without the correction: with it the choice changed more often, and one run's worker, loading a model
    # under a tight limit, was killed by it (each load leaves the worker more anonymous memory)
    with DeviceWorker(args.device, "separate", pruned_arts, x, plan=plan, adapt=False) as dev:
        sep_cal = dev.calibrate()
        sep_run = dev.replay(trace)
    # every call's record (choice, prediction, quota left, time, pages read back) for a look at the misses
    rec_path = Path(args.workdir) / f"trace-records-{args.device}.json"
    tmp = rec_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"trace": [b.__dict__ for b in trace],
                               **{k: r["records"] for k, r in (("dress", dress_run), ("dress_mean", mean_run),
                                                                ("dress_static", static_run),
                                                                ("dense", dense_run), ("separate", sep_run))}}))
    tmp.replace(rec_path)
    sep = summarize(sep_run, pruned_acc)
    sep["load_anon_bytes"] = sep_cal["load_anon_bytes"]
    loads = [r["ms"] for r in sep_run["records"] if r["loaded"]]
    sep["load_ms_median"] = statistics.median(loads) if loads else 0.0
    return {"device": args.device, "records": str(rec_path),
            "calibration": {"dress": cal, "dense": dense_cal, "dress_mean": before_cal},
            "dress": summarize(dress_run, dress_acc), "dress_mean": summarize(mean_run, dress_acc),
            "dress_static": summarize(static_run, dress_acc),
            "dense": summarize(dense_run, [dense_acc]), "separate": sep}



SHARES = (1.0, 0.5, 0.25)


def make_trace(pred_ms, memory_bytes, n: int, seed: int) -> list:
    """A budget that changes every few inferences: each phase has a CPU share of the device's quota (1,
    1/2 or 1/4) and allows one subnet at it (1.5x its calibrated latency scaled by 1 / share, its measured
    memory plus 20%: the kernel's reclaim under a limit is not an exact working set), in a seeded random
    order; one phase in eight is below every subnet (nothing fits:
    half the fastest scaled latency, half the smallest memory)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        k = int(rng.integers(len(pred_ms)))
        share = SHARES[int(rng.integers(len(SHARES)))]
        if rng.random() < 1 / 8:
            b = rt.Budget(0.5 * min(pred_ms) / share, min(memory_bytes) // 2, share)
        else:
            b = rt.Budget(1.5 * pred_ms[k] / share, int(memory_bytes[k] * 1.2), share)
        out += [b] * int(rng.integers(3, 8))
    return out[:n]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="lenet5")
    p.add_argument("--levels", default="0,0.5,0.7,0.9")
    p.add_argument("--fp32-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=5, help="joint epochs; each independent network gets as many")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--train-limit", default="all", help="training images per data set ('all' or a number)")
    p.add_argument("--repeat", type=int, default=100, help="timed batch-1 calls per round")
    p.add_argument("--rounds-timing", type=int, default=3)
    p.add_argument("--trace-length", type=int, default=200)
    p.add_argument("--device", default="phone-hi", help="emulated device (targets/devices) the budget trace runs on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "edgetvm" / "bench-dress"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    results = []
    for name in args.models.split(","):
        r = bench_model(name, args)
        results.append(r)
        print(f"\n{r['model']} on {r['data']} ({r['train_images']} training images): dense {100 * r['dense_accuracy']:.2f}%, "
              f"{r['dense_latency_ms']:.3f} ms, peak {r['dense_peak_bytes'] / 2**20:.1f} MiB")
        print(f"  {'sparsity':>8} {'DRESS %':>8} {'pruned %':>8} {'nonzeros':>9} {'weight KiB':>10} {'ms':>7} "
              f"{'x dense':>7} {'peak MiB':>8}")
        for s in r["subnets"]:
            print(f"  {s['sparsity']:>8.0%} {100 * s['accuracy']:>8.2f} {100 * s['independent_accuracy']:>8.2f} "
                  f"{s['nonzeros']:>9,} {s['weight_bytes'] / 1024:>10.1f} {s['latency_ms']:>7.3f} "
                  f"{s['latency_ratio']:>7.2f} {s['peak_bytes'] / 2**20:>8.1f}")
        print(f"  slimmable, same MACs (one store; width = channels of each hidden layer, of "
              f"{'/'.join(map(str, r['full_width']))}; dense {r['dense_macs']:,} MACs):")
        print(f"  {'sparsity':>8} {'DRESS MACs':>10} {'width':>12} {'slim MACs':>10} {'MAC diff':>8} {'slim %':>7} "
              f"{'DRESS %':>7} {'ms':>7} {'x dense':>7}")
        for s, w in zip(r["subnets"], r["slimmable"]):
            print(f"  {s['sparsity']:>8.0%} {w['dress_macs']:>10,} {'/'.join(map(str, w['width'])):>12} "
                  f"{w['macs']:>10,} {(w['macs'] - w['dress_macs']) / w['dress_macs']:>+8.2%} "
                  f"{100 * w['accuracy']:>7.2f} {100 * s['accuracy']:>7.2f} {w['latency_ms']:>7.3f} "
                  f"{w['latency_ratio']:>7.2f}")
        print(f"  storage: one store {r['one_store_bytes']:,} bytes vs {r['separate_bytes']:,} for "
              f"{len(r['subnets'])} separate pruned models")
        sw = r["switch"]
        print(f"  switching: {1e3 * sw['switch_ms']:.2f} us, weights shared: {sw['weights_shared']}; first call after "
              f"a switch {sw['first_call_extra_ms']:+.3f} ms vs a repeated call")
        t = r["trace"]
        cal = t["calibration"]["dress"]
        print(f"  budget trace of {t['dress']['inferences']} on emulated device {t['device']} (CPU shares "
              f"{'/'.join(f'{x:g}' for x in SHARES)} of its quota, memory limit = budget): subnets at the full quota "
              + ", ".join(f"{ms:.3f} ms / {m / 2**20:.2f} MiB" for ms, m in zip(cal["predicted_ms"], cal["memory_bytes"]))
              + f"; dense {t['calibration']['dense']['predicted_ms'][0]:.3f} ms / "
              f"{t['calibration']['dense']['memory_bytes'][0] / 2**20:.2f} MiB")
        for name, label in (("dress", "DRESS"), ("dress_static", "DRESS, no adapt"), ("dress_mean", "DRESS as before"),
                            ("dense", "dense"),
                            ("separate", "separate pruned")):
            u = t[name]
            extra = (f", {u['loads']} loads (median {u['load_ms_median']:.1f} ms; a load holds "
                     f"{u['load_anon_bytes'] / 2**20:.2f} MiB more, added to every limit)" if name == "separate" else "")
            misses = (f"misses {u['misses']} (it runs whatever the budget; over the memory budget counts too)"
                      if name == "dense" else f"misses {u['misses_where_fitting']} where a subnet fit (of them "
                      f"{u['misses_where_fitting_paging']} reading weights back from the file) + "
                      f"{u['misses'] - u['misses_where_fitting']} where none did ({u['no_fit']} inferences)")
            misses += f", {u['inferences_paging']} inferences read weight pages back"
            if name == "dress":
                misses += (f"; {u['no_fit_where_mean_fit']} calls fitted no subnet only at that call (quota of the "
                           f"period spent, or pages evicted) where 1 / share scaling had one; prefetch at budget "
                           f"changes: {u['prefetch_pages']} pages in {u['prefetched_lines']} lines, "
                           f"{u['prefetch_ms']:.1f} ms in all, outside the calls (assumes each change is announced "
                           f"before the next inference)")
            print(f"    {label:>15}: accuracy {100 * u['accuracy']:.2f}%, {misses}, "
                  f"{u['memory_over_budget']} over the memory budget ({u['limit_raised']} lines' limits raised to the "
                  f"runner's own memory), throttled in {u['throttled_periods']} periods"
                  + extra)
            print(f"    {'':>15}  mean ms measured / predicted per share: " + ", ".join(
                f"{s_}: {c['measured_mean_ms']:.3f} / {c['predicted_mean_ms']:.3f}" for s_, c in u["per_share"].items()))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
