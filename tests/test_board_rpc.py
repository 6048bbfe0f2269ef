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


@pytest.mark.slow
def test_neon_conv_schedules_compute_on_the_board_what_the_host_computes(tmp_path):
    """The aarch64 conv schedules run on the (emulated) board: a 3x3 conv whose register tile spans 2
    output channels x 4 rows x 8 columns (16 of NEON's 32 registers), and a 4x4-row conv run directly
    with its output channels innermost; outputs equal TVM's own conv on the host to 1e-5."""
    import tvm
    from tvm import relax, s_tir

    from edgetvm.passes import pipeline
    from edgetvm.targets import load_board

    x = relax.Var("x", relax.TensorType([1, 16, 16, 16], "float32"))
    w1 = relax.Var("w1", relax.TensorType([32, 16, 3, 3], "float32"))
    w2 = relax.Var("w2", relax.TensorType([32, 32, 3, 3], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w1, w2], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, w1, padding=1)))
            y = bb.emit(relax.op.nn.max_pool2d(y, 4, strides=4))  # 4x4 rows for the next conv
            y = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(y, w2, padding=1))))
        bb.emit_func_output(y)
    mod = bb.get()
    rng = np.random.default_rng(0)
    args = [rng.standard_normal([int(s) for s in p.ty.shape], "float32") for p in mod["main"].params]
    want = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())["main"](
        *[tvm.runtime.tensor(a) for a in args]).numpy()

    board = load_board("rpi4")
    transform, deploy = pipeline.lift_weight_transforms(mod)
    fused = pipeline.fuse(deploy, board.target())
    kernels = {gv.name_hint: f for gv, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert any(k.startswith("conv_nhwo") for k in kernels)
    conv = next(f for k, f in kernels.items() if k.startswith("fused_conv2d"))
    sch = s_tir.Schedule(conv)
    loops = [sch.get(lp) for lp in sch.get_loops(sch.get_sblock("conv2d_nchw_update"))]
    assert [int(lp.extent) for lp in loops if lp.kind == tvm.tirx.ForKind.UNROLLED] == [2, 4]
    weights = pipeline.transform_weights(transform, args[1:])
    lib = tmp_path / "convs.so"
    pipeline.export(pipeline.finish(fused, board.target()), str(lib), board.cross_compiler)
    with emulated_board.EmulatedBoard() as b:
        from tvm import rpc

        remote = rpc.connect("127.0.0.1", b.port)
        remote.upload(str(lib))
        dev = remote.cpu()
        vm = relax.VirtualMachine(remote.load_module(lib.name), dev)
        got = vm["main"](*[tvm.runtime.tensor(a, device=dev) for a in [args[0], *weights]]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
