"""The classic model zoo as the onnx wheel ships it (`light_*`: IR version 3, every initializer also a
graph input) compiles for the host and for rpi4 and matches onnxruntime. The shipped models fill their
weights with ConstantOfShape; here those become random initializers, so a match means something."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgetvm.cli import main
from edgetvm.conformance import LIGHT, light_with_random_weights as with_random_weights
from edgetvm.runtime import emulated_board
from edgetvm.runtime.artifact import open_artifact

ALL = sorted(p.stem.removeprefix("light_") for p in LIGHT.glob("light_*.onnx"))
# Under 10 MiB of weights and 30 s each in the default run; the rest (AlexNet, ZFNet, VGG-19, ResNet-50:
# 100-550 MiB; DenseNet-121 and Inception v1: 50 and 36 s on an AMD EPYC) run with --runslow.
SMALL = ["squeezenet", "shufflenet", "inception_v2"]


def _data_input(model):
    inits = {t.name for t in model.graph.initializer}
    (vi,) = [i for i in model.graph.input if i.name not in inits]
    return vi.name, [d.dim_value for d in vi.type.tensor_type.shape.dim]


def _prepare(name, tmp_path):
    model = with_random_weights(name)
    assert model.ir_version < 4
    src = tmp_path / f"{name}.onnx"
    onnx.save(model, src)
    inp, shape = _data_input(model)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    want = sess.run(None, {inp: x})
    return src, inp, want


def _assert_matches(npz, want):
    got = np.load(npz)
    assert len(got.files) == len(want)
    for k, ref in zip(got.files, want):
        assert got[k].shape == ref.shape
        np.testing.assert_allclose(got[k], ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def _check_host(name, tmp_path):
    src, inp, want = _prepare(name, tmp_path)
    assert np.abs(want[0]).max() > 0  # random weights reach the output
    assert main(["compile", str(src), "-o", str(tmp_path / "host")]) == 0
    # Weights are weights: the only input is the image.
    assert [i.name for i in open_artifact(tmp_path / "host").inputs] == [inp]
    assert main(["run", str(tmp_path / "host"), "--input", f"{inp}={tmp_path / 'x.npy'}",
                 "--output", str(tmp_path / "y.npz"), "--repeat", "1"]) == 0
    _assert_matches(tmp_path / "y.npz", want)
    return src, inp, want


@pytest.mark.parametrize("name", SMALL)
def test_light_model_matches_onnxruntime_on_the_host(name, tmp_path):
    _check_host(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ALL) - set(SMALL)))
def test_large_light_model_matches_onnxruntime_on_the_host(name, tmp_path):
    _check_host(name, tmp_path)


def test_an_initializer_named_by_input_shape_is_an_input(tmp_path, capsys):
    """--input-shape turns an initializer listed as an input back into an input (its value a default)."""
    model = with_random_weights("squeezenet")
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    bias = next(t for t in model.graph.initializer if t.name == "conv10_b_0")
    assert main(["compile", str(src), "--input-shape", f"conv10_b_0:{bias.dims[0]}", "-o", str(tmp_path / "a")]) == 0
    assert sorted(i.name for i in open_artifact(tmp_path / "a").inputs) == ["conv10_b_0", "data_0"]


reason = emulated_board.board_unavailable_reason()


def _check_board(names, tmp_path):
    cases = []
    for name in names:
        d = tmp_path / name
        d.mkdir()
        src, inp, want = _prepare(name, d)
        assert main(["compile", str(src), "--target", "rpi4", "-o", str(d / "rpi4")]) == 0
        cases.append((d, inp, want))
    with emulated_board.EmulatedBoard() as board:
        for d, inp, want in cases:
            assert main(["run", str(d / "rpi4"), "--input", f"{inp}={d / 'x.npy'}", "--output", str(d / "y.npz"),
                         "--repeat", "1", "--rpc", f"127.0.0.1:{board.port}"]) == 0
            _assert_matches(d / "y.npz", want)


@pytest.mark.skipif(reason is not None, reason=f"emulated board unavailable: {reason}")
def test_light_squeezenet_for_rpi4_matches_onnxruntime_on_the_emulated_board(tmp_path):
    _check_board(["squeezenet"], tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(reason is not None, reason=f"emulated board unavailable: {reason}")
def test_every_light_model_for_rpi4_matches_onnxruntime_on_the_emulated_board(tmp_path):
    _check_board([n for n in ALL if n != "squeezenet"], tmp_path)
