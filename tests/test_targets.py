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
