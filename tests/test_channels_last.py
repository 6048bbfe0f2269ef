"""A CNN whose convolutions the NCHW path computes as matmuls runs channels-last: each matmul's output is the
next layer's input as it is, and the results are the NCHW build's."""

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax

from edgetvm.passes import pipeline

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})


def _conv(bb, x, w, b, stride=1, pad=0):
    y = relax.op.nn.conv2d(x, w, strides=stride, padding=pad)
    return bb.emit(relax.op.nn.relu(relax.op.add(y, relax.op.reshape(b, (1, -1, 1, 1)))))


def _fire_net(h: int):
    """A SqueezeNet in small: a strided stem, a pool, a fire module (squeeze 1x1, expand 1x1 and 3x3,
    concat), dropout, a 1x1 classifier and a global mean."""
    shapes = {"w0": (16, 3, 3, 3), "b0": (16,), "ws": (8, 16, 1, 1), "bs": (8,), "we1": (16, 8, 1, 1),
              "be1": (16,), "we3": (16, 8, 3, 3), "be3": (16,), "wc": (10, 32, 1, 1), "bc": (10,)}
    x = relax.Var("x", relax.TensorType([1, 3, h, h], "float32"))
    params = {k: relax.Var(k, relax.TensorType(list(s), "float32")) for k, s in shapes.items()}
    bb = relax.BlockBuilder()
    p = params
    with bb.function("main", [x, *params.values()], attrs={"num_input": 1}):
        with bb.dataflow():
            y = _conv(bb, x, p["w0"], p["b0"], stride=2)
            y = bb.emit(relax.op.nn.max_pool2d(y, pool_size=3, strides=2))
            s = _conv(bb, y, p["ws"], p["bs"])
            y = bb.emit(relax.op.concat([_conv(bb, s, p["we1"], p["be1"]), _conv(bb, s, p["we3"], p["be3"], pad=1)], 1))
            y = bb.emit(relax.TupleGetItem(bb.emit(relax.op.nn.dropout(y, 0.5)), 0))
            y = _conv(bb, y, p["wc"], p["bc"])
            out = bb.emit_output(bb.emit(relax.op.mean(y, axis=[2, 3])))
        bb.emit_func_output(out)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((1, 3, h, h)).astype("float32")]
    arrays += [(rng.standard_normal(s) * 0.3).astype("float32") for s in shapes.values()]
    return bb.get(), arrays


def _ops(func) -> list[str]:
    """Operators in order, a kernel called through call_tir by its name."""
    names = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            names.append(e.args[0].name_hint if e.op.name == "relax.call_tir" else e.op.name)

    relax.analysis.post_order_visit(func.body, visit)
    return names


def _run(mod, arrays, channels_last: bool):
    transform, deploy = pipeline.lift_weight_transforms(mod, target=TARGET, channels_last=channels_last)
    weights = pipeline.transform_weights(transform, arrays[1:])
    vm = relax.VirtualMachine(pipeline.build(deploy, TARGET), tvm.cpu())
    return deploy, vm["main"](*[tvm.runtime.tensor(a) for a in arrays[:1] + weights]).numpy()


def test_convs_with_rows_of_no_whole_vectors_run_as_channels_last_matmuls_with_no_transposes_between():
    mod, arrays = _fire_net(31)   # rows of 15 after the stem, 7 after the pool
    nhwc, got = _run(mod, arrays, True)
    nchw, want = _run(mod, arrays, False)
    ops = _ops(nhwc["main"])
    assert "relax.nn.conv2d" not in ops and sum(op.startswith("matmul_packed") for op in ops) == 5, ops
    # one layout change into the network (the image) and none after: the classifier's mean reads NHWC
    assert ops.count("relax.layout_transform") + ops.count("relax.permute_dims") == 1, ops
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_convs_mostly_with_rows_of_whole_vectors_stay_nchw():
    """There the NCHW path runs direct convolutions, faster than an im2col gather and a matmul."""
    mod, _ = _fire_net(33)   # rows of 16 after the stem, 7 after the pool: the stem is 57% of the work
    assert tvm_ffi.structural_equal(pipeline.lift_weight_transforms(mod, target=TARGET)[1],
                                   pipeline.lift_weight_transforms(mod, target=TARGET, channels_last=False)[1])


def test_a_model_whose_layout_cannot_follow_keeps_nchw():
    """ConvertLayout has no layout rule for a stack (it raises): the model compiles as it did."""
    x = relax.Var("x", relax.TensorType([1, 8, 13, 13], "float32"))
    w = relax.Var("w", relax.TensorType([8, 8, 3, 3], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, padding=1))
            out = bb.emit_output(bb.emit(relax.op.stack([y, relax.op.nn.conv2d(y, w, padding=1)], 1)))
        bb.emit_func_output(out)
    mod = bb.get()
    assert tvm_ffi.structural_equal(pipeline.lift_weight_transforms(mod, target=TARGET)[1],
                                    pipeline.lift_weight_transforms(mod, target=TARGET, channels_last=False)[1])
    rng = np.random.default_rng(1)
    _, got = _run(mod, [rng.standard_normal((1, 8, 13, 13)).astype("float32"),
                        rng.standard_normal((8, 8, 3, 3)).astype("float32")], True)
    assert got.shape == (1, 2, 8, 13, 13)
