"""ONNX in, Relax out: load and validate a model file, pin its input shapes, import it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgetvm.errors import UserError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> "TensorInfo":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX file, refusing anything that is not a complete, valid model."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model file {p} does not exist; pass the path of an .onnx file")
    if not p.is_file():
        raise UserError(f"{p} is not a file; pass the path of an .onnx file")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # protobuf raises DecodeError, onnx raises others for external data
        raise UserError(f"{p} is not a readable ONNX model ({_first_line(e)}); "
                        f"it may be truncated or another format: re-export it to ONNX") from None
    # Protobuf parses many byte strings into an empty message rather than failing.
    if model.ir_version == 0 or not model.graph.output:
        raise UserError(f"{p} is not an ONNX model (no IR version or no graph outputs); "
                        f"re-export it to ONNX")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise UserError(f"{p} is not a valid ONNX model ({_first_line(e)}); "
                        f"it may be truncated: re-export it") from None
    return model


def separate_weights(model: onnx.ModelProto, shapes: dict | None = None) -> onnx.ModelProto:
    """Drop initializers from the graph inputs (IR < 4 lists every weight as an input too).

    An input with an initializer is a weight, unless --input-shape names it: then it is an input and
    its initializer (a default value) goes.
    """
    inits = {t.name for t in model.graph.initializer}
    named = set(shapes or {})
    listed = [i.name for i in model.graph.input]
    if not inits & set(listed) and model.ir_version >= 4:
        return model
    model = copy.deepcopy(model)
    # IR 4 made listing initializers as inputs optional: passes after this one add none.
    model.ir_version = max(model.ir_version, 4)
    keep = [i for i in model.graph.input if i.name not in inits or i.name in named]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    defaults = [t for t in model.graph.initializer if t.name not in named]
    del model.graph.initializer[:]
    model.graph.initializer.extend(defaults)
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: old exporters also list every initializer as a graph input."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def prepare(path: str | Path, shapes: dict[str, tuple[int, ...]] | None = None):
    """An ONNX file ready for import: checked, weights apart from inputs, shapes pinned and folded."""
    from edgetvm.passes.onnx_fold import fold_shapes

    model = separate_weights(load_onnx(path), shapes)
    inputs = resolve_inputs(model, shapes)
    model = fold_shapes(model, {i.name: i.shape for i in inputs})
    check_supported(model)
    return model, inputs


def _elem_dtype(vi: onnx.ValueInfoProto) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).name


def resolve_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None) -> list[TensorInfo]:
    """Each input's static shape: from the model, or from --input-shape where the model leaves a dim open."""
    shapes = dict(shapes or {})
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    for name in shapes:
        if name not in names:
            raise UserError(f"--input-shape names '{name}', which is not an input of the model; "
                            f"its inputs are: {', '.join(names)}")
    out = []
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        model_shape = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in dims]
        if vi.name in shapes:
            given = tuple(shapes[vi.name])
            if vi.type.tensor_type.HasField("shape") and len(given) != len(model_shape):
                raise UserError(f"--input-shape {vi.name}:{','.join(map(str, given))} has rank {len(given)} "
                                f"but the model's input has rank {len(model_shape)} ({_fmt(dims)})")
            for g, m in zip(given, model_shape):
                if m is not None and g != m:
                    raise UserError(f"--input-shape {vi.name}:{','.join(map(str, given))} contradicts the "
                                    f"model's fixed shape ({_fmt(dims)}); change only the open dimensions")
            shape = given
        elif None in model_shape or not vi.type.tensor_type.HasField("shape"):
            raise UserError(f"input '{vi.name}' has dynamic shape ({_fmt(dims)}); give a static one with "
                            f"--input-shape {vi.name}:{','.join(str(m or 1) for m in model_shape) or '1,3,224,224'}")
        else:
            shape = tuple(model_shape)
        out.append(TensorInfo(vi.name, tuple(int(s) for s in shape), _elem_dtype(vi)))
    return out


def check_supported(model: onnx.ModelProto) -> None:
    """Name the first operator TVM's importer cannot convert, before the import fails deep inside."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"Constant", "If"}
    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            raise UserError(f"operator {op} (node '{node.name or f'#{i}'}') is not supported by TVM's ONNX "
                            f"importer; replace it with supported operators when exporting the model")


def import_onnx(model: onnx.ModelProto, inputs: list[TensorInfo]):
    """Relax module whose `main` takes the inputs then the weights, and the weights as numpy arrays."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    try:
        mod = from_onnx(model, shape_dict={i.name: list(i.shape) for i in inputs},
                        dtype_dict={i.name: i.dtype for i in inputs}, keep_params_in_input=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"TVM's ONNX importer cannot convert this model ({_first_line(e)}); "
                        f"simplify the model (static shapes, standard operators) and retry") from None
    mod, params = relax.frontend.detach_params(mod)
    weights = [p.numpy() for p in params.get("main", [])]
    return mod, weights


def _fmt(dims) -> str:
    return "x".join(d.dim_param or (str(d.dim_value) if d.dim_value else "?") for d in dims) or "unknown"


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]
