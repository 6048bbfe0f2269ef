"""The `edgetvm` command line. Bad input ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from edgetvm.errors import UserError


UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1000, "KIB": 1 << 10, "M": 1 << 20, "MB": 10**6, "MIB": 1 << 20,
         "G": 1 << 30, "GB": 10**9, "GIB": 1 << 30}


def parse_bytes(text: str, flag: str) -> int:
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS or float(m.group(1)) <= 0:
        raise UserError(f"{flag} '{text}' is not a size; write it like {flag} 64MiB (units: B, KiB, MiB, GiB, KB, MB, GB)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 like every other bad input."""

    def error(self, message):
        print(f"edgetvm: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split(","))
        if not sep or not name or any(d < 0 for d in shape):  # 0 is a valid (empty) dimension
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME:D1,D2,...; write it like data:1,3,224,224") from None
    return name, shape


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_targets(args) -> None:
    from edgetvm.targets import list_boards

    rows = [[b.name, b.arch, str(b.cores), f"{b.memory_mib} MiB", f"{b.peak_gflops:.0f}",
             f"{b.mem_bandwidth_gbs:g}", b.description] for b in list_boards()]
    _print_table(rows, ["board", "arch", "cores", "memory", "GFLOP/s", "GB/s", "description"])


def cmd_compile(args) -> None:
    from edgetvm.compiler import compile_model
    from edgetvm.targets import load_board

    board = load_board(args.target)
    shapes = dict(args.input_shape or [])
    db = None
    if args.tuning_db:
        from edgetvm.tuning import open_database

        db = open_database(args.tuning_db, board, args.model, shapes)
    budget = parse_bytes(args.memory_budget, "--memory-budget") if args.memory_budget else None
    res = compile_model(args.model, board, args.output, shapes, tuning_db=db, memory_budget=budget)
    m = res.manifest
    print(f"compiled {Path(args.model).name} for {board.name} ({m['board']['arch']}) in "
          f"{res.seconds['total']:.1f} s -> {res.path}")
    for kind in ("inputs", "outputs"):
        for t in m[kind]:
            print(f"  {kind[:-1]:6s} {t['name']}: {t['dtype']}[{','.join(map(str, t['shape']))}]")
    print(f"  weights {len(m['weights'])} tensors, {m['weight_bytes'] / 2**20:.2f} MiB")
    r = m["roofline"]
    print(f"  {r['kernels']} kernels, {r['flops'] / 1e9:.3f} GFLOP, {r['bytes'] / 2**20:.1f} MiB moved: "
          f"at least {r['bound_ms']:.3f} ms on {board.name} (roofline over its nominal figures)")
    if "swap" in m:
        sw = m["swap"]
        print(f"  swapping: {len(sw['blocks'])} blocks under a {sw['budget'] / 2**20:.1f} MiB budget, planned peak "
              f"{sw['predicted_peak'] / 2**20:.1f} MiB ({'prefetching the next block' if sw['prefetch'] else 'no prefetch'})")


def _load_inputs(specs: list[str], infos) -> dict:
    from edgetvm.runtime.tensors import load_npy

    inputs = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            if len(infos) != 1:
                raise UserError(f"--input {spec}: name the input, like --input {infos[0].name}=x.npy "
                                f"(inputs: {', '.join(i.name for i in infos)})")
            name, path = infos[0].name, spec
        if name in inputs:
            raise UserError(f"--input {spec}: input '{name}' is given twice; pass each input once")
        try:
            inputs[name] = load_npy(path)
        except UserError as e:
            raise UserError(f"--input {spec}: {e}") from None
    return inputs


def cmd_run(args) -> None:
    import numpy as np

    from edgetvm.compiler import random_inputs
    from edgetvm.runtime.artifact import open_artifact
    from edgetvm.runtime.session import Runner, connect, model_threads

    if args.repeat < 1:
        raise UserError(f"--repeat {args.repeat}: give a positive number of timed runs")
    from edgetvm.partition.split import is_split

    if args.profile and (args.rpc or args.tracker):
        raise UserError("--profile times kernels with the VM's instrument hook, which cannot cross RPC: run "
                        "`edgetvm run --profile` on the board itself (or `edgetvm partition` profiles a board's kernels)")
    if is_split(args.artifact):
        if args.profile:
            raise UserError("--profile applies to one artifact: give one of the split's parts, or use --report")
        from edgetvm.partition.cli import run_split

        return run_split(args)
    if args.link:
        raise UserError("--link applies to split artifacts (made by `edgetvm partition`)")
    art = open_artifact(args.artifact, keep_page_cache=args.keep_page_cache)
    if art.manifest.get("kind") == "llm":
        raise UserError(f"{args.artifact} is a compiled LLM: run it with `edgetvm generate --artifact {args.artifact}` "
                        f"or `edgetvm ppl --artifact {args.artifact}`")
    if args.budget_trace:
        if args.rpc or args.tracker:
            raise UserError("--budget-trace runs on this machine: run `edgetvm run` on the board itself")
        if args.profile:
            raise UserError("--profile and --budget-trace do not combine: profile one subnet without the trace")
        from edgetvm.runtime.subnets import cmd_budget_trace

        return cmd_budget_trace(art, args)
    if args.device:
        raise UserError("--device applies to --budget-trace (a DRESS trace replayed on an emulated device)")
    if args.output:
        out = Path(args.output)
        if not out.resolve().parent.is_dir() or not os.access(out.resolve().parent, os.W_OK):
            raise UserError(f"--output {out}: directory {out.resolve().parent} is missing or not writable; "
                            f"choose another path")
    if not (args.rpc or args.tracker):
        model_threads()
    inputs = _load_inputs(args.input, art.inputs)
    if not inputs:
        inputs = random_inputs(art.inputs, args.seed)
        print(f"no --input given: using random inputs (seed {args.seed})")
    remote = connect(args.rpc, args.tracker, args.key)
    where = args.rpc or (f"tracker {args.tracker} key {args.key}" if args.tracker else "this machine")
    if "swap" in art.manifest:
        if remote is not None:
            raise UserError("a swapping build runs where its weight file is: copy the artifact to the board and "
                            "run `edgetvm run` there (over RPC the weights would cross the network per block)")
        from edgetvm.runtime.swap import SwapRunner, reset_hwm

        if args.profile:
            raise UserError("--profile applies to in-memory builds; a swapping build's blocks are timed by --report")
        runner = SwapRunner(art, drop_cache=not args.keep_page_cache)
        reset_hwm()
    else:
        if args.keep_page_cache:
            raise UserError("--keep-page-cache only applies to swapping builds (compiled with --memory-budget)")
        runner = Runner(art, remote, weights=args.weights)
    outputs = runner.run(inputs)
    timing = runner.time(inputs, repeat=args.repeat)
    print(f"ran {art.path} ({art.board['name']}) on {where}")
    for name, y in outputs.items():
        flat = y.reshape(-1)
        preview = ", ".join(f"{v:.4g}" for v in flat[:4]) + (", ..." if flat.size > 4 else "")
        print(f"  output {name}: {y.dtype}[{','.join(map(str, y.shape))}] = [{preview}]")
    print(f"  latency over {args.repeat} runs: min {timing.min_ms:.3f} ms, median {timing.median_ms:.3f} ms, "
          f"max {timing.max_ms:.3f} ms")
    if args.profile:
        _profile(runner, inputs, args.repeat, timing.median_ms)
    if args.report:
        _report(art, remote, runner)
    if args.output:
        _save_outputs(args.output, outputs)


def _profile(runner, inputs, runs: int, whole_ms: float, top: int = 15) -> None:
    from edgetvm.costmodels.profile import kernel_times

    times = kernel_times(runner.vm, runner.entry, runner.args(inputs), runs)
    total = sum(t.seconds for t in times) * 1e3
    print(f"  kernels (wall time per run, median of {runs} runs): {len(times)} kernels sum to {total:.3f} ms "
          f"(whole run {whole_ms:.3f} ms)")
    print(f"    {'share':>6} {'ms':>9} {'calls':>5}  kernel")
    for t in times[:top]:
        print(f"    {100 * t.seconds * 1e3 / total if total else 0:5.1f}% {t.seconds * 1e3:9.3f} {t.calls:5d}  {t.kernel}")
    if len(times) > top:
        rest = sum(t.seconds for t in times[top:]) * 1e3
        print(f"    {100 * rest / total if total else 0:5.1f}% {rest:9.3f}        ({len(times) - top} more kernels)")


def _save_outputs(path, outputs: dict) -> None:
    """Outputs as an .npz, written beside it and renamed into place."""
    import numpy as np

    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.resolve().parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **outputs)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"  outputs written to {out}")


def _report(art, remote, runner) -> None:
    from edgetvm.runtime.swap import vm_hwm_bytes

    mib = 2**20
    if remote is not None:
        print("  memory report: measured peak is only available for runs on this machine")
        return
    sw = art.manifest.get("swap")
    if sw:
        print(f"  {'block':<10} {'weights MiB':>11} {'activations+scratch MiB':>24} {'planned MiB':>11}")
        for b in sw["blocks"]:
            print(f"  {b['function']:<10} {b['weight_bytes'] / mib:>11.2f} {b['act_bytes'] / mib:>24.2f} "
                  f"{b['planned_bytes'] / mib:>11.2f}")
        print(f"  budget {sw['budget'] / mib:.1f} MiB; predicted peak {sw['predicted_peak'] / mib:.1f} MiB "
              f"(model data, with the next block prefetched)")
        print(f"  weights: {runner.describe()}")
    else:
        print(f"  weights {art.manifest['weight_bytes'] / mib:.1f} MiB, all resident (not a swapping build)")
    print(f"  measured peak resident set (VmHWM) of this process: {vm_hwm_bytes() / mib:.1f} MiB "
          f"(runtime baseline included)")


def cmd_board_emulate(args) -> None:
    from edgetvm.runtime import emulated_board

    argv = ["--port", str(args.port)] if args.port else []
    if args.tracker or args.key:
        if not (args.tracker and args.key):
            raise UserError("give --tracker HOST:PORT and --key KEY together")
        argv += ["--tracker", args.tracker, "--key", args.key]
    if args.build_only:
        argv.append("--build-only")
    rc = emulated_board.main(argv)
    if rc:
        sys.exit(rc)


def cmd_zoo(args) -> None:
    from edgetvm import zoo

    if args.zoo_cmd == "list":
        _print_table([[n, d] for n, d in zoo.list_models()], ["model", "description"])
        return
    src = zoo.path(args.name)
    out = Path(args.output)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.resolve().parent)
    os.close(fd)
    import shutil

    shutil.copyfile(src, tmp)
    os.replace(tmp, out)
    shapes = zoo.default_input_shapes(args.name)
    print(f"wrote {out}; compile it with: edgetvm compile {out} --target host "
          + " ".join(f"--input-shape {k}:{','.join(map(str, v))}" for k, v in shapes.items()) + " -o OUT")


def cmd_demo(args) -> None:
    from edgetvm.demo import demo

    demo(args.model, args.board, keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgetvm", description="Compile, run and tune ONNX and TFLite models for edge boards "
                                "with Apache TVM.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("targets", help="list the boards edgetvm knows")
    s.set_defaults(func=cmd_targets)

    s = sub.add_parser("compile", help="compile an ONNX or TFLite model for a board")
    s.add_argument("model", help="the .onnx or .tflite file")
    s.add_argument("--target", "-t", default="host", help="board name (see `edgetvm targets`); default host")
    s.add_argument("--input-shape", action="append", type=_shape_arg, metavar="NAME:D1,D2,...",
                   help="static shape for an input with dynamic dims; repeat for several inputs")
    s.add_argument("--tuning-db", metavar="DB", help="apply schedules found by `edgetvm tune`")
    s.add_argument("--memory-budget", metavar="SIZE",
                   help="build for swapping: weights, activations and scratch stay under SIZE (e.g. 64MiB)")
    s.add_argument("-o", "--output", required=True, help="artifact directory to write")
    s.set_defaults(func=cmd_compile)

    from edgetvm.tuning import add_tune_parser

    add_tune_parser(sub)

    s = sub.add_parser("run", help="run a compiled model here or on a board over RPC")
    s.add_argument("artifact", help="directory written by `edgetvm compile`")
    s.add_argument("--input", "-i", action="append", metavar="NAME=FILE.npy",
                   help="input array; repeat for several inputs; random inputs if none")
    s.add_argument("--output", metavar="FILE.npz", help="write the outputs here")
    s.add_argument("--repeat", type=int, default=10, help="timed runs (default 10)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    s.add_argument("--rpc", metavar="HOST:PORT", help="run on the board serving TVM RPC here")
    s.add_argument("--tracker", metavar="HOST:PORT", help="run on a board registered with this RPC tracker")
    s.add_argument("--key", help="the board's key at the tracker")
    s.add_argument("--profile", action="store_true",
                   help="time every kernel (VM instrument hook, wall time) and print the slowest with their share")
    s.add_argument("--report", action="store_true",
                   help="print per-block bytes, the predicted peak and the measured peak (VmHWM)")
    s.add_argument("--weights", choices=["map", "copy"], default="map",
                   help="in-memory builds: map the weight file zero-copy (default) or read it into memory")
    s.add_argument("--keep-page-cache", action="store_true",
                   help="swapping builds: keep swapped-out weights in the OS page cache (faster when the "
                        "machine has memory to spare; a cgroup limit counts that cache)")
    s.add_argument("--link", metavar="LINK", help="split artifacts: the emulated link to run across "
                                                  "(targets/links; default: the bandwidth it was planned for)")
    s.add_argument("--budget-trace", metavar="TRACE", help="DRESS artifacts: per inference, run the most accurate "
                   "subnet that fits the trace's next time and memory budget (lines 'TIME_MS MEMORY_MIB "
                   "[CPU_SHARE] [xCOUNT]')")
    s.add_argument("--device", metavar="PROFILE", help="with --budget-trace: replay it on this emulated device "
                   "(targets/devices, e.g. phone-hi): its cgroup's CPU quota follows CPU_SHARE, its memory limit "
                   "MEMORY_MIB")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("board", help="emulated boards for testing")
    bsub = s.add_subparsers(dest="board_cmd", required=True, metavar="ACTION")
    b = bsub.add_parser("emulate", help="serve TVM RPC from an emulated aarch64 board (qemu-user, needs root)")
    b.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    b.add_argument("--tracker", metavar="HOST:PORT", help="register with this RPC tracker")
    b.add_argument("--key", help="key to register under (with --tracker)")
    b.add_argument("--build-only", action="store_true", help="build the cached root filesystem and exit")
    b.set_defaults(func=cmd_board_emulate)

    s = sub.add_parser("zoo", help="the models edgetvm tests and benchmarks with")
    zsub = s.add_subparsers(dest="zoo_cmd", required=True, metavar="ACTION")
    z = zsub.add_parser("list", help="list the models")
    z.set_defaults(func=cmd_zoo)
    z = zsub.add_parser("export", help="write a model as an .onnx file")
    z.add_argument("name")
    z.add_argument("-o", "--output", required=True)
    z.set_defaults(func=cmd_zoo)

    s = sub.add_parser("demo", help="compile a real model for the host and an aarch64 board, run both, compare")
    s.add_argument("--model", default="ocr_cls", help="zoo model (default ocr_cls, a pretrained MobileNetV3)")
    s.add_argument("--board", default="rpi4", help="aarch64 board to cross-compile for (default rpi4)")
    s.add_argument("--keep", metavar="DIR", help="keep the artifacts in DIR")
    s.set_defaults(func=cmd_demo)

    from edgetvm.latte.cli import add_latte_parser
    from edgetvm.llm.cli import add_llm_parsers

    from edgetvm.partition.cli import add_partition_parser
    from edgetvm.partition.cutedge.cli import add_cutedge_parser
    from edgetvm.partition.pipeline.cli import add_pipeline_parser
    from edgetvm.quant.cli import add_quantize_parser

    add_quantize_parser(sub)
    from edgetvm.sparse.cli import add_dress_parser
    add_dress_parser(sub)
    from edgetvm.update.cli import add_update_parser
    from edgetvm.adapt.cli import add_adapt_parser

    add_update_parser(sub)
    add_adapt_parser(sub)

    add_partition_parser(sub)
    add_cutedge_parser(sub)
    add_pipeline_parser(sub)
    from edgetvm.pipetrain.cli import add_pipetrain_parser

    add_pipetrain_parser(sub)
    add_llm_parsers(sub)
    add_latte_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from edgetvm.runtime import signals
    from edgetvm.runtime.leftovers import owning_children

    args = build_parser().parse_args(argv)
    try:
        # SIGTERM unwinds like Ctrl-C, so the boards, cgroups and workers a command made are removed;
        # what it starts is marked as its own, for runtime/leftovers.py.
        with signals.sigterm_raises(), owning_children():
            args.func(args)
    except UserError as e:
        print(f"edgetvm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"edgetvm: {'terminated' if isinstance(e, signals.Terminated) else 'interrupted'}", file=sys.stderr)
        return signals.exit_code(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
