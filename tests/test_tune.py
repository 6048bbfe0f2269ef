"""`edgetvm tune`: MetaSchedule + XGBoost per board, resumable, applied by `compile --tuning-db`.

The fast tests tune a two-Gemm model (two tasks) for a few trials on this machine; the slow ones
tune on the emulated aarch64 board through an RPC tracker and run bench/tune.py with a tiny budget.
"""

import json
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

from edgetvm.cli import main
from edgetvm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RECORDS = "database_tuning_record.json"


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("edgetvm: error: ")
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def two_gemms(seed: int = 0) -> onnx.ModelProto:
    """x[16,128] -> Gemm(64)+Relu -> Gemm(32): two tuning tasks."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.1, n)
             for n, s in [("w1", (128, 64)), ("b1", (64,)), ("w2", (64, 32)), ("b2", (32,))]]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "two_gemms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 128])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 32])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    p = tmp_path_factory.mktemp("models") / "two_gemms.onnx"
    onnx.save(two_gemms(), p)
    return p


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    p = tmp_path_factory.mktemp("models") / "other.onnx"
    onnx.save(two_gemms(seed=1), p)  # same graph, other weights: another sha256
    return p


@pytest.fixture(scope="module")
def tuned(model, tmp_path_factory):
    """A database with 8 trials per task, tuned in this process."""
    db = tmp_path_factory.mktemp("tune") / "db"
    t = time.monotonic()
    rc = main(["tune", str(model), "--trials", "8", "--trials-per-batch", "4", "-o", str(db), "--no-progress"])
    assert rc == 0
    print(f"tuning 2 tasks x 8 trials took {time.monotonic() - t:.1f} s")
    return db


def host():
    from edgetvm.targets import load_board

    return load_board("host")


def records_per_task(db_path, model_path):
    """{task name: number of records} through the public API."""
    from edgetvm import tuning

    board = host()
    db = tuning.open_database(db_path, board, model_path, {})
    deploy, _ = tuning.deploy_module(model_path, target=board.target())
    counts = {}
    for t in tuning.extract_tasks(deploy, board.target()):
        wl = db.commit_workload(t.dispatched[0])
        counts[t.task_name] = sum(r.workload.same_as(wl) for r in db.get_all_tuning_records())
    return counts


def record_lines(db_path) -> list[bytes]:
    p = Path(db_path) / RECORDS
    return p.read_bytes().split(b"\n")[:-1] if p.exists() else []


def run_outputs(artifact, x):
    from edgetvm.runtime.artifact import open_artifact
    from edgetvm.runtime.session import Runner

    return Runner(open_artifact(artifact)).run({"x": x})["y"]


# --------------------------------------------------------------------------- tune -> compile


def test_tune_writes_records_for_every_task_and_a_summary(tuned, model, capsys):
    counts = records_per_task(tuned, model)
    assert len(counts) == 2, counts
    # 8 trials each, plus the default schedule's own record
    assert all(n == 9 for n in counts.values()), counts
    ident = json.loads((tuned / "edgetvm-tuning.json").read_text())
    assert ident["board"] == "host" and ident["model"]["name"] == "two_gemms.onnx"
    assert ident["inputs"] == [{"name": "x", "shape": [16, 128], "dtype": "float32"}]
    tasks = json.loads((tuned / "tasks.json").read_text())["tasks"]
    assert all(t["untuned_ms"] > 0 and t["default_recorded"] for t in tasks)


def test_same_command_again_does_no_new_trials(tuned, model, capsys):
    before = record_lines(tuned)
    t = time.monotonic()
    rc, out, err = run_cli(capsys, "tune", model, "--trials", "8", "-o", tuned, "--no-progress")
    assert rc == 0, err
    assert "0 new trial(s), 16 from earlier runs" in out
    assert record_lines(tuned) == before
    # The summary table: one row per task and a total, with untuned and tuned ms and the speed-up.
    assert "untuned ms" in out and "tuned ms" in out and "speed-up" in out
    assert out.count("fused_matmul") >= 2 and "total (x calls)" in out


def test_compile_with_tuning_db_applies_it_and_matches_untuned(tuned, model, tmp_path, capsys):
    from edgetvm import tuning

    rc, out, err = run_cli(capsys, "compile", model, "-o", tmp_path / "plain")
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "compile", model, "--tuning-db", tuned, "-o", tmp_path / "tuned")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "tuned" / "manifest.json").read_text())
    assert manifest["tuning_db"] == str(tuned)

    # Every kernel of the compiled main gets its schedule from the database.
    board = host()
    deploy, _ = tuning.deploy_module(model, target=board.target())
    db = tuning.open_database(tuned, board, model, {})
    kernels = [t.task_name for t in tuning.extract_tasks(deploy, board.target())]
    assert tuning.scheduled_functions(deploy, board.target(), db) == sorted(kernels)

    x = np.random.default_rng(3).standard_normal((16, 128)).astype(np.float32)
    plain, fast = run_outputs(tmp_path / "plain", x), run_outputs(tmp_path / "tuned", x)
    np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-5)
    assert np.abs(plain).max() > 0.1  # not trivially zero


def test_database_with_torn_last_line_loads_and_tune_repairs_it(tuned, model, tmp_path, capsys):
    import shutil

    from edgetvm import tuning

    db = tmp_path / "db"
    shutil.copytree(tuned, db)
    good = (db / RECORDS).read_bytes()
    with open(db / RECORDS, "ab") as f:  # what a SIGKILL in the middle of a write leaves
        f.write(good.split(b"\n")[0][:200])
    loaded = tuning.open_database(db, host(), model, {})
    assert len(loaded) == good.count(b"\n")
    assert (db / RECORDS).read_bytes() != good  # reading never changes the files
    rc, out, err = run_cli(capsys, "tune", model, "--trials", "8", "-o", db, "--no-progress")
    assert rc == 0, err
    assert (db / RECORDS).read_bytes() == good  # the torn line is cut before anything is appended


# --------------------------------------------------------------------------- kill, resume, Ctrl-C


def _spawn_tune(model, db, trials, batch=4):
    # Own session: the test can clean up the worker processes of a killed run.
    return subprocess.Popen([sys.executable, "-m", "edgetvm.cli", "tune", str(model), "--trials", str(trials),
                             "--trials-per-batch", str(batch), "-o", str(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_records(proc, db, n, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(record_lines(db)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"tune exited early ({proc.returncode}):\n{proc.stderr.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {n} records after {timeout} s")


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_sigkill_then_rerun_continues_from_the_database(model, tmp_path, capsys):
    db = tmp_path / "db"
    proc = _spawn_tune(model, db, trials=12)
    try:
        _wait_for_records(proc, db, 2 + 4)  # both default-schedule records and one batch of trials
        proc.send_signal(signal.SIGKILL)  # the tune process alone, as `kill -9 PID` does
        proc.wait(30)
    finally:
        _kill_group(proc)
        proc.communicate()
    kept = record_lines(db)
    assert 6 <= len(kept) < 2 + 24, len(kept)
    from edgetvm import tuning

    assert len(tuning.open_database(db, host(), model, {})) == len(kept)  # loads as it is

    rc, out, err = run_cli(capsys, "tune", model, "--trials", "12", "--trials-per-batch", "4", "-o", db,
                           "--no-progress")
    assert rc == 0, err
    assert f"resuming: {len(kept) - 2} trial(s) already there" in err
    assert record_lines(db)[: len(kept)] == kept  # nothing lost or rewritten
    # It continued: exactly the budget per task (12 + the default record), not 12 more.
    assert records_per_task(db, model) == {n: 13 for n in records_per_task(db, model)}
    assert f"{24 - (len(kept) - 2)} new trial(s)" in out


def test_ctrl_c_stops_cleanly_and_keeps_the_records(model, tmp_path):
    db = tmp_path / "db"
    proc = _spawn_tune(model, db, trials=200)
    try:
        _wait_for_records(proc, db, 2 + 4)
        t = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
        stopped_in = time.monotonic() - t
    finally:
        _kill_group(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted" in err and "run the same command again" in err
    assert "speed-up" in out  # the summary of what was found
    lines = record_lines(db)
    assert all(json.loads(line) for line in lines)  # only whole records
    assert (db / RECORDS).read_bytes().endswith(b"\n")
    assert 6 <= len(lines) < 2 + 400
    from edgetvm import tuning

    assert len(tuning.open_database(db, host(), model, {})) == len(lines)
    print(f"stopped {stopped_in:.1f} s after SIGINT with {len(lines)} records")


# --------------------------------------------------------------------------- bad input


def test_unknown_board(capsys, model, tmp_path):
    rc, out, err = run_cli(capsys, "tune", model, "--target", "rpi9", "-o", tmp_path / "db")
    assert_one_line_error(rc, err, "rpi9", "rpi4", "host")
    assert not (tmp_path / "db").exists()


@pytest.fixture
def tvm_never_dials(monkeypatch):
    """TVM's own connect retries an unreachable address for minutes: edgetvm must probe it first."""
    from tvm import rpc

    def refuse(*a, **k):
        raise AssertionError("an unreachable address was handed to TVM's RPC client")

    monkeypatch.setattr(rpc, "connect", refuse)
    monkeypatch.setattr(rpc, "connect_tracker", refuse)


def test_unreachable_rpc_server_fails_fast_with_address(capsys, model, tmp_path, tvm_never_dials):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, out, err = run_cli(capsys, "tune", model, "--target", "rpi4", "--rpc", f"127.0.0.1:{port}",
                           "-o", tmp_path / "db")
    assert_one_line_error(rc, err, f"127.0.0.1:{port}", "RPC server")
    assert not (tmp_path / "db").exists()


def test_unreachable_tracker_fails_fast_with_address(capsys, model, tmp_path, tvm_never_dials):
    rc, out, err = run_cli(capsys, "tune", model, "--target", "rpi4", "--tracker", "127.0.0.1:1", "--key", "rpi4",
                           "-o", tmp_path / "db")
    assert_one_line_error(rc, err, "127.0.0.1:1", "tracker")


def test_arm_board_without_rpc_is_refused(capsys, model, tmp_path):
    rc, out, err = run_cli(capsys, "tune", model, "--target", "rpi4", "-o", tmp_path / "db")
    assert_one_line_error(rc, err, "rpi4", "--rpc", "--tracker")


def test_bad_trial_count(capsys, model, tmp_path):
    rc, out, err = run_cli(capsys, "tune", model, "--trials", "0", "-o", tmp_path / "db")
    assert_one_line_error(rc, err, "--trials 0")


def test_database_for_another_board_is_refused(capsys, tuned, model, tmp_path):
    rc, out, err = run_cli(capsys, "compile", model, "--target", "rpi4", "--tuning-db", tuned, "-o", tmp_path / "o")
    assert_one_line_error(rc, err, str(tuned), "board 'host'", "rpi4")
    assert not (tmp_path / "o").exists()


def test_database_for_another_model_is_refused(capsys, tuned, other_model, tmp_path):
    rc, out, err = run_cli(capsys, "compile", other_model, "--tuning-db", tuned, "-o", tmp_path / "o")
    assert_one_line_error(rc, err, str(tuned), "another model", "two_gemms.onnx", "other.onnx")
    before = record_lines(tuned)
    rc, out, err = run_cli(capsys, "tune", other_model, "--trials", "8", "-o", tuned)
    assert_one_line_error(rc, err, "another model")
    assert record_lines(tuned) == before


def test_database_for_other_input_shapes_is_refused(tuned, model, tmp_path):
    import shutil

    from edgetvm import tuning

    db = tmp_path / "db"
    shutil.copytree(tuned, db)
    ident = json.loads((db / "edgetvm-tuning.json").read_text())
    ident["inputs"][0]["shape"] = [1, 128]
    (db / "edgetvm-tuning.json").write_text(json.dumps(ident))
    with pytest.raises(UserError, match=r"input shapes x:1,128, not x:16,128"):
        tuning.open_database(db, host(), model, {})


def test_missing_and_non_databases(capsys, model, tmp_path):
    rc, out, err = run_cli(capsys, "compile", model, "--tuning-db", tmp_path / "nope", "-o", tmp_path / "o")
    assert_one_line_error(rc, err, "nope", "does not exist", "edgetvm tune")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    rc, out, err = run_cli(capsys, "compile", model, "--tuning-db", tmp_path / "junk", "-o", tmp_path / "o")
    assert_one_line_error(rc, err, "not an edgetvm tuning database")
    rc, out, err = run_cli(capsys, "tune", model, "-o", tmp_path / "junk")
    assert_one_line_error(rc, err, "not an edgetvm tuning database")
    assert (tmp_path / "junk" / "notes.txt").read_text() == "hello"


def test_corrupt_record_in_the_middle_is_refused(tuned, model, tmp_path):
    import shutil

    from edgetvm import tuning

    db = tmp_path / "db"
    shutil.copytree(tuned, db)
    lines = (db / RECORDS).read_bytes().split(b"\n")
    lines[1] = b"garbage"
    (db / RECORDS).write_bytes(b"\n".join(lines))
    with pytest.raises(UserError, match="line 2 is not a MetaSchedule record"):
        tuning.open_database(db, host(), model, {})


def test_crashing_tvm_ffi_version_is_refused(monkeypatch, capsys, model, tmp_path):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.1.15.post2" if name == "apache-tvm-ffi" else real(name))
    rc, out, err = run_cli(capsys, "tune", model, "-o", tmp_path / "db")
    assert_one_line_error(rc, err, "0.1.15.post2", "apache-tvm-ffi==0.1.14.post0")


# --------------------------------------------------------------------------- slow


def _matmul_model(path: Path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.1, "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 64])], initializer=[w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return rng.standard_normal((16, 64)).astype(np.float32), numpy_helper.to_array(w)


@pytest.mark.slow
def test_tune_on_emulated_board_through_tracker(tmp_path, capsys):
    from edgetvm.runtime import emulated_board as eb

    if (reason := eb.board_unavailable_reason()) is not None:
        pytest.skip(f"emulated board: {reason}")
    x, w = _matmul_model(tmp_path / "matmul.onnx")
    np.save(tmp_path / "x.npy", x)
    t0 = time.monotonic()
    with eb.RPCTracker() as tracker, eb.EmulatedBoard(tracker=tracker, key="rpi4-emu"):
        t1 = time.monotonic()
        rc, out, err = run_cli(capsys, "tune", tmp_path / "matmul.onnx", "--target", "rpi4", "--trials", "4",
                               "--trials-per-batch", "4", "--tracker", tracker.address, "--key", "rpi4-emu",
                               "-o", tmp_path / "db")
        assert rc == 0, err
        t2 = time.monotonic()
        assert "4 new trial(s)" in out, out
        assert "(untuned kept)" in out or "x" in out.split("total (x calls)")[1]
        rc, _, err = run_cli(capsys, "compile", tmp_path / "matmul.onnx", "--target", "rpi4",
                             "--tuning-db", tmp_path / "db", "-o", tmp_path / "art")
        assert rc == 0, err
        rc, _, err = run_cli(capsys, "run", tmp_path / "art", "--input", f"x={tmp_path / 'x.npy'}",
                             "--output", tmp_path / "y.npz", "--repeat", "2",
                             "--tracker", tracker.address, "--key", "rpi4-emu")
        assert rc == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["y"], x @ w, rtol=0, atol=1e-4)
    t3 = time.monotonic()
    # A board served directly (no tracker): the same database continues, 2 more trials.
    with eb.EmulatedBoard() as board:
        t4 = time.monotonic()
        rc, out2, err = run_cli(capsys, "tune", tmp_path / "matmul.onnx", "--target", "rpi4", "--trials", "6",
                                "--trials-per-batch", "4", "--rpc", f"127.0.0.1:{board.port}", "-o", tmp_path / "db")
        assert rc == 0, err
        assert "2 new trial(s), 4 from earlier runs" in out2, out2
    t5 = time.monotonic()
    print(f"\nemulated board: tracker+board start {t1 - t0:.0f} s, tune via tracker (1 task x 4 trials) "
          f"{t2 - t1:.0f} s, compile+run {t3 - t2:.0f} s; direct --rpc +2 trials {t5 - t4:.0f} s; "
          f"total {t5 - t0:.0f} s\n{out}\n{out2}")


@pytest.mark.slow
def test_bench_tune_runs_with_a_tiny_budget(tmp_path):
    t = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "tune.py"), "--trials", "2", "--models",
                           "dense_stack", "--dense-n", "2", "--dense-d", "256", "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tuned/untuned" in proc.stdout and "tuned/onnxruntime" in proc.stdout
    assert "dense_stack" in proc.stdout
    print(f"\nbench/tune.py --trials 2 took {time.monotonic() - t:.0f} s\n{proc.stdout}")
