"""TFLite in, Relax out: read and check a .tflite flatbuffer, take its input shapes, import it with TVM's
TFLite frontend, and turn the constants that frontend embeds into weight parameters, so that what follows
(lifted weight transforms, fusion, swapping, the artifact's weight file) is the ONNX import's."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError
from edgetvm.passes.onnx_import import INPUT_DTYPES, TensorInfo, _close_blocks, _first_line

# A TFLite flatbuffer carries this file identifier in bytes 4-8 (after the root table's offset).
IDENTIFIER = b"TFL3"

# tflite's TensorType enum -> numpy dtype name; the types with no fixed item size are absent.
_DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16",
           8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64", 15: "uint32",
           16: "uint16"}
_TYPE_NAMES = {5: "string", 13: "resource", 14: "variant", 17: "int4", 18: "bfloat16", 19: "int2", 20: "uint4",
               21: "float8_e4m3fn", 22: "float8_e5m2"}
_CUSTOM = 32  # BuiltinOperator.CUSTOM
# The one custom operator TVM's frontend converts (under its builtin name).
_KNOWN_CUSTOM = {b"TFLite_Detection_PostProcess": "DETECTION_POSTPROCESS"}


def looks_like_tflite(path: str | Path) -> bool:
    """True when the file starts like a TFLite flatbuffer, whatever its name."""
    try:
        with open(path, "rb") as f:
            return f.read(8)[4:8] == IDENTIFIER
    except OSError:
        return False


@dataclass(eq=False)
class TFLiteModel:
    path: Path
    data: bytes
    model: object  # tflite.Model over `data`

    @property
    def main(self):
        return self.model.Subgraphs(0)

    def tensor_name(self, index: int) -> str:
        # The frontend's own naming (get_tensor_name), so the Relax inputs carry these names.
        name = self.main.Tensors(index).Name()
        return name.decode("utf-8") if name is not None else f"tvmgen_tensor_{index}"

    @property
    def output_names(self) -> list[str]:
        return [self.tensor_name(int(i)) for i in self.main.OutputsAsNumpy()]


def load_tflite(path: str | Path) -> TFLiteModel:
    """Read a .tflite file, refusing anything that is not a complete TFLite model."""
    import tflite

    p = Path(path)
    if not p.exists():
        raise UserError(f"model file {p} does not exist; pass the path of a .tflite file")
    if not p.is_file():
        raise UserError(f"{p} is not a file; pass the path of a .tflite file")
    data = p.read_bytes()
    if len(data) < 8 or data[4:8] != IDENTIFIER:
        raise UserError(f"{p} is not a TFLite model (no '{IDENTIFIER.decode()}' flatbuffer identifier); it may be "
                        f"truncated or another format: convert the model with the TFLite converter")
    try:
        model = tflite.Model.GetRootAsModel(data, 0)
        _check_structure(p, model, len(data))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - flatbuffers reads past the end of a cut file in many ways
        raise UserError(f"{p} is not a readable TFLite model ({_first_line(e) or type(e).__name__}); it may be "
                        f"truncated or damaged: convert the model again") from None
    return TFLiteModel(p, data, model)


def _check_structure(p: Path, model, size: int) -> None:
    """Every index points inside its table and every constant holds as many bytes as its shape says.

    Flatbuffers are read without verification: a damaged file would otherwise fail deep inside TVM's
    frontend, or make it allocate whatever a garbage length claims.
    """
    def length(n: int, what: str, item: int = 4) -> int:
        if not 0 <= n <= size // item:  # a vector's elements lie inside the file
            raise UserError(f"{p}: {what} claims {n} entries in a {size}-byte file; the file is damaged: "
                            f"convert the model again")
        return n

    buffers = length(model.BuffersLength(), "the buffer table")
    codes = length(model.OperatorCodesLength(), "the operator-code table")
    for c in range(codes):  # read here, so that a damaged entry fails here and not when naming an operator
        code = model.OperatorCodes(c)
        code.CustomCode()  # a damaged string offset fails on this read
        if min(code.DeprecatedBuiltinCode(), code.BuiltinCode()) < 0:
            raise UserError(f"{p}: operator code {c} is not a TFLite operator; the file is damaged: "
                            f"convert the model again")
    if length(model.SubgraphsLength(), "the subgraph table") < 1:
        raise UserError(f"{p} holds no subgraph; it is not a complete TFLite model: convert the model again")
    for s in range(model.SubgraphsLength()):
        g = model.Subgraphs(s)
        ntensors = length(g.TensorsLength(), f"subgraph {s}'s tensor table")
        for t in range(ntensors):
            _check_tensor(p, model, g.Tensors(t), buffers, length)
        ins = list(g.InputsAsNumpy()) if length(g.InputsLength(), "the input list") else []
        outs = list(g.OutputsAsNumpy()) if length(g.OutputsLength(), "the output list") else []
        if s == 0 and not outs:
            raise UserError(f"{p} has no outputs; it is not a complete TFLite model: convert the model again")
        for i in ins + outs:
            if not 0 <= i < ntensors:
                raise UserError(f"{p}: subgraph {s} names tensor {i} as an input or output but has {ntensors}; "
                                f"the file is damaged: convert the model again")
        for k in range(length(g.OperatorsLength(), f"subgraph {s}'s operator list")):
            op = g.Operators(k)
            if not 0 <= op.OpcodeIndex() < codes:
                raise UserError(f"{p}: operator #{k} has operator code {op.OpcodeIndex()} of {codes}; the file is "
                                f"damaged: convert the model again")
            used = list(op.InputsAsNumpy()) if length(op.InputsLength(), "an operator's inputs") else []
            used += list(op.OutputsAsNumpy()) if length(op.OutputsLength(), "an operator's outputs") else []
            if any(not -1 <= i < ntensors for i in used):  # -1: an optional input left out
                raise UserError(f"{p}: operator #{k} of subgraph {s} names a tensor outside its {ntensors}; the "
                                f"file is damaged: convert the model again")


def _check_tensor(p: Path, model, t, buffers: int, length) -> None:
    raw = t.Name()
    try:
        name = raw.decode("utf-8") if raw is not None else "?"
    except UnicodeDecodeError:  # the frontend and the manifest take tensor names as text
        raise UserError(f"{p}: the tensor name {raw[:40]!r} is not valid UTF-8; the file is damaged: "
                        f"convert the model again") from None
    if t.Type() not in _DTYPES and t.Type() not in _TYPE_NAMES:
        raise UserError(f"{p}: tensor '{name}' has type {t.Type()}, which TFLite does not define; the file is "
                        f"damaged: convert the model again")
    shape = [int(d) for d in t.ShapeAsNumpy()] if length(t.ShapeLength(), "a tensor's shape") else []
    if any(d < 0 for d in shape):
        raise UserError(f"{p}: tensor '{name}' has a negative dimension {shape}; the file is damaged: "
                        f"convert the model again")
    if not 0 <= t.Buffer() < buffers:
        raise UserError(f"{p}: tensor '{name}' uses buffer {t.Buffer()} of {buffers}; the file is damaged: "
                        f"convert the model again")
    buf = model.Buffers(t.Buffer())
    if buf.Offset() > 1:
        # Models over 2 GiB keep their weights after the flatbuffer; TVM's frontend reads only inline data.
        raise UserError(f"{p}: tensor '{name}' keeps its data outside the flatbuffer (a model over 2 GiB); "
                        f"TVM's TFLite importer reads inline weights only")
    have = length(buf.DataLength(), f"tensor '{name}''s data", item=1)
    if have and t.Type() in _DTYPES and t.Sparsity() is None:
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[t.Type()]).itemsize
        if have != want:
            raise UserError(f"{p}: tensor '{name}' declares {_DTYPES[t.Type()]}[{','.join(map(str, shape))}] "
                            f"({want} bytes) but holds {have}; the file is damaged: convert the model again")


def resolve_inputs(m: TFLiteModel, shapes: dict[str, tuple[int, ...]] | None) -> list[TensorInfo]:
    """Each input at the shape stored in the model: TVM's frontend reads every intermediate shape from
    the file, so the graph is only right at the shapes it was converted with."""
    shapes = dict(shapes or {})
    g = m.main
    indices = [int(i) for i in g.InputsAsNumpy()] if g.InputsLength() else []
    names = [m.tensor_name(i) for i in indices]
    for name in shapes:
        if name not in names:
            raise UserError(f"--input-shape names '{name}', which is not an input of the model; "
                            f"its inputs are: {', '.join(names) or 'none'}")
    out = []
    for i, name in zip(indices, names):
        t = g.Tensors(i)
        stored = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        if name in shapes and tuple(shapes[name]) != stored:
            raise UserError(f"--input-shape {name}:{','.join(map(str, shapes[name]))} differs from the shape "
                            f"stored in the TFLite model ({'x'.join(map(str, stored)) or 'scalar'}); TFLite models "
                            f"compile at the shapes they were converted with: convert it again with that shape")
        dtype = _DTYPES.get(t.Type()) or _TYPE_NAMES.get(t.Type(), str(t.Type()))
        if dtype not in INPUT_DTYPES:
            raise UserError(f"input '{name}' has element type {dtype}; edgetvm compiles models whose inputs are "
                            f"bool, integer or float tensors: change the input's type when converting the model")
        out.append(TensorInfo(name, stored, dtype))
    return out


def operator_name(m: TFLiteModel, op) -> str:
    """BuiltinOperator's name (ADD, CONV_2D), or a custom operator's own name."""
    from tflite.BuiltinOperator import BuiltinOperator

    code = m.model.OperatorCodes(op.OpcodeIndex())
    # TFLite 2.4 moved the builtin code to a 32-bit field and kept the old 8-bit one: the larger is right.
    number = max(code.DeprecatedBuiltinCode(), code.BuiltinCode())
    if number == _CUSTOM:
        custom = code.CustomCode() or b""
        return _KNOWN_CUSTOM.get(custom, custom.decode("utf-8", "replace") or "CUSTOM")
    names = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
    return names.get(number, f"with builtin code {number}")


def _is_custom(m: TFLiteModel, op) -> bool:
    code = m.model.OperatorCodes(op.OpcodeIndex())
    return max(code.DeprecatedBuiltinCode(), code.BuiltinCode()) == _CUSTOM and \
        code.CustomCode() not in _KNOWN_CUSTOM


def _op_where(m: TFLiteModel, g, k: int) -> str:
    op = g.Operators(k)
    outs = [int(i) for i in op.OutputsAsNumpy()] if op.OutputsLength() else []
    name = g.Tensors(outs[0]).Name() if outs and outs[0] >= 0 else None
    return f"operator #{k}, output '{name.decode('utf-8', 'replace')}'" if name else f"operator #{k}"


def check_supported(m: TFLiteModel) -> None:
    """Name the first operator TVM's frontend has no converter for, before the import fails inside it."""
    from tvm import relax
    from tvm.relax.frontend.tflite.tflite_frontend import ExprTable, OperatorConverter

    known = set(OperatorConverter(m.model, m.main, ExprTable(), relax.BlockBuilder()).convert_map)
    for s in range(m.model.SubgraphsLength()):
        g = m.model.Subgraphs(s)
        for k in range(g.OperatorsLength()):
            op = g.Operators(k)
            name = operator_name(m, op)
            if _is_custom(m, op) or name not in known:
                kind = "custom operator" if _is_custom(m, op) else "operator"
                raise UserError(f"{kind} {name} ({_op_where(m, g, k)}) is not supported by TVM's TFLite "
                                f"importer; replace it with builtin TFLite operators when converting the model")


def prepare(path: str | Path, shapes: dict[str, tuple[int, ...]] | None = None):
    """A TFLite file ready for import: checked, its inputs resolved, every operator convertible."""
    m = load_tflite(path)
    inputs = resolve_inputs(m, shapes)
    check_supported(m)
    return m, inputs


def _converter_class(record: dict):
    """TVM's operator converter, recording the operator it is on and where each constant came from, and
    reading a DENSIFY'd fp16 weight as DEQUANTIZE's input (the stock one reads the empty buffer)."""
    from tvm.relax.frontend.tflite.tflite_frontend import OperatorConverter

    class Converter(OperatorConverter):
        def __init__(self, model, subgraph, exp_tab, ctx, conversion_state=None):
            super().__init__(model, subgraph, exp_tab, ctx, conversion_state)
            record.setdefault("converter", self)  # the first one converts main; later ones, control flow
            record.setdefault("sources", {})
            new_const = exp_tab.new_const

            def named_const(value, shape=None, dtype="float32", source_name=None):
                c = new_const(value, shape, dtype, source_name)
                if source_name:
                    record["sources"][c] = source_name.decode("utf-8", "replace") \
                        if isinstance(source_name, bytes) else str(source_name)
                return c

            exp_tab.new_const = named_const
            for name, convert in list(self.convert_map.items()):
                self.convert_map[name] = self._tracked(convert)

        def _tracked(self, convert):
            def run(op):
                record["op"] = (self.subgraph, op)
                return convert(op=op)
            return run

        def get_tensor_value(self, tensor_wrapper, is_sparse=False):
            if not is_sparse and self.is_prefetched(tensor_wrapper.tensor_idx):
                return self.get_prefetched_node(tensor_wrapper.tensor_idx)
            return super().get_tensor_value(tensor_wrapper, is_sparse)

    return Converter


def import_tflite(m: TFLiteModel, inputs: list[TensorInfo]):
    """Relax module whose `main` takes the inputs then the weights, and the weights as numpy arrays."""
    from tvm import relax
    from tvm.relax.frontend.tflite import from_tflite

    record: dict = {}
    failure = None
    try:
        mod = from_tflite(m.model, shape_dict={i.name: i.shape for i in inputs},
                          dtype_dict={i.name: i.dtype for i in inputs}, op_converter=_converter_class(record))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the frontend raised, the message names the operator
        failure = _import_failure(e, m, record)
    if failure:  # raised here, not in the except clause, so the failed frontend is gone first
        raise UserError(failure)
    mod, _ = relax.frontend.detach_params(mod)
    return constants_to_weights(mod, record.get("sources", {}))


def _import_failure(e: Exception, m: TFLiteModel, record: dict) -> str:
    converter = record.get("converter")
    if converter is not None:
        _close_blocks(converter.bb)
    reason = _first_line(e) or type(e).__name__
    if "op" not in record:
        return (f"TVM's TFLite importer cannot convert this model ({reason}); convert the model again with "
                f"builtin operators and static shapes")
    g, op = record["op"]
    k = next(i for i in range(g.OperatorsLength()) if g.Operators(i)._tab.Pos == op._tab.Pos)
    return (f"operator {operator_name(m, op)} ({_op_where(m, g, k)}) cannot be converted by TVM's TFLite "
            f"importer ({reason}); replace or simplify it when converting the model")


def constants_to_weights(mod, sources: dict):
    """`main` with every non-scalar constant turned into a parameter after the inputs (num_input stays),
    named after the TFLite tensor it came from, and those constants' values in parameter order.

    The frontend emits one constant per use of a tensor: equal constants become one weight.
    """
    import tvm
    from tvm import relax

    params: list = []
    values: list[np.ndarray] = []
    by_content: dict = {}
    names: set = set()

    @relax.expr_functor.mutator
    class Lift(relax.PyExprMutator):
        def visit_generic_const_(self, c):
            value = c.value.numpy()
            if value.ndim == 0:
                return c
            key = (value.dtype.str, value.shape, hashlib.sha256(value.tobytes()).digest())
            if key not in by_content:
                name = sources.get(c) or f"const_{len(params)}"
                if name in names:
                    name = f"{name}.{len(params)}"
                names.add(name)
                var = relax.Var(name, relax.TensorType(list(value.shape), str(value.dtype)))
                by_content[key] = var
                params.append(var)
                values.append(value)
            return by_content[key]

    main = mod["main"]
    body = Lift(mod).visit_expr(main.body)
    lifted = relax.Function(list(main.params) + params, body, main.ret_ty, main.is_pure, main.attrs)
    out = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"})
    out["main"] = lifted
    return out, values
