"""Tensors numpy and TVM treat differently (0-d scalars, zero-sized dims, 1-element tensors, bool and
narrow dtypes, big-endian or non-contiguous .npy files) go through compile and run exactly, on the
host, under --memory-budget and on the emulated aarch64 board, or end in one clear line."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from edgetvm.cli import main
from edgetvm.runtime import emulated_board
from edgetvm.runtime.artifact import open_artifact, read_weights, write_weights


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                     [h.make_tensor_value_info(n, t, s) for n, t, s in outputs], list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)])


rng = np.random.default_rng(0)
F32 = np.float32

# name -> (model, inputs): each a graph an exporter writes for a scalar somewhere.
SCALAR_MODELS = {
    # A 0-d weight: the scale constant of a detection head.
    "weight": (_model([h.make_node("MatMul", ["x", "W"], ["t"]), h.make_node("Mul", ["t", "c"], ["y"])],
                      [("x", T.FLOAT, [2, 4])], [("y", T.FLOAT, [2, 3])],
                      [nh.from_array(rng.random((4, 3), F32), "W"), nh.from_array(np.array(2.5, F32), "c")]),
               {"x": rng.random((2, 4), F32)}),
    # A 0-d input.
    "input": (_model([h.make_node("Mul", ["x", "s"], ["y"])],
                     [("x", T.FLOAT, [2, 4]), ("s", T.FLOAT, [])], [("y", T.FLOAT, [2, 4])]),
              {"x": rng.random((2, 4), F32), "s": np.array(-1.75, F32)}),
    # A 0-d output: a loss or a score.
    "output": (_model([h.make_node("ReduceSum", ["x"], ["y"], keepdims=0)],
                      [("x", T.FLOAT, [3, 5])], [("y", T.FLOAT, [])]),
               {"x": rng.random((3, 5), F32)}),
    # A 0-d int64 input, as a sample rate or a step counter is.
    "int64_input": (_model([h.make_node("Cast", ["rate"], ["r"], to=T.FLOAT), h.make_node("Mul", ["x", "r"], ["y"])],
                           [("x", T.FLOAT, [2, 4]), ("rate", T.INT64, [])], [("y", T.FLOAT, [2, 4])]),
                    {"x": rng.random((2, 4), F32), "rate": np.array(16000, np.int64)}),
}


def _write(tmp_path, name, model, inputs):
    src = tmp_path / f"{name}.onnx"
    onnx.save(model, src)
    args = []
    for k, v in inputs.items():
        np.save(tmp_path / f"{name}.{k}.npy", v)
        args += ["--input", f"{k}={tmp_path / f'{name}.{k}.npy'}"]
    return src, args


def _reference(src, inputs):
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs)))


def _assert_same(npz, want):
    got = np.load(npz)
    assert sorted(got.files) == sorted(want)
    for k, ref in want.items():
        assert got[k].shape == ref.shape and got[k].dtype == ref.dtype, k
        np.testing.assert_allclose(got[k], ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("budget", [None, "2MiB"], ids=["in-memory", "memory-budget"])
@pytest.mark.parametrize("name", list(SCALAR_MODELS))
def test_scalar_tensors_match_onnxruntime_on_the_host(name, budget, tmp_path, capsys):
    model, inputs = SCALAR_MODELS[name]
    src, args = _write(tmp_path, name, model, inputs)
    art = tmp_path / "art"
    assert main(["compile", str(src), "-o", str(art)] + (["--memory-budget", budget] if budget else [])) == 0
    assert main(["run", str(art), *args, "--output", str(tmp_path / "y.npz"), "--repeat", "1"]) == 0, \
        capsys.readouterr().err
    _assert_same(tmp_path / "y.npz", _reference(src, inputs))
    # Random inputs of the declared shapes run too.
    assert main(["run", str(art), "--repeat", "1"]) == 0, capsys.readouterr().err


def test_a_scalar_weight_stays_0d_in_the_weight_file(tmp_path):
    arrays = [("c", np.array(2.5, F32)), ("e", np.zeros((0, 4), F32)), ("one", np.ones((1,), np.int8)),
              ("big_endian", np.arange(6, dtype=">f4").reshape(2, 3)), ("strided", np.arange(12, dtype=F32)[::2])]
    index = write_weights(tmp_path / "w.bin", arrays)
    back = read_weights(tmp_path / "w.bin", index)
    for (_, want), got in zip(arrays, back):
        assert got.shape == want.shape and got.dtype == want.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got, want)


def _odd_models():
    """Shapes and dtypes where numpy and TVM part ways."""
    u8 = rng.integers(0, 255, (2, 3)).astype(np.uint8)
    return {
        "zero_sized": (_model([h.make_node("Relu", ["x"], ["y"])], [("x", T.FLOAT, [0, 4])], [("y", T.FLOAT, [0, 4])]),
                       {"x": np.zeros((0, 4), F32)}),
        "one_element": (_model([h.make_node("Add", ["x", "b"], ["y"])], [("x", T.FLOAT, [1])], [("y", T.FLOAT, [1])],
                               [nh.from_array(np.array([0.5], F32), "b")]),
                        {"x": np.array([1.25], F32)}),
        "bool": (_model([h.make_node("Not", ["x"], ["y"])], [("x", T.BOOL, [2, 3])], [("y", T.BOOL, [2, 3])]),
                 {"x": rng.integers(0, 2, (2, 3)).astype(bool)}),
        "int8": (_model([h.make_node("Add", ["x", "x"], ["y"])], [("x", T.INT8, [2, 3])], [("y", T.INT8, [2, 3])]),
                 {"x": rng.integers(-60, 60, (2, 3)).astype(np.int8)}),
        "uint8": (_model([h.make_node("Cast", ["x"], ["f"], to=T.FLOAT), h.make_node("Mul", ["f", "k"], ["y"])],
                         [("x", T.UINT8, [2, 3])], [("y", T.FLOAT, [2, 3])],
                         [nh.from_array(np.array(1 / 255, F32), "k")]),
                  {"x": u8}),
        "float16": (_model([h.make_node("Mul", ["x", "x"], ["y"])], [("x", T.FLOAT16, [2, 3])], [("y", T.FLOAT16, [2, 3])]),
                    {"x": rng.random((2, 3)).astype(np.float16)}),
    }


@pytest.mark.parametrize("name", list(_odd_models()))
def test_odd_shapes_and_dtypes_match_onnxruntime_or_end_in_one_line(name, tmp_path, capsys):
    model, inputs = _odd_models()[name]
    src, args = _write(tmp_path, name, model, inputs)
    art = tmp_path / "art"
    rc = main(["compile", str(src), "-o", str(art)])
    if rc == 0:
        rc = main(["run", str(art), *args, "--output", str(tmp_path / "y.npz"), "--repeat", "1"])
    err = capsys.readouterr().err
    if rc == 0:
        _assert_same(tmp_path / "y.npz", _reference(src, inputs))
    else:
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("edgetvm: error:"), err


@pytest.mark.parametrize("layout", ["big_endian", "fortran", "strided_view"])
def test_npy_inputs_in_any_byte_order_and_layout_give_the_same_outputs(layout, tmp_path, capsys):
    model, inputs = SCALAR_MODELS["weight"]
    src, args = _write(tmp_path, "m", model, inputs)
    art = tmp_path / "art"
    assert main(["compile", str(src), "-o", str(art)]) == 0
    x = inputs["x"]
    odd = {"big_endian": x.astype(">f4"), "fortran": np.asfortranarray(x),
           "strided_view": np.repeat(x, 2, axis=1)[:, ::2]}[layout]
    assert np.array_equal(odd, x)
    np.save(tmp_path / "odd.npy", odd)
    assert main(["run", str(art), "--input", f"x={tmp_path / 'odd.npy'}", "--output", str(tmp_path / "y.npz"),
                 "--repeat", "1"]) == 0, capsys.readouterr().err
    _assert_same(tmp_path / "y.npz", _reference(src, inputs))


def test_a_scalar_where_an_array_is_expected_is_one_clear_line(tmp_path, capsys):
    model, inputs = SCALAR_MODELS["input"]
    src, _ = _write(tmp_path, "m", model, inputs)
    assert main(["compile", str(src), "-o", str(tmp_path / "art")]) == 0
    np.save(tmp_path / "x.npy", np.array(1.0, F32))
    np.save(tmp_path / "s.npy", np.array([1.0], F32))  # 1-d where the model takes a scalar
    rc = main(["run", str(tmp_path / "art"), "--input", f"x={tmp_path / 'x.npy'}", "--input", f"s={tmp_path / 's.npy'}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "float32[] (a scalar)" in err, err


board_reason = emulated_board.board_unavailable_reason()


@pytest.mark.skipif(board_reason is not None, reason=f"emulated board unavailable: {board_reason}")
def test_scalar_tensors_match_onnxruntime_on_the_emulated_aarch64_board(tmp_path, capsys):
    cases = []
    for name, (model, inputs) in SCALAR_MODELS.items():
        src, args = _write(tmp_path, name, model, inputs)
        assert main(["compile", str(src), "--target", "rpi4", "-o", str(tmp_path / name)]) == 0
        assert open_artifact(tmp_path / name).board["arch"] == "aarch64"
        cases.append((name, src, args, inputs))
    with emulated_board.EmulatedBoard() as board:
        for name, src, args, inputs in cases:
            rc = main(["run", str(tmp_path / name), *args, "--output", str(tmp_path / f"{name}.npz"),
                       "--repeat", "1", "--rpc", f"127.0.0.1:{board.port}"])
            assert rc == 0, (name, capsys.readouterr().err)
            _assert_same(tmp_path / f"{name}.npz", _reference(src, inputs))
