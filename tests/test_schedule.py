"""The default CPU schedule covers every kernel of the zoo models; a fallback to loop nests would be silent otherwise."""

import pytest
import tvm

from edgetvm import zoo
from edgetvm.passes import onnx_import, pipeline
from edgetvm.passes.onnx_fold import fold_shapes
from edgetvm.targets import load_board


def fused_kernels(name, board):
    model = zoo.load(name)
    shapes = zoo.default_input_shapes(name)
    inputs = onnx_import.resolve_inputs(model, shapes)
    mod, _ = onnx_import.import_onnx(fold_shapes(model, shapes), inputs)
    _, deploy = pipeline.lift_weight_transforms(mod)
    fused = pipeline.fuse(deploy, load_board(board).target())
    return {gv.name_hint: f for gv, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.mark.parametrize("name", ["ocr_cls", "mlp", "cnn", "resnet", "transformer", "vgg"])
@pytest.mark.parametrize("board", ["host", "rpi4"])
def test_every_kernel_is_scheduled(name, board):
    kernels = fused_kernels(name, board)
    unscheduled = [k for k, f in kernels.items() if not (f.attrs and f.attrs.get("tirx.is_scheduled"))]
    assert kernels and not unscheduled


def test_conv_epilogue_is_not_materialised():
    """Batch norm + relu run per output tile: only the padded input and the conv accumulator stay buffers."""
    kernels = fused_kernels("cnn", "host")
    conv = next(f for k, f in kernels.items() if k.startswith("fused_conv2d"))
    text = conv.script()
    assert "T_subtract" not in text and "T_divide" not in text and "T_multiply" not in text
    assert "T.parallel" in text and "T.vectorized" in text
