"""Every long-lived edgetvm command cleans up after itself, however it is stopped.

Each test starts a command as a process of its own, waits until its service is up (the emulated
board serves on its port; the profile's cgroups hold the measuring process), stops it with SIGINT
(Ctrl-C) or SIGTERM (`kill`), and checks that it exits with 130 or 143 and says so in one line,
and that runtime/leftovers.py finds nothing the command made: no cgroup, process, listening port,
mount or network namespace. Before the signal, each test of a command that starts processes or
makes cgroups checks that the detector sees them, so that "nothing left" cannot come from a detector
that sees nothing; the first test leaves one of each kind on purpose.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgetvm.runtime import cgroup, leftovers

VENV_BIN = Path(sys.executable).parent
STOPS = [pytest.param(signal.SIGINT, 130, "edgetvm: interrupted", id="SIGINT"),
         pytest.param(signal.SIGTERM, 143, "edgetvm: terminated", id="SIGTERM")]


def _board_reason():
    from edgetvm.runtime import emulated_board

    return emulated_board.board_unavailable_reason()


def _latte_reason():
    from edgetvm.latte.devices import cgroups_unavailable

    return cgroups_unavailable()


needs_board = pytest.mark.skipif((reason := _board_reason()) is not None, reason=f"emulated board: {reason}")
needs_cgroups = pytest.mark.skipif((why := _latte_reason()) is not None, reason=f"cgroups: {why}")


# --------------------------------------------------------------------------------- helpers


class Command:
    """An `edgetvm` command running as a child process, its output going to files."""

    def __init__(self, tmp_path: Path, *argv):
        self.out, self.err = tmp_path / "stdout", tmp_path / "stderr"
        exe = VENV_BIN / "edgetvm"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgetvm.cli"]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd + [str(a) for a in argv], stdout=out, stderr=err,
                                         preexec_fn=_as_a_foreground_command)
        self.pid = self.proc.pid

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def owned(self) -> list[leftovers.Resource]:
        return [r for r in leftovers.find() if r.owner == self.pid]

    def wait_until(self, condition, what: str, timeout: float):
        """Polls condition() until it returns something true, which it returns."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"exited ({self.proc.returncode}) before {what}:\n{self.stderr[-3000:]}")
            if got := condition():
                return got
            time.sleep(0.25)
        pytest.fail(f"no {what} after {timeout:.0f} s:\n{self.stderr[-3000:]}")

    def stop_with(self, sig: int, timeout: float) -> float:
        """Sends sig, as `kill -SIG PID` does (to the command alone), and waits; returns the seconds it took."""
        t = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout:.0f} s after {signal.Signals(sig).name}:\n{self.stderr[-3000:]}")
        return time.monotonic() - t

    def kill_and_remove_leftovers(self) -> None:
        """After a failed test: what the command left must not pile up on the machine."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for r in self.owned():
            if r.kind == "process":
                _kill(int(r.name.split()[0]))
        for r in self.owned():
            if r.kind == "cgroup":
                cgroup.remove(Path(r.name))


def _as_a_foreground_command() -> None:
    # Ctrl-C reaches a command started at a terminal. A suite started in the background by a script
    # (`bash dev.sh test &`, CI runners) inherits SIGINT ignored, as POSIX shells ignore it for
    # background jobs, and so would the command: it would rightly stay deaf to the test's Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def command(tmp_path):
    started = []

    def start(*argv) -> Command:
        started.append(Command(tmp_path, *argv))
        return started[-1]

    yield start
    for c in started:
        c.kill_and_remove_leftovers()


def assert_stopped_cleanly(cmd: Command, code: int, message: str) -> None:
    """Exit code of the signal, its one-line message last on stderr, no traceback, nothing left."""
    err = cmd.stderr
    assert cmd.proc.returncode == code, err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1] == message, err
    left = cmd.owned()
    assert not left, "left behind:\n" + "\n".join(map(str, left))


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# --------------------------------------------------------------------------------- the detector


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/unshare").exists(), reason="needs root and unshare")
def test_detector_finds_each_kind_of_resource_left_on_purpose_and_nothing_once_removed(tmp_path):
    boards = tmp_path / "boards"
    mount_point = boards / "rootfs" / "proc"
    mount_point.mkdir(parents=True)
    me = os.getpid()
    made, cg, has_netns = [], None, False
    # A marked process listening on a port, in a private mount namespace with a mount under the boards
    # dir: an emulated board as its owner died and left it.
    listener = ("import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
                "print(s.getsockname()[1], flush=True); time.sleep(120)")
    board_like = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         'mount -t tmpfs tmpfs "$1" && exec "$2" -c "$3"', "sh", str(mount_point), sys.executable, listener],
        stdout=subprocess.PIPE, text=True, env={**os.environ, leftovers.OWNER_ENV: str(me)})
    try:
        port = int(board_like.stdout.readline())
        made += [("process", str(board_like.pid)), ("port", f"127.0.0.1:{port}"), ("mount", str(mount_point))]
        cg = cgroup.Cgroup() if cgroup.unavailable_reason() is None else None
        if cg is not None:
            made += [("cgroup", str(cg.mem)), ("cgroup", str(cg.cpu))]
        netns = leftovers.netns_name("cleanup-test")
        has_netns = subprocess.run(["ip", "netns", "add", netns], capture_output=True).returncode == 0
        if has_netns:
            made.append(("netns", netns))

        found = leftovers.find(boards)
        for kind, name in made:
            assert any(r.kind == kind and name in r.name and r.owner == me for r in found), \
                f"{kind} {name} not found (owner {me}) in:\n" + "\n".join(map(str, found))
    finally:
        board_like.kill()
        board_like.wait()
        if cg is not None:
            cg.close()
        if has_netns:
            subprocess.run(["ip", "netns", "delete", netns], check=True)
    found = leftovers.find(boards)
    assert not [r for r in found for kind, name in made if r.kind == kind and name in r.name]


def test_owner_names_and_marks_carry_the_owning_pid(monkeypatch):
    monkeypatch.delenv(leftovers.OWNER_ENV, raising=False)
    assert leftovers.netns_name("link0") == f"edgetvm-{os.getpid()}-link0"
    with leftovers.owning_children():
        out = subprocess.run([sys.executable, "-c", f"import os; print(os.environ['{leftovers.OWNER_ENV}'])"],
                             capture_output=True, text=True, check=True).stdout
    assert int(out) == os.getpid()
    assert leftovers.OWNER_ENV not in os.environ  # restored


# --------------------------------------------------------------------------------- edgetvm board emulate


@needs_board
@pytest.mark.parametrize("sig, code, message", STOPS)
def test_board_emulate_stops_its_server_and_mounts(command, sig, code, message):
    from edgetvm.runtime.emulated_board import free_port

    port = free_port()
    board = command("board", "emulate", "--port", port)
    board.wait_until(lambda: "serving TVM RPC" in board.stdout, "board serving", timeout=180)
    running = {r.kind for r in board.owned()}
    assert {"process", "port", "mount"} <= running, board.owned()

    took = board.stop_with(sig, timeout=60)

    assert board.stderr.strip() == message  # one line, nothing else
    assert_stopped_cleanly(board, code, message)
    assert port_is_free(port)
    print(f"board stopped {took:.1f} s after {signal.Signals(sig).name}")


# --------------------------------------------------------------------------------- edgetvm latte profile


def _measuring_in_cgroup(cmd: Command):
    """The owned cgroups once the measuring process has moved into them."""
    cgroups = [r for r in cmd.owned() if r.kind == "cgroup"]
    for r in cgroups:
        try:
            if (Path(r.name) / "cgroup.procs").read_text().split():
                return cgroups
        except OSError:
            pass
    return None


@needs_cgroups
@pytest.mark.parametrize("sig, code, message", STOPS)
def test_latte_profile_removes_its_cgroups_with_the_measuring_process_inside(command, tmp_path, sig, code,
                                                                              message):
    # --min-time 60: the measuring process is still in its cgroups when the signal comes.
    profile = command("latte", "profile", "--device", "hub-2c", "--arch", "mlp-a", "--widths", "1/8",
                      "--no-tuned", "--repeats", "1", "--min-time", "60", "-o", tmp_path / "profile.json")
    cgroups = profile.wait_until(lambda: _measuring_in_cgroup(profile), "a process in the cgroups", timeout=300)
    assert {Path(r.name).parent.name for r in cgroups} == {"cpu", "cpuset", "memory"}
    measuring = [r for r in profile.owned() if r.kind == "process" and "edgetvm.latte.measure" in r.name]
    assert measuring, profile.owned()
    spec_dir = Path(measuring[0].name.split()[-1]).parent  # the measuring process's temporary directory

    profile.stop_with(sig, timeout=60)

    assert_stopped_cleanly(profile, code, message)
    assert not spec_dir.exists()
    assert not (tmp_path / "profile.json").exists()


# --------------------------------------------------------------------------------- edgetvm tune


def _records_and_workers(tune: Command, db: Path):
    """Once a record is in the database and the runner's worker processes are up: the workers."""
    records = db / "database_tuning_record.json"
    if records.exists() and records.stat().st_size > 0:
        return [r for r in tune.owned() if r.kind == "process" and "popen_worker" in r.name]
    return None


def test_tune_here_stops_on_sigterm_and_takes_its_workers_along(command, tmp_path):
    # SIGINT is test_tune.py's test_ctrl_c_stops_cleanly_and_keeps_the_records.
    _matmul_model(tmp_path / "matmul.onnx")
    db = tmp_path / "db"
    tune = command("tune", tmp_path / "matmul.onnx", "--trials", "200", "--trials-per-batch", "4",
                   "--no-progress", "-o", db)
    tune.wait_until(lambda: _records_and_workers(tune, db), "records and runner workers", timeout=300)

    tune.stop_with(signal.SIGTERM, timeout=120)

    assert_stopped_cleanly(tune, 143, "edgetvm: terminated")
    assert "run the same command again to continue" in tune.stderr


# --------------------------------------------------------------------------------- over RPC (slow)


def _matmul_model(path: Path) -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 64])], initializer=[w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def _emulated_board():
    from edgetvm.runtime import emulated_board

    if (reason := emulated_board.board_unavailable_reason()) is not None:
        pytest.skip(f"emulated board: {reason}")
    return emulated_board.EmulatedBoard()


@pytest.fixture(scope="module")
def board():
    with _emulated_board() as b:
        yield b


@pytest.fixture
def fresh_board():
    """A board for one test. A client that dies in the middle of a call ends TVM's rpc_server accepting
    sessions for good (tvm.rpc.server._serving raises once the session's process fails to send the
    result, and that ends its listening thread): no other test can use that board afterwards."""
    with _emulated_board() as b:
        yield b


def _board_serves(board) -> bool:
    from tvm import rpc

    return rpc.connect(board.host, board.port, session_timeout=60).cpu().exist


def _modules_loaded(board) -> int:
    return Path(board.log_path).read_text(errors="replace").count("load_module")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, message", STOPS)
def test_tune_over_rpc_stops_and_leaves_the_board_serving(command, board, tmp_path, sig, code, message):
    _matmul_model(tmp_path / "matmul.onnx")
    db = tmp_path / "db"
    tune = command("tune", tmp_path / "matmul.onnx", "--target", "rpi4", "--trials", "64", "--trials-per-batch", "4",
                   "--rpc", f"{board.host}:{board.port}", "--no-progress", "-o", db)
    tune.wait_until(lambda: _records_and_workers(tune, db), "a record measured on the board and runner workers",
                    timeout=600)

    tune.stop_with(sig, timeout=300)

    assert_stopped_cleanly(tune, code, message)
    assert "run the same command again to continue" in tune.stderr
    assert _board_serves(board)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, message", STOPS)
def test_run_over_rpc_stops_in_the_middle_of_a_remote_call(command, fresh_board, tmp_path, sig, code, message):
    from edgetvm.cli import main

    _matmul_model(tmp_path / "matmul.onnx")
    assert main(["compile", str(tmp_path / "matmul.onnx"), "--target", "rpi4", "-o", str(tmp_path / "art")]) == 0
    loaded = _modules_loaded(fresh_board)
    run = command("run", tmp_path / "art", "--rpc", f"{fresh_board.host}:{fresh_board.port}", "--repeat", "20000")
    run.wait_until(lambda: _modules_loaded(fresh_board) > loaded, "the model loaded on the board", timeout=180)
    time.sleep(2)  # into the timed runs: one remote call of 20000 runs, about 15 s under qemu

    # The command reports the signal at once, but exits only once the board has answered the call in
    # flight: TVM frees the session's remote handles with calls of its own, and cannot cancel one.
    took = run.stop_with(sig, timeout=120)

    assert_stopped_cleanly(run, code, message)
    print(f"run stopped {took:.1f} s after {signal.Signals(sig).name}")
