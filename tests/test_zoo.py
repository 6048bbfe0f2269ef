"""The zoo's models load, pass the ONNX checker, and after fold_shapes (an exact rewrite) import
into Relax. Compiling every zoo model through edgetvm and comparing with onnxruntime is
tests/test_compile_run.py's job; here only the small fold_shapes cases run through TVM.

Tolerance: fp32 throughout. TVM and onnxruntime sum in different orders (and onnxruntime fuses
Conv+BN, MatMul+Add), each rounding step costs up to 2**-24 relative, and the deepest models here
(PP-OCRv4 det: ~60 convs, rec: 6625-way softmax) showed at most ~3e-5 absolute on outputs of
size O(1) (softmax/sigmoid probabilities or O(1) activations by construction). rtol = atol = 1e-4
leaves ~3x margin over that and is still far below what a real mistake (a wrong layout, a
dropped bias or BatchNorm term) does to O(1) outputs.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from edgetvm import zoo
from edgetvm.errors import UserError
from edgetvm.passes.onnx_fold import fold_shapes

RTOL = ATOL = 1e-4
# Smaller inputs than the defaults, for speed. Most of the time here is LLVM turning the
# kernels into machine code, which happens when the VirtualMachine is created, not in
# tvm.compile, and grows with the loop extents: PP-OCRv4 rec at 48x320 spends ~25 s on one
# depthwise-conv kernel alone (~2.5 min for the model on 2 busy cores), at 48x64 ~8 s in all.
# The detector is fully convolutional (H, W multiples of 32); the recognizer's width only sets
# the sequence length (W / 8). The default shapes run in the slow tests below.
TEST_SHAPES = {"ocr_det": {"x": (1, 3, 64, 128)}, "ocr_rec": {"x": (1, 3, 48, 64)}}
# The default dense_stack is 288 MiB: every copy of it costs seconds. Same builder, smaller.
TEST_KWARGS = {"dense_stack": {"n": 3, "d": 1024}}


def _ort(model: onnx.ModelProto, feeds: dict, optimize: bool = True) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if not optimize:  # run the graph as written, so two graphs can be compared bit for bit
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _tvm_run(model: onnx.ModelProto, shapes: dict, feeds: dict) -> np.ndarray:
    mod = from_onnx(model, shape_dict=shapes, keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    target = tvm.target.Target({"kind": "llvm"})
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(feeds[k]) for k in shapes] + list(params.get("main", []))
    out = vm["main"](*args)
    return (out if isinstance(out, tvm.runtime.Tensor) else out[0]).numpy()


def _needs(name: str):
    if not zoo.available(name):
        pytest.skip(f"{name}: pip install --no-deps rapidocr-onnxruntime")


# ------------------------------------------------------------------------------ the zoo


def test_registry():
    names = [n for n, _ in zoo.list_models()]
    assert names == list(zoo.MODELS)
    assert {"ocr_cls", "ocr_det", "ocr_rec", "mlp", "cnn", "resnet", "transformer",
            "dense_stack", "vgg"} <= set(names)
    for name, desc in zoo.list_models():
        assert desc and "\n" not in desc
        shapes = zoo.default_input_shapes(name)
        assert shapes and all(all(d > 0 for d in s) for s in shapes.values())
    assert zoo.default_input_shapes("ocr_cls") == {"x": (1, 3, 48, 192)}
    assert zoo.default_input_shapes("dense_stack", d=512) == {"x": (1, 512)}
    with pytest.raises(UserError, match="no zoo model named"):
        zoo.load("nope")


def test_missing_rapidocr_names_the_install_command(monkeypatch):
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as e:
        zoo.load("ocr_cls")
    msg = str(e.value)
    assert "pip install --no-deps rapidocr-onnxruntime" in msg and "\n" not in msg
    assert not zoo.available("ocr_det")
    assert zoo.available("mlp")


def test_generated_models_are_deterministic_and_cached(tmp_path):
    a = zoo.load("cnn").SerializeToString()
    assert a == zoo.load("cnn").SerializeToString()
    p = zoo.path("dense_stack", tmp_path, n=2, d=64)
    assert p.parent == tmp_path and p.exists()
    assert zoo.path("dense_stack", tmp_path, n=2, d=64) == p
    m = onnx.load(str(p))
    assert m.SerializeToString() == zoo.load("dense_stack", n=2, d=64).SerializeToString()
    assert len(m.graph.initializer) == 4
    assert zoo.load("vgg", width=0.5).graph.initializer[0].dims[0] == 32


def test_pretrained_path_points_into_the_installed_package():
    _needs("ocr_cls")
    p = zoo.path("ocr_cls")
    assert "rapidocr_onnxruntime" in p.parts and p.name.endswith(".onnx")


def test_dense_stack_default():
    m = zoo.load("dense_stack")
    weights = [t for t in m.graph.initializer if len(t.dims) == 2]
    assert [tuple(t.dims) for t in weights] == [(3072, 3072)] * 8
    assert sum(len(t.raw_data) for t in weights) == 288 * 2**20
    assert zoo.default_input_shapes("dense_stack") == {"x": (1, 3072)}


def _check_model(name: str, record_property=None, shapes=None, **kw):
    model = zoo.load(name, **kw)
    onnx.checker.check_model(model, full_check=True)
    shapes = shapes or zoo.default_input_shapes(name, **kw)
    feeds = zoo.sample_inputs(name, shapes=shapes)

    folded = fold_shapes(model, shapes)
    onnx.checker.check_model(folded, full_check=True)
    ops = collections.Counter(n.op_type for n in folded.graph.node)
    assert ops["Shape"] == 0 and ops["Size"] == 0
    # The rewrite is exact: the same graph evaluated as written gives the same bits.
    ref, = _ort(model, feeds)
    for a, b in zip(_ort(model, feeds, optimize=False), _ort(folded, feeds, optimize=False)):
        np.testing.assert_array_equal(a, b)

    mod = from_onnx(folded, shape_dict=shapes, keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    assert params.get("main"), "the weights should be parameters, not constants baked into the module"


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_model_folds_exactly_and_imports(name, record_property):
    _needs(name)
    _check_model(name, record_property, TEST_SHAPES.get(name), **TEST_KWARGS.get(name, {}))


# ------------------------------------------------------------------------- fold_shapes


def _paddle_reshape_model() -> onnx.ModelProto:
    """The MobileNetV3 head as Paddle exports it: the Reshape target is computed as
    Shape -> Cast(int32) -> Slice -> Cast(int64) -> Concat, which the importer rejects."""
    def const(name, vals, dt=TensorProto.INT64):
        return helper.make_node("Constant", [], [name],
                                value=helper.make_tensor(name, dt, [len(vals)], vals))
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("Shape", ["p"], ["s"]),
        helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
        const("axes", [0]), const("st", [0]), const("en", [1]),
        helper.make_node("Slice", ["s32", "st", "en", "axes"], ["n32"]),
        helper.make_node("Cast", ["n32"], ["n"], to=TensorProto.INT64),
        const("rest", [-1]),
        helper.make_node("Concat", ["n", "rest"], ["shape"], axis=-1),
        helper.make_node("Reshape", ["p", "shape"], ["flat"]),
        # a weight held in a Constant node, reshaped at run time as Paddle does with biases
        const("w", [0.5 * i - 3 for i in range(24)], TensorProto.FLOAT), const("wshape", [8, 3]),
        helper.make_node("Reshape", ["w", "wshape"], ["w2"]),
        helper.make_node("MatMul", ["flat", "w2"], ["y"]),
    ]
    g = helper.make_graph(nodes, "paddle_head",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m


def test_fold_shapes_removes_shape_nodes_and_preserves_outputs():
    model = _paddle_reshape_model()
    shapes = {"x": (2, 8, 4, 4)}
    with pytest.raises(Exception, match="Reshape requires the input new shape to be Shape"):
        from_onnx(model, shape_dict=shapes, keep_params_in_input=True)

    folded = fold_shapes(model, shapes)
    onnx.checker.check_model(folded, full_check=True)
    ops = collections.Counter(n.op_type for n in folded.graph.node)
    assert ops == {"GlobalAveragePool": 1, "Constant": 1, "Reshape": 1, "MatMul": 1}, ops
    assert [i.name for i in folded.graph.initializer] == ["w2"]  # the folded weight, lifted
    dims = [d.dim_value for d in folded.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [2, 3]
    assert any(n.op_type == "Shape" for n in model.graph.node)  # the input is left alone

    feeds = {"x": np.random.default_rng(0).standard_normal((2, 8, 4, 4), dtype=np.float32)}
    ref, = _ort(model, feeds, optimize=False)
    np.testing.assert_array_equal(_ort(folded, feeds, optimize=False)[0], ref)
    np.testing.assert_allclose(_tvm_run(folded, shapes, feeds), ref, rtol=RTOL, atol=ATOL)


def test_fold_shapes_on_the_real_classifier():
    _needs("ocr_cls")
    model = zoo.load("ocr_cls")
    folded = fold_shapes(model, zoo.default_input_shapes("ocr_cls"))
    before = collections.Counter(n.op_type for n in model.graph.node)
    after = collections.Counter(n.op_type for n in folded.graph.node)
    assert before["Shape"] == 1 and after["Shape"] == 0
    assert after["Slice"] == after["Concat"] == after["Cast"] == 0
    assert len(model.graph.initializer) == 0 and len(folded.graph.initializer) > 100
    assert all(n.attribute[0].t.data_type != TensorProto.FLOAT or
               np.prod(n.attribute[0].t.dims) <= 1
               for n in folded.graph.node if n.op_type == "Constant")


def test_fold_shapes_leaves_heavy_weight_compute_alone():
    rng = np.random.default_rng(0)
    big = rng.standard_normal((128, 256), dtype=np.float32)    # 128 KiB: over the 64 KiB limit
    small = rng.standard_normal((4, 128), dtype=np.float32)    # 2 KiB
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"]),
             helper.make_node("MatMul", ["x", "Wt"], ["h"]),
             helper.make_node("Transpose", ["V"], ["Vt"]),
             helper.make_node("MatMul", ["h", "Vt"], ["y"])]
    g = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[onnx.numpy_helper.from_array(big, "W"),
                     onnx.numpy_helper.from_array(small, "V")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    folded = fold_shapes(m, {"x": (1, 256)})
    ops = [n.op_type for n in folded.graph.node]
    assert ops == ["Transpose", "MatMul", "MatMul"], ops  # folded V^T became a parameter
    assert [t.name for t in folded.graph.initializer] == ["W", "Vt"]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(folded.graph.initializer[1]),
                                  small.T)
    # Not bit-identical here: onnxruntime pre-packs a constant MatMul operand, which changes
    # its summation order (the zoo models above do compare bit for bit).
    feeds = {"x": rng.standard_normal((1, 256), dtype=np.float32)}
    np.testing.assert_allclose(_ort(folded, feeds, optimize=False)[0],
                               _ort(m, feeds, optimize=False)[0], rtol=1e-6)


def test_fold_shapes_rejects_unknown_or_mismatched_inputs():
    model = _paddle_reshape_model()
    with pytest.raises(ValueError, match="no input named 'y'"):
        fold_shapes(model, {"y": (1, 8, 4, 4)})
    with pytest.raises(ValueError, match="rank 4"):
        fold_shapes(model, {"x": (1, 8)})
