"""Boards are data: one TOML file each; adding a board is adding a file."""

import os

import pytest

from edgetvm.cli import main
from edgetvm.errors import UserError
from edgetvm.targets import list_boards, load_board

REQUIRED = {"host", "rpi4", "rpi3", "rpi2", "jetson-nano-cpu"}


def test_registry_has_the_required_boards():
    assert REQUIRED <= {b.name for b in list_boards()}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_board_gives_a_tvm_target_with_its_figures(name):
    b = load_board(name)
    t = b.target()
    assert str(t.kind) == "llvm"
    assert int(t.attrs["num-cores"]) == b.cores > 0
    assert b.memory_mib > 0 and b.peak_gflops > 0 and b.mem_bandwidth_gbs > 0
    if name != "host":
        assert b.cross_compiler.endswith("-g++")


def test_boards_cover_64_and_32_bit_arm():
    arches = {load_board(n).arch for n in REQUIRED}
    assert {"x86_64", "aarch64", "armv7l"} <= arches
    rpi2 = load_board("rpi2").target()
    assert str(rpi2.attrs["mfloat-abi"]) == "hard"


def test_host_board_reads_this_machine():
    b = load_board("host")
    assert b.cores == len(os.sched_getaffinity(0))
    assert b.tvm_target["mcpu"] not in ("auto", "native")
    assert b.runs_on_host()


def test_adding_a_board_is_adding_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "rock5b.toml").write_text((load_board("rpi4").path).read_text()
                                          .replace('name = "rpi4"', 'name = "rock5b"')
                                          .replace("cortex-a72", "cortex-a76")
                                          .replace("memory_mib = 4096", "memory_mib = 8192"))
    monkeypatch.setenv("EDGETVM_BOARDS", str(tmp_path))
    b = load_board("rock5b")
    assert b.memory_mib == 8192 and b.tvm_target["mcpu"] == "cortex-a76"
    assert main(["targets"]) == 0
    assert "rock5b" in capsys.readouterr().out


def test_board_file_named_differently_from_its_name_is_refused(tmp_path, monkeypatch):
    (tmp_path / "a.toml").write_text(load_board("rpi3").path.read_text())
    monkeypatch.setenv("EDGETVM_BOARDS", str(tmp_path))
    with pytest.raises(UserError, match="must match the file name"):
        load_board("a")


def test_targets_command_lists_every_board(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED:
        assert name in out


def test_roofline_counts_a_gemm_and_scales_with_the_board():
    """2*M*N*K flops for a matmul; a board with half the compute gets twice the compute-bound time."""
    from dataclasses import replace

    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    from edgetvm.costmodels import roofline
    from edgetvm.passes import onnx_import, pipeline

    m, k, n = 64, 512, 256
    w = numpy_helper.from_array(np.ones((k, n), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    mod, _ = onnx_import.import_onnx(model, onnx_import.resolve_inputs(model, None))
    _, deploy = pipeline.lift_weight_transforms(mod)
    rpi4 = load_board("rpi4")
    costs = roofline.kernel_costs(pipeline.fuse(deploy, rpi4.target()))
    assert len(costs) == 1
    assert costs[0].flops == 2 * m * n * k
    assert costs[0].bytes == 4 * (m * k + k * n + m * n)
    slow = replace(rpi4, peak_gflops_per_core=rpi4.peak_gflops_per_core / 2)
    assert roofline.bound_seconds(costs, slow) == pytest.approx(2 * roofline.bound_seconds(costs, rpi4))
