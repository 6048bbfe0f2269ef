"""Run `edgetvm` command lines in forked children, each with a timeout, and classify how each ended.

The conformance suite and the fuzzing campaign push hundreds of models through the CLI. A fresh
interpreter per case would spend seconds importing TVM each time; a fork of a parent that imported
it once costs milliseconds, and a child that hangs or crashes takes only itself down.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

# How a case ended, from best to worst. "clear": exit code 2 and one line on stderr naming the problem.
OUTCOMES = ("ok", "clear", "noisy", "traceback", "crash", "hang", "half-written")
BAD = {"noisy", "traceback", "crash", "hang", "half-written"}


@dataclass
class Result:
    argv: list[str]
    outcome: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def error_line(self) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        return lines[-1] if lines else ""


def preload() -> None:
    """Import what every case needs before forking, so no child pays for it (and no threads exist yet)."""
    import onnx  # noqa: F401
    import tvm  # noqa: F401
    from tvm.relax.frontend import onnx as _onnx  # noqa: F401

    import edgetvm.cli  # noqa: F401
    import edgetvm.compiler  # noqa: F401


def _pool_has_workers() -> bool:
    """Whether TVM's thread pool in this process runs tasks on other threads. Those threads do not survive
    a fork: a child's first parallel kernel waits for them forever. TVM's own default is one thread on a
    2-core x86 machine (it halves the hardware threads), but two or more on bigger machines or with
    TVM_NUM_THREADS set (as a local `edgetvm run` in this process sets it)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")()) > 1


def run_cli(argv: list[str], timeout: float = 120.0, outputs: list[str | Path] = ()) -> Result:
    """`edgetvm ARGV` in a forked child; `outputs` are paths that must not exist half-written afterwards.
    Where this process's thread pool has worker threads the child execs a fresh interpreter instead
    (seconds of imports, but no pool without its threads)."""
    fresh = _pool_has_workers()
    with tempfile.TemporaryDirectory(prefix="edgetvm-case-") as d:
        out_path, err_path = Path(d) / "stdout", Path(d) / "stderr"
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            _child(argv, out_path, err_path, fresh)
        status, hung = _wait(pid, timeout)
        seconds = time.perf_counter() - t0
        stdout = out_path.read_text(errors="replace")
        stderr = err_path.read_text(errors="replace")
    rc = os.waitstatus_to_exitcode(status) if status is not None else None
    return Result(list(argv), classify(rc, stderr, hung, outputs), rc, stdout, stderr, seconds)


def classify(rc: int | None, stderr: str, hung: bool, outputs=()) -> str:
    if hung:
        return "hang"
    if rc is not None and rc < 0:
        return "crash"
    if "Traceback (most recent call last)" in stderr or rc not in (0, 2):
        return "traceback"
    if rc == 2:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        if len(lines) != 1 or not lines[0].startswith("edgetvm: error:"):
            return "noisy"
        if any(_half_written(Path(p)) for p in outputs):
            return "half-written"
        return "clear"
    return "ok"


def _half_written(out: Path) -> bool:
    """A failed command left `out`, or a staging directory beside it, behind."""
    leftovers = list(out.parent.glob(f".{out.name}.*")) if out.parent.is_dir() else []
    return out.exists() or bool(leftovers)


def _child(argv, out_path: Path, err_path: Path, fresh: bool = False) -> None:
    rc = 1
    try:
        os.setpgid(0, 0)  # its own group: a timeout kills whatever it started too
        for fd, path in ((1, out_path), (2, err_path)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(f, fd)
            os.close(f)
        if fresh:
            dn = os.open(os.devnull, os.O_RDONLY)
            os.dup2(dn, 0)
            os.execv(sys.executable, [sys.executable, "-m", "edgetvm.cli", *map(str, argv)])
        sys.stdin = open(os.devnull)
        # A caller such as pytest may have swapped sys.stdout/stderr for its own buffers: the command's
        # Python output must reach the same files as its native output.
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        from edgetvm.cli import main

        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        rc = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def _wait(pid: int, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, False
        if time.monotonic() > deadline:
            for target in (lambda s: os.killpg(pid, s), lambda s: os.kill(pid, s)):
                try:
                    target(signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.waitpid(pid, 0)
            return None, True
        time.sleep(0.01)


def tally(results: list[Result]) -> dict[str, int]:
    counts = {k: 0 for k in OUTCOMES}
    for r in results:
        counts[r.outcome] += 1
    return counts
