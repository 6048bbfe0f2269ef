"""TFLite models compile, tune, swap and run like ONNX ones.

`edgetvm compile model.tflite` checks the flatbuffer, imports it with TVM's TFLite frontend, turns the
constants that frontend embeds into weights, and then runs the passes an ONNX import gets. Every output is
checked against LiteRT (ai-edge-litert, the reference TFLite runtime) on the same input, here and on the
emulated aarch64 board. The real models are mediapipe's pretrained ones (edgetvm/tflite_models.py: face,
hand, palm, pose, iris; fp16 weights behind DEQUANTIZE, sparse ones behind DENSIFY); small dense models
written here with LiteRT's flatbuffer schema cover the rest. A model that is not TFLite, or that uses an
operator TVM's frontend lacks, ends in one line naming the problem, and exit code 2.
"""

import json
import shutil

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as tfl
from ai_edge_litert.interpreter import Interpreter

from edgetvm import tflite_models
from edgetvm.cli import main
from edgetvm.passes import model_import, tflite_import
from edgetvm.runtime import emulated_board
from edgetvm.runtime.artifact import open_artifact

# Every mediapipe model whose operators TVM's frontend converts; the other three use mediapipe's own
# custom operators, which LiteRT cannot run either without mediapipe's kernels.
MATCHING = ["face_detection_short_range", "face_detection_full_range_sparse", "face_landmark",
            "hand_landmark_full", "hand_landmark_lite", "hand_recrop", "iris_landmark", "palm_detection_full",
            "palm_detection_lite", "pose_detection", "pose_landmark_full"]
CUSTOM = {"face_landmark_with_attention": "Landmarks2TransformMatrix",
          "selfie_segmentation": "Convolution2DTransposeBias",
          "selfie_segmentation_landscape": "Convolution2DTransposeBias"}
# CI's share: fp16 weights behind DEQUANTIZE (both), sparse fp16 weights behind DENSIFY (pose_detection).
ON_HOST = ["pose_detection"]
ON_BOARD = ["face_detection_short_range"]


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


def litert(model: bytes, inputs: dict) -> dict:
    """The reference: LiteRT's outputs by name."""
    it = Interpreter(model_content=model)
    it.allocate_tensors()
    for d in it.get_input_details():
        it.set_tensor(d["index"], inputs[d["name"]])
    it.invoke()
    return {d["name"]: it.get_tensor(d["index"]) for d in it.get_output_details()}


def assert_matches(npz, want: dict):
    got = np.load(npz)
    assert sorted(got.files) == sorted(want)
    for name, ref in want.items():
        assert got[name].shape == ref.shape, name
        # fp32 sums in another order through 20-80 layers, relative to the output's magnitude: LiteRT's own
        # XNNPACK and reference kernels differ by 5e-4 of it on pose_landmark_full's segmentation logits.
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-3 * max(1.0, float(np.abs(ref).max())),
                                   err_msg=name)


def image_input(src):
    it = Interpreter(model_path=str(src))
    (d,) = it.get_input_details()
    return d["name"], np.random.default_rng(0).uniform(-1, 1, d["shape"]).astype(np.float32)


# ----------------------------------------------------------------------------- small models written here


def dense_tflite(widths=(64, 32, 16), batch=4, fp16=False, custom=None, seed=0) -> bytes:
    """x[batch, widths[0]] -> FULLY_CONNECTED layers (ReLU between) -> y, as the TFLite converter writes
    them: fp16 weights behind DEQUANTIZE if asked, then an optional custom operator."""
    rng = np.random.default_rng(seed)
    buffers, tensors, codes, ops = [tfl.BufferT()], [], {}, []

    def tensor(name, shape, value=None, kind=tfl.TensorType.FLOAT32):
        t = tfl.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), kind, 0
        if value is not None:
            b = tfl.BufferT()
            b.data = np.frombuffer(value.tobytes(), np.uint8).tolist()
            buffers.append(b)
            t.buffer = len(buffers) - 1
        tensors.append(t)
        return len(tensors) - 1

    def op(builtin, ins, outs, options=None, custom_code=None):
        key = (builtin, custom_code)
        if key not in codes:
            c = tfl.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode, c.version = builtin, min(builtin, 127), 1
            c.customCode = custom_code
            codes[key] = c
        o = tfl.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = list(codes).index(key), ins, outs
        if options is not None:
            o.builtinOptionsType, o.builtinOptions = tfl.BuiltinOptions.FullyConnectedOptions, options
        ops.append(o)

    x = h = tensor("x", (batch, widths[0]))
    layers = list(zip(widths[:-1], widths[1:]))
    for i, (k, n) in enumerate(layers):
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        if fp16:
            packed = tensor(f"w{i}_fp16", (n, k), w.astype(np.float16), tfl.TensorType.FLOAT16)
            wt = tensor(f"w{i}", (n, k))
            op(tfl.BuiltinOperator.DEQUANTIZE, [packed], [wt])
        else:
            wt = tensor(f"w{i}", (n, k), w)
        bt = tensor(f"b{i}", (n,), (rng.standard_normal(n) * 0.1).astype(np.float32))
        out = tensor("y" if i == len(layers) - 1 and not custom else f"h{i}", (batch, n))
        options = tfl.FullyConnectedOptionsT()
        options.fusedActivationFunction = tfl.ActivationFunctionType.RELU if i < len(layers) - 1 else 0
        op(tfl.BuiltinOperator.FULLY_CONNECTED, [h, wt, bt], [out], options)
        h = out
    if custom:
        y = tensor("y", (batch, widths[-1]))
        op(tfl.BuiltinOperator.CUSTOM, [h], [y], custom_code=custom)
        h = y
    g = tfl.SubGraphT()
    g.tensors, g.inputs, g.outputs, g.operators, g.name = tensors, [x], [h], ops, "main"
    m = tfl.ModelT()
    m.version, m.subgraphs, m.operatorCodes, m.buffers = 3, [g], list(codes.values()), buffers
    m.description = "dense layers written by tests/test_tflite.py"
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


@pytest.fixture
def dense(tmp_path):
    """A small fp16 dense model, an input and LiteRT's outputs for it."""
    model = dense_tflite(fp16=True)
    src = tmp_path / "dense.tflite"
    src.write_bytes(model)
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return src, tmp_path / "x.npy", litert(model, {"x": x})


# ----------------------------------------------------------------------------- compile and run


def test_weights_become_parameters_and_fp16_weights_are_widened_at_compile_time(dense, tmp_path, capsys):
    src, x, want = dense
    rc, out, err = run_cli(capsys, "compile", src, "-o", tmp_path / "art")
    assert rc == 0, err
    art = open_artifact(tmp_path / "art")
    assert [(i.name, i.shape, i.dtype) for i in art.inputs] == [("x", (4, 64), "float32")]  # weights are not inputs
    weights = art.manifest["weights"]
    # DEQUANTIZE (and FULLY_CONNECTED's transpose) ran once, on the host: the board maps two float32
    # matrices and two biases, and never converts them.
    assert sorted((w["dtype"], tuple(w["shape"])) for w in weights) == \
        [("float32", (16,)), ("float32", (32,)), ("float32", (32, 16)), ("float32", (64, 32))]
    assert run_cli(capsys, "run", tmp_path / "art", "--input", f"x={x}", "--output", tmp_path / "y.npz",
                   "--repeat", "1")[0] == 0
    assert_matches(tmp_path / "y.npz", want)


def test_a_tflite_file_is_recognised_by_its_content_whatever_its_name(dense, tmp_path, capsys):
    src, x, want = dense
    renamed = tmp_path / "model.bin"
    shutil.copy(src, renamed)
    model, inputs = model_import.prepare(renamed)
    assert isinstance(model, tflite_import.TFLiteModel) and [i.name for i in inputs] == ["x"]
    rc, _, err = run_cli(capsys, "compile", renamed, "-o", tmp_path / "art")
    assert rc == 0, err
    assert open_artifact(tmp_path / "art").manifest["model"]["source"] == "model.bin"


def test_memory_budget_swaps_a_tflite_model_in_blocks(tmp_path, capsys):
    """Eight 512x512 layers (8 MiB of weights) under a 4 MiB budget: several blocks, same outputs."""
    model = dense_tflite(widths=(512,) * 9, batch=1)
    src = tmp_path / "stack.tflite"
    src.write_bytes(model)
    x = np.random.default_rng(2).standard_normal((1, 512)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    rc, _, err = run_cli(capsys, "compile", src, "--memory-budget", "4MiB", "-o", tmp_path / "art")
    assert rc == 0, err
    assert len(open_artifact(tmp_path / "art").manifest["swap"]["blocks"]) > 1
    assert run_cli(capsys, "run", tmp_path / "art", "--input", f"x={tmp_path / 'x.npy'}", "--output",
                   tmp_path / "y.npz", "--repeat", "1")[0] == 0
    assert_matches(tmp_path / "y.npz", litert(model, {"x": x}))


def test_tune_then_compile_with_the_database(dense, tmp_path, capsys):
    src, x, want = dense
    rc, out, err = run_cli(capsys, "tune", src, "--trials", "2", "--trials-per-batch", "2", "-o", tmp_path / "db",
                           "--no-progress")
    assert rc == 0, err
    ident = json.loads((tmp_path / "db" / "edgetvm-tuning.json").read_text())
    assert ident["model"]["name"] == "dense.tflite" and ident["inputs"][0]["shape"] == [4, 64]
    rc, _, err = run_cli(capsys, "compile", src, "--tuning-db", tmp_path / "db", "-o", tmp_path / "art")
    assert rc == 0, err
    assert run_cli(capsys, "run", tmp_path / "art", "--input", f"x={x}", "--output", tmp_path / "y.npz",
                   "--repeat", "1")[0] == 0
    assert_matches(tmp_path / "y.npz", want)


def check_on_host(name, tmp_path):
    src = tflite_models.path(name)
    inp, x = image_input(src)
    np.save(tmp_path / "x.npy", x)
    want = litert(src.read_bytes(), {inp: x})
    assert main(["compile", str(src), "-o", str(tmp_path / "host")]) == 0
    assert [i.name for i in open_artifact(tmp_path / "host").inputs] == [inp]
    assert main(["run", str(tmp_path / "host"), "--input", f"{inp}={tmp_path / 'x.npy'}", "--output",
                 str(tmp_path / "y.npz"), "--repeat", "1"]) == 0
    assert_matches(tmp_path / "y.npz", want)


@pytest.mark.parametrize("name", ON_HOST)
def test_mediapipe_model_matches_litert_on_the_host(name, tmp_path):
    check_on_host(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(MATCHING) - set(ON_HOST)))
def test_every_other_mediapipe_model_matches_litert_on_the_host(name, tmp_path):
    check_on_host(name, tmp_path)


reason = emulated_board.board_unavailable_reason()


def check_on_board(names, tmp_path):
    cases = []
    for name in names:
        d = tmp_path / name
        d.mkdir()
        src = tflite_models.path(name)
        inp, x = image_input(src)
        np.save(d / "x.npy", x)
        assert main(["compile", str(src), "--target", "rpi4", "-o", str(d / "rpi4")]) == 0
        cases.append((d, inp, litert(src.read_bytes(), {inp: x})))
    with emulated_board.EmulatedBoard() as board:
        for d, inp, want in cases:
            assert main(["run", str(d / "rpi4"), "--input", f"{inp}={d / 'x.npy'}", "--output", str(d / "y.npz"),
                         "--repeat", "1", "--rpc", f"127.0.0.1:{board.port}"]) == 0
            assert_matches(d / "y.npz", want)


@pytest.mark.skipif(reason is not None, reason=f"emulated board unavailable: {reason}")
def test_mediapipe_model_for_rpi4_matches_litert_on_the_emulated_board(tmp_path):
    check_on_board(ON_BOARD, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(reason is not None, reason=f"emulated board unavailable: {reason}")
def test_every_mediapipe_model_for_rpi4_matches_litert_on_the_emulated_board(tmp_path):
    check_on_board(sorted(set(MATCHING) - set(ON_BOARD)), tmp_path)


# ----------------------------------------------------------------------------- bad input: one line, exit 2


@pytest.mark.parametrize("name", sorted(CUSTOM))
def test_a_mediapipe_custom_operator_is_named_in_one_line(name, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "compile", tflite_models.path(name), "-o", tmp_path / "art")
    assert_one_line_error(rc, err, f"custom operator {CUSTOM[name]}", "TVM's TFLite importer")
    assert not (tmp_path / "art").exists()


def test_a_custom_operator_is_named_with_the_tensor_it_writes(tmp_path, capsys):
    src = tmp_path / "custom.tflite"
    src.write_bytes(dense_tflite(custom="MyPostProcess"))
    rc, _, err = run_cli(capsys, "compile", src, "-o", tmp_path / "art")
    assert_one_line_error(rc, err, "custom operator MyPostProcess", "output 'y'")


def test_missing_tflite_file(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "compile", tmp_path / "nope.tflite", "-o", tmp_path / "art")
    assert_one_line_error(rc, err, "does not exist", ".tflite")


@pytest.mark.parametrize("content", [b"", b"TFL3", b"\x00" * 64, b"this is a text file, not a model\n",
                                     bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))],
                         ids=["empty", "identifier-only", "zeros", "text", "random"])
def test_a_tflite_file_that_is_not_one(content, tmp_path, capsys):
    src = tmp_path / "model.tflite"
    src.write_bytes(content)
    rc, _, err = run_cli(capsys, "compile", src, "-o", tmp_path / "art")
    assert_one_line_error(rc, err, str(src))
    assert "TFLite" in err and not (tmp_path / "art").exists()


def test_an_onnx_file_named_tflite_is_not_tflite(tmp_path, capsys):
    from edgetvm import zoo

    src = tmp_path / "mlp.tflite"
    shutil.copy(zoo.path("mlp", tmp_path), src)
    rc, _, err = run_cli(capsys, "compile", src, "-o", tmp_path / "art")
    assert_one_line_error(rc, err, "is not a TFLite model")


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.6, 0.97])
def test_a_truncated_tflite_file(fraction, tmp_path, capsys):
    data = tflite_models.path("iris_landmark").read_bytes()
    src = tmp_path / "cut.tflite"
    src.write_bytes(data[: int(len(data) * fraction)])
    rc, _, err = run_cli(capsys, "compile", src, "-o", tmp_path / "art")
    assert_one_line_error(rc, err, str(src))
    assert "truncated" in err or "damaged" in err


def test_damaged_tflite_files_end_in_one_line_never_a_traceback(tmp_path):
    """Flipped, cut and inserted bytes in a model: prepare and import either work or raise UserError."""
    from edgetvm.errors import UserError

    base = dense_tflite()
    rng = np.random.default_rng(0)
    src = tmp_path / "m.tflite"
    outcomes = {"ok": 0, "refused": 0}
    for i in range(150):
        data = bytearray(base)
        if i % 3 == 0:
            data = data[: int(rng.integers(8, len(data)))]
        elif i % 3 == 1:
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(8, len(data)))] = int(rng.integers(0, 256))
        else:
            at = int(rng.integers(8, len(data)))
            data[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        src.write_bytes(bytes(data))
        try:
            model_import.import_model(*model_import.prepare(src))
            outcomes["ok"] += 1
        except UserError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0


def test_input_shape_must_be_the_one_stored_in_the_model(dense, tmp_path, capsys):
    src, _, _ = dense
    rc, _, err = run_cli(capsys, "compile", src, "--input-shape", "x:8,64", "-o", tmp_path / "art")
    assert_one_line_error(rc, err, "x:8,64", "4x64", "convert it again")
    rc, _, err = run_cli(capsys, "compile", src, "--input-shape", "image:4,64", "-o", tmp_path / "art")
    assert_one_line_error(rc, err, "'image'", "its inputs are: x")
    # The stored shape itself is accepted.
    model, inputs = model_import.prepare(src, {"x": (4, 64)})
    assert inputs[0].shape == (4, 64)
