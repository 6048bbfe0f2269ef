"""A model cross-compiled for rpi4 runs on an emulated aarch64 board through `edgetvm run --rpc` and `--tracker`."""

import numpy as np
import pytest

from edgetvm import zoo
from edgetvm.cli import main
from edgetvm.compiler import random_inputs
from edgetvm.runtime import emulated_board
from edgetvm.runtime.artifact import open_artifact

reason = emulated_board.board_unavailable_reason()
pytestmark = pytest.mark.skipif(reason is not None, reason=f"emulated board unavailable: {reason}")

MODEL = "ocr_cls"  # the real pretrained MobileNetV3


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    d = tmp_path_factory.mktemp("rpc")
    shape = ",".join(map(str, zoo.default_input_shapes(MODEL)["x"]))
    for board in ("host", "rpi4"):
        assert main(["compile", str(zoo.path(MODEL)), "--target", board, "--input-shape", f"x:{shape}",
                     "-o", str(d / board)]) == 0
    x = random_inputs(open_artifact(d / "host").inputs, seed=7)["x"]
    np.save(d / "x.npy", x)
    assert main(["run", str(d / "host"), "--input", f"x={d / 'x.npy'}", "--output", str(d / "host.npz"),
                 "--repeat", "2"]) == 0
    return d


def _assert_matches_host(d, npz):
    host, board = np.load(d / "host.npz"), np.load(npz)
    assert set(host.files) == set(board.files)
    for k in host.files:
        np.testing.assert_allclose(board[k], host[k], rtol=0, atol=1e-5)


def test_run_over_direct_rpc(builds, tmp_path, capsys):
    with emulated_board.EmulatedBoard() as board:
        rc = main(["run", str(builds / "rpi4"), "--input", f"x={builds / 'x.npy'}",
                   "--output", str(tmp_path / "y.npz"), "--repeat", "2", "--rpc", f"127.0.0.1:{board.port}"])
    assert rc == 0, capsys.readouterr().err
    assert f"on 127.0.0.1:{board.port}" in capsys.readouterr().out
    _assert_matches_host(builds, tmp_path / "y.npz")


def test_run_through_tracker_with_key(builds, tmp_path, capsys):
    with emulated_board.RPCTracker() as tracker, \
            emulated_board.EmulatedBoard(tracker=tracker, key="rpi4-emu"):
        # A key nobody registered is refused at once instead of waiting forever in the tracker's queue.
        rc = main(["run", str(builds / "rpi4"), "--tracker", tracker.address, "--key", "rpi5"])
        assert rc == 2 and "rpi4-emu" in capsys.readouterr().err
        rc = main(["run", str(builds / "rpi4"), "--input", f"x={builds / 'x.npy'}",
                   "--output", str(tmp_path / "y.npz"), "--repeat", "2",
                   "--tracker", tracker.address, "--key", "rpi4-emu"])
    assert rc == 0, capsys.readouterr().err
    _assert_matches_host(builds, tmp_path / "y.npz")
