"""`edgetvm demo`: a real pretrained model compiled for this machine and for an aarch64 board, both run, compared."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError


def _ort(path, inputs, repeat):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, inputs)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        sess.run(None, inputs)
        times.append(time.perf_counter() - t)
    return out, float(np.median(times)) * 1e3


def _max_diff(a: dict, ref: list) -> float:
    return max(float(np.abs(x - r).max()) for x, r in zip(a.values(), ref))


def demo(model: str = "ocr_cls", board_name: str = "rpi4", keep: str | None = None, repeat: int = 20) -> None:
    from edgetvm import zoo
    from edgetvm.compiler import compile_model, random_inputs
    from edgetvm.runtime import emulated_board
    from edgetvm.runtime.artifact import open_artifact
    from edgetvm.runtime.session import Runner, connect, model_threads

    model_threads()
    from edgetvm.targets import load_board

    board = load_board(board_name)
    if board.arch != "aarch64":
        raise UserError(f"the demo runs the board build on an emulated aarch64 board, and {board_name} is "
                        f"{board.arch}; pick an aarch64 board such as rpi4, rpi3 or jetson-nano-cpu")
    if model not in dict(zoo.list_models()):
        raise UserError(f"unknown zoo model '{model}'; see `edgetvm zoo list`")
    src, shapes = zoo.path(model), zoo.default_input_shapes(model)
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="edgetvm-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"model {model}: {src}")

    print("[1/4] compiling for this machine (host)")
    compile_model(src, load_board("host"), work / "host", shapes)
    print(f"[2/4] cross-compiling for {board.name}: {board.description}")
    compile_model(src, board, work / board.name, shapes)

    host_art, board_art = open_artifact(work / "host"), open_artifact(work / board.name)
    inputs = random_inputs(host_art.inputs, seed=0)
    ref, ort_ms = _ort(src, inputs, repeat)

    print("[3/4] running on this machine")
    runner = Runner(host_art)
    host_out = runner.run(inputs)
    host_ms = runner.time(inputs, repeat).median_ms

    rows = [["onnxruntime", "this machine", f"{ort_ms:.3f}", "-", "-"],
            ["edgetvm host", "this machine", f"{host_ms:.3f}", f"{_max_diff(host_out, ref):.2e}", "-"]]
    reason = emulated_board.board_unavailable_reason()
    if reason:
        print(f"[4/4] skipping the {board.name} run: the emulated board cannot run here ({reason})")
    else:
        print(f"[4/4] running the {board.name} build on an emulated aarch64 board over TVM RPC "
              f"(the first run builds its root file system, ~10 minutes, cached afterwards)")
        with emulated_board.EmulatedBoard() as b:
            remote = connect(f"{b.host}:{b.port}")
            brun = Runner(board_art, remote)
            board_out = brun.run(inputs)
            board_ms = brun.time(inputs, max(3, repeat // 4)).median_ms
        rows.append([f"edgetvm {board.name}", f"emulated aarch64 (qemu) {b.host}:{b.port}", f"{board_ms:.3f}",
                     f"{_max_diff(board_out, ref):.2e}", f"{_max_diff(board_out, list(host_out.values())):.2e}"])

    header = ["build", "ran on", "median ms", "max |diff| vs onnxruntime", "max |diff| vs host build"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print()
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\nedgetvm host / onnxruntime latency: {host_ms / ort_ms:.2f}x (untuned schedules; "
          f"`edgetvm tune` closes the gap)")
    if not reason:
        print("emulated-board latency is qemu's (15-25x slower than real silicon): it checks correctness "
              "and the RPC path, not board speed")
    print(f"artifacts: {work}" + ("" if keep else " (temporary; pass --keep DIR to choose)"))
