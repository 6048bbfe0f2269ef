"""Bad input: one line on stderr naming the problem and the fix, exit code 2, no traceback, nothing half-written."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from edgetvm import zoo
from edgetvm.cli import main


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("edgetvm: error: ")
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def no_leftovers(directory: Path):
    return [p.name for p in directory.iterdir() if p.name.endswith((".partial", ".old"))]


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("models") / "mlp.onnx"
    onnx.save(zoo.load("mlp"), p)
    return p


@pytest.fixture(scope="module")
def mlp_artifact(mlp_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "mlp"
    assert main(["compile", str(mlp_file), "--target", "host", "-o", str(out)]) == 0
    return out


def test_missing_model_file(capsys, tmp_path):
    rc, err = run_cli(capsys, "compile", tmp_path / "nope.onnx", "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "nope.onnx", "does not exist")
    assert not (tmp_path / "out").exists()


def test_bytes_that_are_not_onnx(capsys, tmp_path):
    bad = tmp_path / "photo.onnx"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    rc, err = run_cli(capsys, "compile", bad, "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "photo.onnx", "ONNX")
    assert not (tmp_path / "out").exists()


def test_text_file_is_not_onnx(capsys, tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is a README, not a model\n" * 20)
    rc, err = run_cli(capsys, "compile", bad, "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "notes.onnx", "ONNX")


def test_truncated_onnx(capsys, tmp_path, mlp_file):
    data = mlp_file.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    rc, err = run_cli(capsys, "compile", cut, "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "cut.onnx", "re-export")
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


def test_unsupported_operator_names_op_and_node(capsys, tmp_path):
    node = helper.make_node("DFT", ["x"], ["y"], name="spectrum", axis=1)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 2])])
    p = tmp_path / "dft.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), p)
    rc, err = run_cli(capsys, "compile", p, "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "DFT", "spectrum")


def test_custom_domain_operator_is_named(capsys, tmp_path):
    node = helper.make_node("FusedGelu", ["x"], ["y"], name="gelu0", domain="com.microsoft")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    p = tmp_path / "ms.onnx"
    onnx.save(m, p)
    rc, err = run_cli(capsys, "compile", p, "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "com.microsoft::FusedGelu", "gelu0")


def test_unknown_board_lists_valid_ones(capsys, tmp_path, mlp_file):
    rc, err = run_cli(capsys, "compile", mlp_file, "--target", "rpi9", "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "rpi9", "rpi4", "rpi3", "host", "jetson-nano-cpu")


def test_dynamic_dims_need_input_shape(capsys, tmp_path):
    model = zoo.load("mlp")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    p = tmp_path / "dyn.onnx"
    onnx.save(model, p)
    rc, err = run_cli(capsys, "compile", p, "-o", tmp_path / "out")
    name = model.graph.input[0].name
    assert_one_line_error(rc, err, name, "dynamic", f"--input-shape {name}:")
    # With the shape given, it compiles.
    rc = main(["compile", str(p), "--input-shape", f"{name}:2,784", "-o", str(tmp_path / "out")])
    assert rc == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["inputs"][0]["shape"] == [2, 784]


def test_input_shape_for_unknown_input(capsys, tmp_path, mlp_file):
    rc, err = run_cli(capsys, "compile", mlp_file, "--input-shape", "images:1,784", "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "images", "not an input")


def test_output_parent_missing(capsys, tmp_path, mlp_file):
    rc, err = run_cli(capsys, "compile", mlp_file, "-o", tmp_path / "no" / "such" / "dir")
    assert_one_line_error(rc, err, "does not exist")


def test_output_dir_unwritable(capsys, mlp_file):
    # Root ignores permission bits, so use a file system nobody can create directories in.
    rc, err = run_cli(capsys, "compile", mlp_file, "-o", "/proc/edgetvm-out")
    assert_one_line_error(rc, err, "/proc", "-o")


def test_output_is_not_an_artifact(capsys, tmp_path, mlp_file):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    rc, err = run_cli(capsys, "compile", mlp_file, "-o", tmp_path / "home")
    assert_one_line_error(rc, err, "not an edgetvm artifact")
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_failed_build_leaves_nothing_and_keeps_old_artifact(capsys, tmp_path, mlp_file, monkeypatch):
    out = tmp_path / "art"
    assert main(["compile", str(mlp_file), "-o", str(out)]) == 0
    before = (out / "manifest.json").read_text()

    from edgetvm.passes import pipeline

    def broken_export(*a, **k):
        raise RuntimeError("linker crashed")

    monkeypatch.setattr(pipeline, "export", broken_export)
    with pytest.raises(RuntimeError):
        main(["compile", str(mlp_file), "-o", str(out)])
    assert (out / "manifest.json").read_text() == before
    assert not no_leftovers(tmp_path)
    with pytest.raises(RuntimeError):
        main(["compile", str(mlp_file), "-o", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh").exists() and not no_leftovers(tmp_path)


@pytest.mark.parametrize("victim", ["model.so", "weights.bin"])
def test_tampered_artifact(capsys, tmp_path, mlp_artifact, victim):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(mlp_artifact, art)
    with open(art / victim, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    rc, err = run_cli(capsys, "run", art)
    assert_one_line_error(rc, err, victim, "sha256")


def test_not_an_artifact(capsys, tmp_path):
    rc, err = run_cli(capsys, "run", tmp_path)
    assert_one_line_error(rc, err, "not a compiled model", "edgetvm compile")


def test_wrong_input_shape(capsys, tmp_path, mlp_artifact):
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((1, 100), np.float32))
    rc, err = run_cli(capsys, "run", mlp_artifact, "--input", f"{tmp_path / 'x.npy'}")
    assert_one_line_error(rc, err, "float32[1,100]", "float32[1,784]")


def test_unreadable_input_file(capsys, tmp_path, mlp_artifact):
    (tmp_path / "x.npy").write_text("not numpy")
    rc, err = run_cli(capsys, "run", mlp_artifact, "--input", f"x={tmp_path / 'x.npy'}")
    assert_one_line_error(rc, err, "x.npy", "numpy.save")


def test_unreachable_rpc_server_fails_fast_with_address(capsys, mlp_artifact):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, err = run_cli(capsys, "run", mlp_artifact, "--rpc", f"127.0.0.1:{port}")
    assert_one_line_error(rc, err, f"127.0.0.1:{port}", "RPC server")


def test_unreachable_tracker(capsys, mlp_artifact):
    rc, err = run_cli(capsys, "run", mlp_artifact, "--tracker", "127.0.0.1:1", "--key", "rpi4")
    assert_one_line_error(rc, err, "127.0.0.1:1", "tracker")


def test_bad_address_syntax(capsys, mlp_artifact):
    rc, err = run_cli(capsys, "run", mlp_artifact, "--rpc", "raspberrypi")
    assert_one_line_error(rc, err, "HOST:PORT")


def test_cross_compiled_artifact_refuses_to_run_here(capsys, tmp_path, mlp_file):
    out = tmp_path / "arm"
    assert main(["compile", str(mlp_file), "--target", "rpi4", "-o", str(out)]) == 0
    rc, err = run_cli(capsys, "run", out)
    assert_one_line_error(rc, err, "rpi4", "aarch64", "--rpc")


def test_board_file_missing_field(capsys, tmp_path, mlp_file, monkeypatch):
    (tmp_path / "myboard.toml").write_text('name = "myboard"\ndescription = "x"\narch = "aarch64"\n')
    monkeypatch.setenv("EDGETVM_BOARDS", str(tmp_path))
    rc, err = run_cli(capsys, "compile", mlp_file, "--target", "myboard", "-o", tmp_path / "out")
    assert_one_line_error(rc, err, "myboard.toml", "cross_compiler", "memory_mib")


def test_real_process_exits_2_without_traceback(tmp_path):
    """The installed console script, not just main(): exit status 2 and one line, no Python traceback."""
    exe = Path(sys.executable).with_name("edgetvm")
    proc = subprocess.run([str(exe), "compile", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "missing.onnx" in proc.stderr
