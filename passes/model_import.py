"""The one place that tells a model file's format: ONNX or TFLite in, the same Relax module and weights out.

    model, inputs = prepare(path, shapes)      # load, check, resolve input shapes
    mod, weights = import_model(model, inputs)  # main(inputs..., weights...), weights as numpy arrays
"""

from __future__ import annotations

from pathlib import Path

from edgetvm.passes import onnx_import, tflite_import


def is_tflite(path: str | Path) -> bool:
    """By content (the TFL3 flatbuffer identifier) first; a .tflite name that holds something else still goes
    to the TFLite reader, whose error then says the file is not one."""
    return tflite_import.looks_like_tflite(path) or Path(path).suffix.lower() == ".tflite"


def prepare(path: str | Path, shapes: dict[str, tuple[int, ...]] | None = None):
    if is_tflite(path):
        return tflite_import.prepare(path, shapes)
    return onnx_import.prepare(path, shapes)


def import_model(model, inputs):
    if isinstance(model, tflite_import.TFLiteModel):
        return tflite_import.import_tflite(model, inputs)
    return onnx_import.import_onnx(model, inputs)


def output_names(model) -> list[str]:
    if isinstance(model, tflite_import.TFLiteModel):
        return model.output_names
    return [o.name for o in model.graph.output]


def shape_source(model):
    """The ONNX node that computes a shape from input values, if any (a TFLite file stores every shape)."""
    if isinstance(model, tflite_import.TFLiteModel):
        return None
    return onnx_import.shape_source(model)


def is_onnx(model) -> bool:
    return not isinstance(model, tflite_import.TFLiteModel)
