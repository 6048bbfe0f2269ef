"""A cross-compiled Relax module runs on the emulated aarch64 board, directly and via a tracker."""

import numpy as np
import pytest
import tvm
from tvm import relax, rpc
from tvm.script import ir as I
from tvm.script import relax as R

from edgetvm.runtime import emulated_board as eb

pytestmark = pytest.mark.skipif(
    (reason := eb.board_unavailable_reason()) is not None, reason=f"emulated board: {reason}"
)

AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
KEY = "emulated-a64"


@I.ir_module
class MatmulRelu:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 16), "float32")):
        with R.dataflow():
            y = R.nn.relu(R.matmul(x, w))
            R.output(y)
        return y


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 8), "float32"), rng.standard_normal((8, 16), "float32")


@pytest.fixture(scope="module")
def expected(inputs):
    vm = relax.VirtualMachine(tvm.compile(MatmulRelu, target="llvm"), tvm.cpu())
    return vm["main"](*map(tvm.runtime.tensor, inputs)).numpy()


@pytest.fixture(scope="module")
def lib_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("a64") / "matmul_relu.so"
    tvm.compile(MatmulRelu, target=AARCH64).export_library(
        str(path), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++")
    )
    return path


@pytest.fixture(scope="module")
def board():
    with eb.EmulatedBoard() as b:
        yield b


@pytest.fixture(scope="module")
def tracker():
    with eb.RPCTracker() as t:
        yield t


@pytest.fixture(scope="module")
def tracked_board(tracker):
    with eb.EmulatedBoard(tracker=tracker, key=KEY) as b:
        yield b


def run_remote(remote, lib_path, inputs):
    remote.upload(str(lib_path))
    dev = remote.cpu()
    vm = relax.VirtualMachine(remote.load_module(lib_path.name), dev)
    return vm["main"](*(tvm.runtime.tensor(a, device=dev) for a in inputs)).numpy()


def test_direct_rpc(board, lib_path, inputs, expected):
    out = run_remote(rpc.connect(board.host, board.port), lib_path, inputs)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    assert expected.max() > 0 and expected.min() == 0  # relu really clipped something


def test_tracker_rpc(tracker, tracked_board, lib_path, inputs, expected):
    remote = rpc.connect_tracker(tracker.host, tracker.port).request(KEY, session_timeout=120)
    out = run_remote(remote, lib_path, inputs)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_random_fill_is_loaded(board):
    # MetaSchedule's RPCRunner fills its inputs with this; it lives in libtvm_runtime_extra.so.
    remote = rpc.connect(board.host, board.port)
    dev = remote.cpu()
    t = tvm.runtime.tensor(np.zeros(64, "float32"), device=dev)
    remote.get_function("tvm.contrib.random.random_fill")(t)
    assert np.any(t.numpy() != 0)


def test_stop_frees_the_port():
    with eb.EmulatedBoard() as first:
        port = first.port
    with eb.EmulatedBoard(port=port) as second:
        assert rpc.connect(second.host, second.port).cpu().exist
