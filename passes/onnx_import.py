"""ONNX in, Relax out: load and validate a model file, pin its input shapes, import it."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
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
    _check_names(p, model.graph)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        # the checker spreads one sentence over lines ("input 'x' of node: \nname: fc1 OpType: Gemm\n is not ...")
        raise UserError(f"{p} is not a valid ONNX model ({' '.join(str(e).split())[:300]}); "
                        f"it may be truncated: re-export it") from None
    except UnicodeDecodeError:
        # The checker's message quotes a name whose bytes are not UTF-8 (protobuf does not check them),
        # and turning that message into a Python string fails.
        raise UserError(f"{p} is not a valid ONNX model (a name or string in it is not valid UTF-8); "
                        f"the file is damaged: re-export it") from None
    _check_tensors(p, model)
    outputs = [o.name for o in model.graph.output]
    for name in outputs:
        if outputs.count(name) > 1:  # the checker allows it; outputs are saved and looked up by name
            raise UserError(f"{p}: graph output '{name}' is listed {outputs.count(name)} times; list each output "
                            f"once when exporting the model")
    return model


def _check_names(p: Path, g: onnx.GraphProto) -> None:
    """Protobuf does not check that names are UTF-8; where they are not, it hands Python bytes, which
    the importer and the manifest cannot take."""
    names = [v.name for v in list(g.input) + list(g.output) + list(g.initializer)]
    names += [x for n in g.node for x in [n.name, n.op_type, *n.input, *n.output]]
    for name in names:
        if not isinstance(name, str):
            shown = repr(name) if len(name) <= 40 else repr(name[:40])[:-1] + "...'"
            raise UserError(f"{p}: the name {shown} is not valid UTF-8; the file is damaged: re-export it")


_ONNX_TYPES = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
_PACKED = {"INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2"}  # several values per byte


def _check_tensors(p: Path, model: onnx.ModelProto) -> None:
    """Every initializer and Constant holds a known type and as many values as its dims say.

    The checker looks at neither; a damaged file would otherwise fail in shape folding or deep in
    TVM's importer, or make it allocate what the dims claim.
    """
    g = model.graph
    tensors = list(g.initializer) + [a.t for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    for t in tensors:
        what = f"{p}: tensor '{t.name}'"
        if t.data_type not in _ONNX_TYPES:
            raise UserError(f"{what} has data type {t.data_type}, which ONNX does not define; the file is damaged: "
                            f"re-export it")
        if any(d < 0 for d in t.dims):
            raise UserError(f"{what} has a negative dimension {list(t.dims)}; the file is damaged: re-export it")
        kind = onnx.TensorProto.DataType.Name(t.data_type)
        if kind in _PACKED or t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        count = 1
        for d in t.dims:
            count *= d
        if t.HasField("raw_data"):
            if kind == "STRING":
                continue
            want = count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            have, unit = len(t.raw_data), "bytes"
        else:
            want = count * (2 if kind.startswith("COMPLEX") else 1)
            have, unit = len(getattr(t, onnx.helper.tensor_dtype_to_field(t.data_type))), "values"
        if have != want:
            raise UserError(f"{what} declares {kind.lower()}[{','.join(map(str, t.dims))}] ({want} {unit}) but "
                            f"holds {have}; the file is damaged or was edited: re-export it")


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
    from edgetvm.passes.onnx_compat import rewrite_for_importer
    from edgetvm.passes.onnx_fold import fold_shapes

    model = separate_weights(load_onnx(path), shapes)
    inputs = resolve_inputs(model, shapes)
    model = fold_shapes(model, {i.name: i.shape for i in inputs})
    check_supported(model)
    model = rewrite_for_importer(model)
    return model, inputs


# What an input can be fed as from a .npy file (runtime/tensors.py takes these kinds only).
INPUT_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float16", "float32", "float64"}


def _elem_dtype(vi: onnx.ValueInfoProto) -> str:
    et = vi.type.tensor_type.elem_type
    name = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(et)).name if et in _ONNX_TYPES else None
    if name not in INPUT_DTYPES:
        what = onnx.TensorProto.DataType.Name(et) if et in _ONNX_TYPES else f"{et} (not an ONNX type)"
        raise UserError(f"input '{vi.name}' has element type {what}; edgetvm compiles models whose inputs are "
                        f"bool, integer or float tensors: change the input's type when exporting the model")
    return name


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


def shape_source(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The first node whose output shape ONNX cannot infer although its inputs' shapes are static."""
    from edgetvm.passes.onnx_fold import _infer_shapes

    model = copy.deepcopy(model)  # only on the way to an error: the weights' copy does not matter
    for o in model.graph.output:  # a declared shape is a promise, not an inference
        o.type.tensor_type.ClearField("shape")
    try:
        dims = _infer_shapes(model, 64 << 10)
    except Exception:  # noqa: BLE001 - a diagnosis only: the caller's message stands without it
        return None
    static = lambda name: name == "" or dims.get(name, (None, None))[1] is not None  # noqa: E731
    for node in model.graph.node:
        if all(map(static, node.input)) and not all(map(static, node.output)):
            return node
    return None


def import_onnx(model: onnx.ModelProto, inputs: list[TensorInfo]):
    """Relax module whose `main` takes the inputs then the weights, and the weights as numpy arrays."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    failure = None
    try:
        # The importer prints each failing node's inputs to stdout (whole Relax expressions). It warns when
        # it renames an input such as "0" (the artifact keeps the ONNX names), about dynamic shapes (all
        # are static here), and when its own checker rejects a model: load_onnx checked the file, and
        # onnx_compat may hand it an opset-6 Slice in the opset-10 form on purpose.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"tvm\.relax\.frontend\.onnx")
            mod = from_onnx(model, shape_dict={i.name: list(i.shape) for i in inputs},
                            dtype_dict={i.name: i.dtype for i in inputs}, keep_params_in_input=True)
    except UserError:
        raise
    except Exception as e:
        failure = _import_failure(e, model)
    if failure:  # raised here, not in the except clause, so the failed importer is gone first
        raise UserError(failure)
    mod, params = relax.frontend.detach_params(mod)
    weights = [p.numpy() for p in params.get("main", [])]
    return mod, weights


def _import_failure(e: Exception, model: onnx.ModelProto) -> str:
    """The message for an import that failed: the node it failed on, and TVM's reason."""
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    node, builders, tb = None, [], e.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        if tb.tb_frame.f_code.co_name == "_construct_nodes" and isinstance(local.get("node"), onnx.NodeProto):
            node = local["node"]  # the innermost one: a node inside an If branch, not the If
        importer = local.get("self")
        if isinstance(importer, ONNXGraphImporter) and all(b is not importer.bb for b in builders):
            builders.append(importer.bb)
        tb = tb.tb_next
    for bb in builders:
        _close_blocks(bb)
    reason = _first_line(e)
    if node is None:
        return (f"TVM's ONNX importer cannot convert this model ({reason}); "
                f"simplify the model (static shapes, standard operators) and retry")
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
    where = f"operator {op} (node '{node.name or node.output[0]}')"
    source = shape_source(model)
    if source is not None and list(source.output) == list(node.output):
        return (f"{where} computes its output shape from input values, not only input shapes; edgetvm "
                f"compiles static shapes only: make those values constants when exporting the model")
    return (f"{where} cannot be converted by TVM's ONNX importer ({reason}); replace or simplify that node "
            f"when exporting the model (static shapes, constant shape and index inputs)")


def _close_blocks(bb) -> None:
    """End the blocks a failed import left open: otherwise TVM warns on stderr when the builder is freed."""
    for _ in range(16):
        try:
            bb._end_block()
        except Exception:  # noqa: BLE001 - "no block is being built": done
            return


def _fmt(dims) -> str:
    return "x".join(d.dim_param or (str(d.dim_value) if d.dim_value else "?") for d in dims) or "unknown"


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]
