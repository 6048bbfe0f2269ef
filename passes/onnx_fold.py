"""ONNX-level clean-up that lets the Relax importer take real exported models.

`fold_shapes` pins the graph inputs to static shapes, replaces Shape/Size of static tensors and
small constant subgraphs (the Shape->Cast->Slice->Cast->Concat chains that feed a Reshape) with
Constant nodes, drops the nodes that became dead, and moves weights held in Constant nodes into
initializers.

Why: `tvm.relax.frontend.onnx.from_onnx` needs a Reshape target it can see at import time.
Shape->Slice->Concat alone it follows as a shape value, but the Casts PaddlePaddle puts in the
chain turn it into a run-time tensor, and the import fails with "Reshape requires the input new
shape to be Shape" (the PP-OCR classifier's head, the recognizer's attention reshapes).
Paddle exports also hold every weight in a Constant node, which the importer embeds as a
constant, so `keep_params_in_input=True` found no parameters at all.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

# Ops whose output is not a function of their inputs, and control flow (subgraphs).
_NEVER_FOLD = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
               "Multinomial", "Bernoulli", "If", "Loop", "Scan", "SequenceMap"}
# Float inputs the importer needs as constants, not parameters: (op, input index).
_SHAPE_LIKE_FLOAT_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def fold_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], *,
                max_bytes: int = 64 * 1024, lift_weights: bool = True) -> onnx.ModelProto:
    """Rewrites static Shape/Size and small (<= max_bytes) constant subgraphs into Constants.

    Returns a new model; `model` is not changed. Inputs named in `input_shapes` get those
    static shapes. A node is folded only when all its inputs are constants and every input
    and output is at most `max_bytes`, so no heavy compute on weights is ever moved to
    compile time. With `lift_weights`, non-scalar float Constant nodes (weights) become
    initializers, i.e. parameters under `from_onnx(..., keep_params_in_input=True)`.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    _pin_inputs(g, input_shapes)
    del g.value_info[:]  # stale dynamic shapes would only get in the way of inference
    for o in g.output:  # some exporters write -1 for a dynamic dim: make it unknown
        for d in o.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value < 0:
                d.Clear()
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), None)

    for _ in range(16):  # each round folds what the previous round made static
        shapes = _infer_shapes(out, max_bytes)
        if not _fold_once(g, shapes, opset, max_bytes):
            break
    _remove_dead(g)
    if lift_weights:
        _lift_weights(out)
        _inline_index_initializers(g, max_bytes)
    shapes = _infer_shapes(out, max_bytes)
    for o in g.output:  # record the now static output shapes
        dims = shapes.get(o.name, (None, None))[1]
        if dims is not None and o.type.HasField("tensor_type"):
            _set_dims(o, dims)
    return out


# ------------------------------------------------------------------------------- helpers


def _pin_inputs(g: onnx.GraphProto, input_shapes: dict[str, tuple[int, ...]]) -> None:
    inputs = {i.name: i for i in g.input}
    for name, shape in input_shapes.items():
        if name not in inputs:
            raise ValueError(f"fold_shapes: the model has no input named {name!r} "
                             f"(inputs: {', '.join(inputs)})")
        vi = inputs[name]
        old = vi.type.tensor_type.shape.dim
        if len(old) and len(old) != len(shape):
            raise ValueError(f"fold_shapes: input {name!r} has rank {len(old)}, "
                             f"got shape {tuple(shape)}")
        for d, s in zip(old, shape):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != s:
                raise ValueError(f"fold_shapes: input {name!r} has static shape "
                                 f"{[x.dim_value or x.dim_param for x in old]}, "
                                 f"got {tuple(shape)}")
        _set_dims(vi, shape)


def _set_dims(vi: onnx.ValueInfoProto, dims) -> None:
    shape = vi.type.tensor_type.shape
    del shape.dim[:]
    for s in dims:
        shape.dim.add().dim_value = int(s)


def _infer_shapes(model: onnx.ModelProto,
                  max_bytes: int) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """name -> (elem_type, static dims or None), from ONNX shape inference with data
    propagation (which follows Shape->Slice->Concat values into Reshape outputs)."""
    # Infer on a skeleton: big initializers become typed inputs (their values are never
    # needed), so a model with hundreds of MiB of weights is not serialised each round.
    skeleton = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import,
                               functions=model.functions)
    sg, g0 = skeleton.graph, model.graph
    sg.node.extend(g0.node)
    sg.input.extend(g0.input)
    sg.output.extend(g0.output)
    sg.value_info.extend(g0.value_info)
    input_names = {i.name for i in g0.input}
    for t in g0.initializer:
        if _nbytes(t.data_type, tuple(t.dims)) <= max_bytes:
            sg.initializer.append(t)
        elif t.name not in input_names:
            sg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    g = inferred.graph
    out = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        dims = None
        if tt.HasField("shape") and all(d.HasField("dim_value") and d.dim_value >= 0
                                        for d in tt.shape.dim):
            dims = tuple(d.dim_value for d in tt.shape.dim)
        out[vi.name] = (tt.elem_type, dims)
    for t in g0.initializer:
        out[t.name] = (t.data_type, tuple(t.dims))
    return out


def _nbytes(elem_type: int, dims: tuple[int, ...]) -> int:
    itemsize = helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    return int(np.prod(dims, dtype=np.int64)) * itemsize


def _constant_node(name: str, value: np.ndarray, node_name: str) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=node_name,
                            value=numpy_helper.from_array(np.asarray(value), name))


def _fold_once(g: onnx.GraphProto, shapes: dict, opset: int | None, max_bytes: int) -> bool:
    inits = {t.name: t for t in g.initializer}
    const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    cache: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        if name not in cache:
            if name in inits:
                cache[name] = numpy_helper.to_array(inits[name])
            else:
                attr = const_nodes[name].attribute[0]
                cache[name] = (numpy_helper.to_array(attr.t) if attr.name == "value" else
                               # value_float, value_ints, ...: let the evaluator decode them
                               ReferenceEvaluator(const_nodes[name]).run(None, {})[0])
        return cache[name]

    def small(name: str) -> bool:
        et, dims = shapes.get(name, (None, None))
        return dims is not None and _nbytes(et, dims) <= max_bytes

    changed = False
    new_nodes = []
    for node in g.node:
        folded = None
        static = lambda i: shapes.get(node.input[i], (None, None))[1]  # noqa: E731
        if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_FOLD \
                or node.op_type == "Constant" or any(a.type in (onnx.AttributeProto.GRAPH,
                                                                onnx.AttributeProto.GRAPHS)
                                                     for a in node.attribute):
            pass
        elif node.op_type == "Shape" and static(0) is not None:
            attrs = {a.name: a.i for a in node.attribute}
            dims = static(0)
            start, end = attrs.get("start", 0), attrs.get("end", len(dims))
            folded = [np.array(dims[start:end], dtype=np.int64)]
        elif node.op_type == "Size" and static(0) is not None:
            folded = [np.array(np.prod(static(0), dtype=np.int64), dtype=np.int64)]
        elif (node.input and all(i == "" or ((i in inits or i in const_nodes or i in cache)
                                             and small(i))
                                 for i in node.input)
              and all(small(o) for o in node.output if o)):
            feeds = {i: value(i) for i in node.input if i}
            try:
                folded = ReferenceEvaluator(node, opsets={"": opset} if opset else None).run(None, feeds)
            except Exception:  # noqa: BLE001 - the reference lacks some old-opset forms: TVM imports the node
                folded = None
        if folded is None:
            new_nodes.append(node)
            continue
        changed = True
        for k, (name, val) in enumerate(zip(node.output, folded)):
            if name:
                et = shapes.get(name, (None,))[0]
                if et:  # keep the dtype shape inference promised (numpy may widen it)
                    val = np.asarray(val).astype(helper.tensor_dtype_to_np_dtype(et))
                cache[name] = val  # later nodes in this round can fold on top of it
                new_nodes.append(_constant_node(name, val, f"{node.name or node.op_type}"
                                                f"_folded_{k}"))
    if changed:
        del g.node[:]
        g.node.extend(new_nodes)
    return changed


def _used_names(g: onnx.GraphProto, node: onnx.NodeProto) -> set[str]:
    """Inputs of a node, plus outer-scope names its subgraphs read."""
    names = set(node.input)
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                    list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
            for n in sub.node:
                names |= _used_names(sub, n)
    return names


def _remove_dead(g: onnx.GraphProto) -> None:
    live = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in live for o in node.output if o):
            keep.append(node)
            live |= _used_names(g, node)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    for i in reversed(range(len(g.initializer))):  # in place: never copy the weights
        if g.initializer[i].name not in live:
            del g.initializer[i]


def _lift_weights(model: onnx.ModelProto) -> None:
    """Non-scalar float Constant nodes become initializers (named after their output)."""
    g = model.graph
    outputs = {o.name for o in g.output}
    pinned = set(outputs)  # constants the importer must see as constants stay nodes
    for node in g.node:
        for k, i in enumerate(node.input):
            if (node.op_type, k) in _SHAPE_LIKE_FLOAT_INPUTS:
                pinned.add(i)
    keep = []
    for node in g.node:
        if node.op_type == "Constant" and node.output[0] not in pinned \
                and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = node.attribute[0].t
            if (t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
                    and int(np.prod(t.dims, dtype=np.int64)) > 1):
                init = g.initializer.add()
                init.CopyFrom(t)
                init.name = node.output[0]
                continue
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)


def _inline_index_initializers(g: onnx.GraphProto, max_bytes: int) -> None:
    """Small int32/int64 initializers (shapes, axes, positions, indices) become Constant nodes.

    Under keep_params_in_input the importer makes every initializer a parameter, and converters
    such as SequenceInsert/SequenceAt then refuse a position that is not a constant.
    """
    inputs = {i.name for i in g.input}
    small = [t for t in g.initializer
             if t.data_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64) and t.name not in inputs
             and _nbytes(t.data_type, tuple(t.dims)) <= max_bytes]
    if not small:
        return
    nodes = [_constant_node(t.name, numpy_helper.to_array(t), f"{t.name}_initializer") for t in small]
    names = {t.name for t in small}
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name in names:
            del g.initializer[i]
    rest = list(g.node)
    del g.node[:]
    g.node.extend(nodes + rest)
