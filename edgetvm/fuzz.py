"""Fuzzing: seeded mutations of ONNX files, compiled artifacts and .npy inputs, pushed through the CLI.

    python -m edgetvm.fuzz [--cases 1000] [--seed 0] [--only 17 --keep DIR]

Each case mutates one small valid thing (a model for `compile`; an artifact or an input file for
`run`) and runs one command line in a forked child (edgetvm.harness). A case passes when it ends
in a result ("ok") or exit code 2 with one clear line ("clear"); a traceback, stray stderr, a
crash, a hang past the timeout or a half-written output is a bug in the code that read the input.
A compile that succeeds is followed by a run of what it wrote: a model edgetvm accepts must run.

Case i of seed s is the same in every campaign (its random stream is keyed on s and i), so the
200 cases CI runs are the first 200 of the full campaign and any case can be rebuilt alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import shutil
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgetvm import harness

COMPILE_TIMEOUT = 120.0
RUN_TIMEOUT = 60.0
OPSET = 17

# ----------------------------------------------------------------------------- seed models
# Small, so a case that gets through to TVM compiles in about a second.


def _model(nodes, inputs, outputs, inits, name) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs,
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def _f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def mlp() -> onnx.ModelProto:
    """Gemm, Relu, Gemm with transB."""
    r = np.random.default_rng(10)
    inits = {"w1": r.standard_normal((16, 24), np.float32), "b1": r.standard_normal(24, np.float32),
             "w2": r.standard_normal((8, 24), np.float32), "b2": r.standard_normal(8, np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
             helper.make_node("Gemm", ["hr", "w2", "b2"], ["y"], name="fc2", transB=1)]
    return _model(nodes, [_f32("x", (1, 16))], [_f32("y", (1, 8))], inits, "mlp")


def cnn() -> onnx.ModelProto:
    """Conv, Relu, Conv, a residual Add, MaxPool."""
    r = np.random.default_rng(11)
    inits = {"c1_w": r.standard_normal((4, 3, 3, 3), np.float32), "c1_b": r.standard_normal(4, np.float32),
             "c2_w": r.standard_normal((4, 4, 3, 3), np.float32)}
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [helper.make_node("Conv", ["x", "c1_w", "c1_b"], ["c1"], name="conv1", **conv),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "c2_w"], ["c2"], name="conv2", **conv),
             helper.make_node("Add", ["r1", "c2"], ["s"], name="residual"),
             helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
             helper.make_node("MaxPool", ["r2"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    return _model(nodes, [_f32("x", (1, 3, 8, 8))], [_f32("y", (1, 4, 4, 4))], inits, "cnn")


def reshape_concat() -> onnx.ModelProto:
    """Two inputs; a Reshape to an int64 initializer's shape, a Concat, a Mul by a weight."""
    r = np.random.default_rng(12)
    inits = {"flat": np.array([1, 8], np.int64), "scale": r.standard_normal(16, np.float32)}
    nodes = [helper.make_node("Reshape", ["a", "flat"], ["af"], name="reshape"),
             helper.make_node("Concat", ["af", "b"], ["ab"], name="concat", axis=1),
             helper.make_node("Mul", ["ab", "scale"], ["y"], name="scale_mul")]
    return _model(nodes, [_f32("a", (1, 2, 4)), _f32("b", (1, 8))], [_f32("y", (1, 16))], inits,
                  "reshape_concat")


def zoo_transformer() -> onnx.ModelProto:
    """The zoo's encoder block made tiny: LayerNorm, attention via Constant-shaped Reshapes, Erf."""
    from edgetvm import zoo

    return zoo.load("transformer", seq=4, d_model=8, heads=2, ffn=16)


SEEDS = {"mlp": mlp, "cnn": cnn, "reshape_concat": reshape_concat, "zoo_transformer": zoo_transformer}


# ------------------------------------------------------------------- ONNX byte mutations


def bytes_flip(data: bytes, rng: random.Random):
    b = bytearray(data)
    spots = sorted(rng.randrange(len(b)) for _ in range(rng.choice([1, 1, 2, 8])))
    for i in spots:
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b), f"flipped a bit at bytes {spots}"


def bytes_truncate(data: bytes, rng: random.Random):
    n = rng.choice([0, 1, rng.randrange(len(data)), len(data) - 1])
    return data[:n], f"cut to {n} of {len(data)} bytes"


def bytes_insert(data: bytes, rng: random.Random):
    at, junk = rng.randrange(len(data) + 1), rng.randbytes(rng.choice([1, 4, 64]))
    return data[:at] + junk + data[at:], f"inserted {len(junk)} random bytes at {at}"


def bytes_zero(data: bytes, rng: random.Random):
    at = rng.randrange(len(data))
    n = rng.choice([1, 16, 256])
    return data[:at] + bytes(min(n, len(data) - at)) + data[at + n:], f"zeroed {n} bytes at {at}"


# -------------------------------------------------------------- ONNX structure mutations
# Each edits a ModelProto in place and says what it did; a few also return extra CLI flags.

ODD_ELEM_TYPES = [TensorProto.INT64, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BOOL,
                  TensorProto.STRING, TensorProto.UINT8, TensorProto.INT32, TensorProto.BFLOAT16,
                  TensorProto.COMPLEX64, TensorProto.UNDEFINED, 99]
HUGE = [2**31, 2**40, 2**62, 2**63 - 1]


def _data_inputs(g):
    inits = {t.name for t in g.initializer}
    return [i for i in g.input if i.name not in inits]


def _pick(rng, seq):
    return rng.randrange(len(seq)) if len(seq) else None


def drop_node(m, rng):
    g = m.graph
    i = _pick(rng, g.node)
    if i is None:
        return "no node to drop"
    op = g.node[i].op_type
    del g.node[i]
    return f"dropped node #{i} ({op})"


def drop_initializer(m, rng):
    g = m.graph
    i = _pick(rng, g.initializer)
    if i is None or rng.random() < 0.2:
        j = _pick(rng, g.input)
        name = g.input[j].name
        del g.input[j]
        return f"dropped graph input {name}"
    name = g.initializer[i].name
    del g.initializer[i]
    return f"dropped initializer {name}"


def initializer_dtype(m, rng):
    g = m.graph
    i = _pick(rng, g.initializer)
    if i is None:
        return input_type(m, rng)
    t = g.initializer[i]
    new = rng.choice([et for et in ODD_ELEM_TYPES if et != t.data_type])
    if rng.random() < 0.5 and new not in (TensorProto.UNDEFINED, 99, TensorProto.STRING, TensorProto.BFLOAT16):
        # a well-formed tensor of the wrong type, values converted
        a = numpy_helper.to_array(t).astype(helper.tensor_dtype_to_np_dtype(new))
        t.CopyFrom(numpy_helper.from_array(a, t.name))
        return f"initializer {t.name} converted to {TensorProto.DataType.Name(new)}"
    old = t.data_type
    t.data_type = new
    return f"initializer {t.name} relabelled {old} -> {new} (same raw bytes)"


def initializer_dims(m, rng):
    g = m.graph
    i = _pick(rng, g.initializer)
    if i is None:
        return input_shape(m, rng)
    t = g.initializer[i]
    dims = list(t.dims)
    how = rng.choice(["append", "drop", "reverse", "double", "zero", "negative", "cut_data"])
    if how == "cut_data":
        raw = t.raw_data or numpy_helper.from_array(numpy_helper.to_array(t)).raw_data
        t.ClearField("float_data")
        t.ClearField("int64_data")
        t.raw_data = raw[:len(raw) // 2]
        return f"initializer {t.name}: raw data cut to {len(t.raw_data)} bytes"
    if how == "append":
        dims.append(rng.choice([1, 2]))
    elif how == "drop" and dims:
        dims.pop()
    elif how == "reverse":
        dims.reverse()
    elif dims:
        k = rng.randrange(len(dims))
        dims[k] = {"double": dims[k] * 2, "zero": 0, "negative": -3}.get(how, dims[k])
    del t.dims[:]
    t.dims.extend(dims)
    return f"initializer {t.name} dims -> {dims} ({how})"


def input_type(m, rng):
    vis = list(m.graph.input) + list(m.graph.output)
    vi = vis[rng.randrange(len(vis))]
    new = rng.choice(ODD_ELEM_TYPES)
    vi.type.tensor_type.elem_type = new
    return f"{vi.name} elem_type -> {new}"


def input_shape(m, rng):
    vis = _data_inputs(m.graph) + list(m.graph.output)
    vi = vis[rng.randrange(len(vis))]
    tt = vi.type.tensor_type
    dims = tt.shape.dim
    how = rng.choice(["add", "remove", "grow", "zero", "negative", "symbolic", "no_shape", "no_type"])
    if how == "no_type":
        vi.ClearField("type")
    elif how == "no_shape":
        tt.ClearField("shape")
    elif how == "add":
        dims.add().dim_value = rng.choice([1, 3])
    elif how == "remove" and len(dims):
        del dims[len(dims) - 1]
    elif len(dims):
        d = dims[rng.randrange(len(dims))]
        if how == "symbolic":
            d.dim_param = "n"
        else:
            d.dim_value = {"grow": d.dim_value + 1, "zero": 0, "negative": -5}[how]
    return f"{vi.name} shape: {how}"


def cycle(m, rng):
    g = m.graph
    if not len(g.node):
        return "no node for a cycle"
    i = rng.randrange(len(g.node))
    if rng.random() < 0.3 and len(g.node) > 1:
        i, j = sorted(rng.sample(range(len(g.node)), 2))
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(g.node[i])
        b.CopyFrom(g.node[j])
        g.node[i].CopyFrom(b)
        g.node[j].CopyFrom(a)
        return f"swapped nodes #{i} and #{j} (a use before its definition, unless they are independent)"
    j = rng.randrange(i, len(g.node))  # this node or a later one: a back edge
    node = g.node[i]
    if not node.input:
        node.input.append(g.node[j].output[0])
    else:
        node.input[rng.randrange(len(node.input))] = g.node[j].output[0]
    return f"node #{i} ({node.op_type}) now reads the output of node #{j}"


def huge_dim(m, rng):
    g = m.graph
    big = rng.choice(HUGE)
    how = rng.choice(["input", "initializer", "reshape", "flag"])
    if how == "initializer" and len(g.initializer):
        t = g.initializer[rng.randrange(len(g.initializer))]
        t.dims[0:1] = [big] if len(t.dims) else []
        if not len(t.dims):
            t.dims.append(big)
        return f"initializer {t.name} dim 0 = {big}"
    if how == "reshape":
        # the shape a Reshape reads, wherever it comes from: an initializer or a Constant node
        for t in list(g.initializer) + [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute]:
            if t.data_type == TensorProto.INT64 and len(t.dims) == 1:
                v = numpy_helper.to_array(t).copy()
                v[-1] = big
                t.CopyFrom(numpy_helper.from_array(v, t.name))
                return f"shape constant {t.name} -> {v.tolist()}"
    vi = _data_inputs(g)[0]
    d = vi.type.tensor_type.shape.dim[rng.randrange(len(vi.type.tensor_type.shape.dim))]
    if how == "flag":
        d.dim_param = "n"
        shape = [x.dim_value if x.HasField("dim_value") else big for x in vi.type.tensor_type.shape.dim]
        return f"{vi.name} made dynamic, --input-shape gives {big}", \
            ["--input-shape", f"{vi.name}:{','.join(map(str, shape))}"]
    d.dim_value = big
    return f"input {vi.name} dim = {big}"


def empty_graph(m, rng):
    g = m.graph
    how = rng.choice(["no_nodes", "no_nodes_outputs", "no_inputs", "nothing", "no_graph", "zero_bytes"])
    if how in ("no_nodes", "no_nodes_outputs", "nothing"):
        del g.node[:]
    if how in ("no_nodes_outputs", "nothing"):
        del g.output[:]
    if how in ("no_inputs", "nothing"):
        del g.input[:]
    if how == "nothing":
        del g.initializer[:]
    if how == "no_graph":
        m.ClearField("graph")
    if how == "zero_bytes":
        m.Clear()
    return f"empty graph: {how}"


def duplicate_name(m, rng):
    g = m.graph
    how = rng.choice(["node_output", "initializer", "input", "init_is_node_output", "node_name"])
    if how == "node_output" and len(g.node) > 1:
        i, j = rng.sample(range(len(g.node)), 2)
        g.node[j].output[0] = g.node[i].output[0]
        return f"nodes #{i} and #{j} both write {g.node[i].output[0]}"
    if how == "initializer" and len(g.initializer):
        t = g.initializer.add()
        t.CopyFrom(g.initializer[rng.randrange(len(g.initializer) - 1)])
        return f"initializer {t.name} listed twice"
    if how == "init_is_node_output" and len(g.initializer) and len(g.node):
        node = g.node[rng.randrange(len(g.node))]
        t = g.initializer[rng.randrange(len(g.initializer))]
        t.name = node.output[0]
        return f"initializer renamed to node output {node.output[0]}"
    if how == "node_name" and len(g.node) > 1:
        for n in g.node:
            n.name = "same"
        return "every node named 'same'"
    vi = g.input.add()
    vi.CopyFrom(g.input[0])
    if rng.random() < 0.5:
        vi.type.tensor_type.elem_type = TensorProto.INT64
    return f"input {vi.name} listed twice"


def dangling_input(m, rng):
    g = m.graph
    if rng.random() < 0.25 or not len(g.node):
        g.output[0].name = "nobody_writes_this"
        return "graph output renamed to a name no node writes"
    node = g.node[rng.randrange(len(g.node))]
    if not node.input:
        node.input.append("nobody_writes_this")
    else:
        node.input[rng.randrange(len(node.input))] = "nobody_writes_this"
    return f"node {node.name or node.op_type} reads an undefined tensor"


def unknown_op(m, rng):
    g = m.graph
    if not len(g.node):
        return "no node to rename"
    node = g.node[rng.randrange(len(g.node))]
    how = rng.choice(["made_up", "made_up", "custom_domain", "other_real_op", "lower_case", "empty"])
    if how == "custom_domain":
        node.domain = rng.choice(["com.example", "ai.onnx.ml", "com.microsoft"])
        m.opset_import.append(helper.make_opsetid(node.domain, 1))
    else:
        node.op_type = {"made_up": "Frobnicate", "lower_case": node.op_type.lower(), "empty": "",
                        "other_real_op": rng.choice(["Conv", "Gemm", "MaxPool", "Concat", "Reshape",
                                                     "Softmax", "Split", "Transpose", "Loop", "If"])}[how]
    return f"node {node.name}: {how} -> {node.domain + '::' if node.domain else ''}{node.op_type}"


def wrong_opset(m, rng):
    how = rng.choice(["version", "version", "none", "twice", "ir_version"])
    if how == "version":
        v = rng.choice([0, 1, 6, 9, 24, 99, 10000, -1])
        m.opset_import[0].version = v
        return f"opset {v}"
    if how == "none":
        del m.opset_import[:]
        return "no opset_import"
    if how == "twice":
        m.opset_import.append(helper.make_opsetid("", 11))
        return "default domain imported twice (17 and 11)"
    v = rng.choice([0, 1, 3, 11, 99, 2**62])
    m.ir_version = v
    return f"ir_version {v}"


def attribute(m, rng):
    nodes = [n for n in m.graph.node if len(n.attribute)]
    if not nodes:
        node = m.graph.node[rng.randrange(len(m.graph.node))]
        node.attribute.append(helper.make_attribute("axis", 99))
        return f"node {node.name}: unexpected attribute axis=99"
    node = nodes[rng.randrange(len(nodes))]
    a = node.attribute[rng.randrange(len(node.attribute))]
    how = rng.choice(["out_of_range", "negative", "empty", "remove", "wrong_type", "huge"])
    if how == "remove":
        node.attribute.remove(a)
        return f"node {node.name}: attribute {a.name} removed"
    if how == "wrong_type":
        a.CopyFrom(helper.make_attribute(a.name, "seven"))
    elif a.type == onnx.AttributeProto.INTS:
        vals = list(a.ints)
        new = {"out_of_range": vals + [1], "negative": [-v for v in vals], "empty": [],
               "huge": [2**40] * len(vals)}[how]
        del a.ints[:]
        a.ints.extend(new)
    elif a.type == onnx.AttributeProto.INT:
        a.i = {"out_of_range": 99, "negative": -99, "empty": 0, "huge": 2**62}[how]
    elif a.type == onnx.AttributeProto.FLOAT:
        a.f = {"out_of_range": float("inf"), "negative": -1.0, "empty": float("nan"), "huge": 1e38}[how]
    elif a.type == onnx.AttributeProto.TENSOR:
        a.t.dims[:] = [2**40] if how == "huge" else []
    return f"node {node.name}: attribute {a.name} {how}"


def output_mismatch(m, rng):
    o = m.graph.output[0]
    how = rng.choice(["elem_type", "rank", "dims", "second_output", "input_as_output"])
    if how == "elem_type":
        o.type.tensor_type.elem_type = rng.choice([TensorProto.INT64, TensorProto.FLOAT16, TensorProto.BOOL])
    elif how == "rank":
        o.type.tensor_type.shape.dim.add().dim_value = 7
    elif how == "dims" and len(o.type.tensor_type.shape.dim):
        o.type.tensor_type.shape.dim[0].dim_value = 5
    elif how == "second_output":
        m.graph.output.add().CopyFrom(m.graph.output[0])
    else:
        m.graph.output.add().CopyFrom(_data_inputs(m.graph)[0])
    return f"graph output: {how}"


BYTE_MUTATIONS = {"bytes.flip": bytes_flip, "bytes.truncate": bytes_truncate, "bytes.insert": bytes_insert,
                  "bytes.zero": bytes_zero}
ONNX_MUTATIONS = {"onnx.drop_node": drop_node, "onnx.drop_initializer": drop_initializer,
                  "onnx.initializer_dtype": initializer_dtype, "onnx.initializer_dims": initializer_dims,
                  "onnx.input_type": input_type, "onnx.input_shape": input_shape, "onnx.cycle": cycle,
                  "onnx.huge_dim": huge_dim, "onnx.empty_graph": empty_graph,
                  "onnx.duplicate_name": duplicate_name, "onnx.dangling_input": dangling_input,
                  "onnx.unknown_op": unknown_op, "onnx.wrong_opset": wrong_opset, "onnx.attribute": attribute,
                  "onnx.output": output_mismatch}


# ---------------------------------------------------------------------- artifact mutations
# Each edits a copy of a compiled artifact in place. Edits to manifest.json that keep it
# consistent with the files' sha256 (fix_hashes) test what open_artifact checks beyond hashes.


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _save_manifest(art: Path, mf) -> None:
    (art / "manifest.json").write_text(json.dumps(mf, indent=2))


def fix_hashes(art: Path) -> None:
    mf = _manifest(art)
    for name in list(mf.get("files", {})):
        if (art / name).is_file():
            mf["files"][name] = hashlib.sha256((art / name).read_bytes()).hexdigest()
    _save_manifest(art, mf)


ARTIFACT_FILES = ["model.so", "weights.bin", "manifest.json"]


def artifact_flip(art: Path, rng, others):
    victim = art / rng.choice(ARTIFACT_FILES)
    b = bytearray(victim.read_bytes())
    at = rng.randrange(len(b))
    b[at] ^= 1 << rng.randrange(8)
    victim.write_bytes(bytes(b))
    return f"flipped a bit of {victim.name} at byte {at}"


def artifact_delete(art: Path, rng, others):
    victim = rng.choice(ARTIFACT_FILES + ["*"])
    for f in art.iterdir() if victim == "*" else [art / victim]:
        f.unlink()
    return f"deleted {victim}"


def artifact_truncate(art: Path, rng, others):
    victim = art / rng.choice(["weights.bin", "weights.bin", "model.so"])
    data = victim.read_bytes()
    n = rng.choice([0, rng.randrange(len(data)), len(data) - 1])
    victim.write_bytes(data[:n])
    fix_hashes(art)
    return f"{victim.name} cut to {n} of {len(data)} bytes, sha256 fixed"


def artifact_library(art: Path, rng, others):
    how = rng.choice(["other_model", "other_model", "garbage", "empty", "text", "elf_not_tvm"])
    lib = art / "model.so"
    if how == "other_model":
        other = rng.choice(others)
        shutil.copyfile(other / "model.so", lib)
        how = f"model.so of {other.name}"
    elif how == "elf_not_tvm":
        shutil.copyfile(_some_shared_library(), lib)
    else:
        lib.write_bytes({"garbage": rng.randbytes(4096), "empty": b"", "text": b"hello\n" * 100}[how])
    fix_hashes(art)
    return f"model.so replaced: {how}, sha256 fixed"


def _some_shared_library() -> Path:
    """A real ELF shared library that is no TVM module: one of Python's own extension modules."""
    import _ctypes

    return Path(_ctypes.__file__)


def _edit(mf, rng, path_and_values):
    """Set one of several (path, value) edits; a path is keys into the manifest."""
    path, value = rng.choice([(p, v) for p, v in path_and_values if _get(mf, p) != v])  # no no-op edits
    node = mf
    for k in path[:-1]:
        node = node[k]
    if value is _DELETE:
        node.pop(path[-1])
    else:
        node[path[-1]] = value
    return f"{'.'.join(map(str, path))} = {'<deleted>' if value is _DELETE else json.dumps(value)[:60]}"


_DELETE = object()


def _get(mf, path):
    try:
        for k in path:
            mf = mf[k]
        return mf
    except (KeyError, IndexError, TypeError):
        return _DELETE


def manifest_tensors(art: Path, rng, others):
    mf = _manifest(art)
    kind = rng.choice(["inputs", "outputs"])
    t = mf[kind][0]
    shape = t["shape"]
    edits = [((kind, 0, "shape"), v) for v in ([], [0], [-1], [2**40], [2**62, 2**62], "1,16", [1.5],
                                               None, shape + [1], shape[::-1], [2 * s for s in shape])]
    edits += [((kind, 0, "dtype"), v) for v in ("float64", "int8", "bogus", "object", "", 3, "float16")]
    edits += [((kind, 0, "name"), v) for v in ("", None, 7, "renamed")]
    edits += [((kind, 0), _DELETE), ((kind,), []), ((kind,), "x"), ((kind,), None),
              ((kind, 0), 5), ((kind,), mf[kind] + mf[kind])]
    what = _edit(mf, rng, edits)
    _save_manifest(art, mf)
    return what


def manifest_weights(art: Path, rng, others):
    mf = _manifest(art)
    ws = mf["weights"]
    i = rng.randrange(len(ws))
    w = ws[i]
    size = (art / "weights.bin").stat().st_size
    itemsize = np.dtype(w["dtype"]).itemsize
    edits = [(("weights", i, "offset"), v) for v in (w["offset"] + 1, w["offset"] + 4, size, size * 4, -64,
                                                     2**62, "0", None)]
    edits += [(("weights", i, "nbytes"), v) for v in (w["nbytes"] + 4, 0, -4, 2**62, w["nbytes"] * 2)]
    edits += [(("weights", i, "shape"), v) for v in (w["shape"][::-1], [w["nbytes"] // itemsize], [],
                                                     w["shape"] + [2], [-1], [2**40])]
    edits += [(("weights", i, "dtype"), v) for v in ("int32", "float64", "uint8", "bogus", "object", "<f4",
                                                     ">f4", None)]
    edits += [(("weights", i), _DELETE), (("weights",), ws + ws[:1]), (("weights",), {}),
              (("weights", i, "name"), _DELETE), (("weight_bytes",), 0)]
    what = _edit(mf, rng, edits)
    _save_manifest(art, mf)
    return what


def manifest_fields(art: Path, rng, others):
    mf = _manifest(art)
    edits = [(("library",), v) for v in ("missing.so", "../../../../bin/ls", "/bin/ls", "weights.bin", "",
                                         "manifest.json", None, ".")]
    edits += [(("weights_file",), v) for v in ("missing.bin", "model.so", "manifest.json", "/dev/zero", None,
                                               "/etc/passwd", "../weights.bin")]
    edits += [(("board",), v) for v in ({}, None, "host", {"name": "host"})]
    edits += [(("board", "arch"), v) for v in ("aarch64", "", None, 64)]
    edits += [(("files",), v) for v in ({}, None, [], {"model.so": "0" * 64})]
    edits += [(("files", "model.so"), _DELETE), (("files", "weights.bin"), _DELETE),
              (("format_version",), 2), (("format",), None), (("entry",), "nope"),
              (("swap",), {}), (("swap",), {"blocks": "x"}), (("swap",), None)]
    what = _edit(mf, rng, edits)
    _save_manifest(art, mf)
    if rng.random() < 0.2:  # the whole file something else
        raw = rng.choice([b"[]", b"null", b"\"manifest\"", b"1e999", b"{" * 100000, b"\xff\xfe{}"])
        (art / "manifest.json").write_bytes(raw)
        what = f"manifest.json is {raw[:12]!r}"
    return what


ARTIFACT_MUTATIONS = {"artifact.flip": artifact_flip, "artifact.delete": artifact_delete,
                      "artifact.truncate": artifact_truncate, "artifact.library": artifact_library,
                      "manifest.tensors": manifest_tensors, "manifest.weights": manifest_weights,
                      "manifest.fields": manifest_fields}


# --------------------------------------------------------------------------- .npy mutations
# Each gets the input the artifact expects (name, shape, dtype) and writes the file(s) to pass;
# it returns the --input arguments and what it did.


def _valid(shape, dtype, nrng) -> np.ndarray:
    return nrng.random(shape).astype(dtype)


def npy_shape(d: Path, infos, rng, nrng):
    name, shape, dtype = infos[0]
    how = rng.choice(["extra_dim", "missing_dim", "bigger", "empty", "transposed"])
    new = {"extra_dim": (1, *shape), "missing_dim": shape[1:], "bigger": tuple(s + 1 for s in shape),
           "empty": (0, *shape[1:]), "transposed": shape[::-1]}[how]
    return _inputs(d, infos, nrng, {name: _valid(new, dtype, nrng)}), f"{name} shape {new} ({how})"


def npy_dtype(d: Path, infos, rng, nrng):
    name, shape, dtype = infos[0]
    how = rng.choice(["float64", "int64", "float16", "bool", "complex64", "<U3", "datetime64[s]",
                      "structured", "void"])
    if how == "structured":
        x = np.zeros(shape, dtype=[("a", "<f4")])
    elif how == "void":
        x = np.zeros(shape, dtype="V4")
    else:
        x = np.zeros(shape, dtype=how)
    return _inputs(d, infos, nrng, {name: x}), f"{name} as {x.dtype}"


def npy_zero_d(d: Path, infos, rng, nrng):
    name, shape, dtype = infos[0]
    return _inputs(d, infos, nrng, {name: np.array(1.5, dtype)}), f"{name} is a 0-d array"


def npy_layout(d: Path, infos, rng, nrng):
    """Layouts numpy writes for a valid array: these must run."""
    name, shape, dtype = infos[0]
    x = _valid(shape, dtype, nrng)
    how = rng.choice(["big_endian", "fortran", "both", "nan"])
    if how in ("big_endian", "both"):
        x = x.astype(x.dtype.newbyteorder(">"))
    if how in ("fortran", "both"):
        x = np.asfortranarray(x)
    if how == "nan":
        x.reshape(-1)[0] = np.nan
    return _inputs(d, infos, nrng, {name: x}), f"{name} {how}"


def npy_pickle(d: Path, infos, rng, nrng):
    name, shape, dtype = infos[0]
    p = d / f"{name}.npy"
    how = rng.choice(["object_array", "raw_pickle", "object_npz"])
    if how == "object_array":
        np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif how == "raw_pickle":
        p.write_bytes(pickle.dumps({"x": [1, 2, 3]}))
    else:
        np.savez(d / "x.npz", x=_valid(shape, dtype, nrng))
        os.replace(d / "x.npz", p)
    return _inputs(d, infos, nrng, {}, {name: p}), f"{name}: {how}"


def npy_truncated(d: Path, infos, rng, nrng):
    name, shape, dtype = infos[0]
    p = d / f"{name}.npy"
    np.save(p, _valid(shape, dtype, nrng))
    data = p.read_bytes()
    n = rng.choice([0, 5, 20, 127, rng.randrange(128, len(data)), len(data) - 1])
    p.write_bytes(data[:n])
    return _inputs(d, infos, nrng, {}, {name: p}), f"{name}.npy cut to {n} of {len(data)} bytes"


def npy_not_npy(d: Path, infos, rng, nrng):
    name, shape, dtype = infos[0]
    p = d / f"{name}.npy"
    how = rng.choice(["random", "text", "empty", "directory", "missing", "fifo_like_dev", "onnx"])
    if how == "random":
        p.write_bytes(rng.randbytes(300))
    elif how == "text":
        p.write_text("1,2,3\n4,5,6\n")
    elif how == "empty":
        p.write_bytes(b"")
    elif how == "directory":
        p.mkdir()
    elif how == "fifo_like_dev":
        p = Path("/dev/null")
    elif how == "onnx":
        p.write_bytes(mlp().SerializeToString())
    return _inputs(d, infos, nrng, {}, {name: p}), f"{name}: {how}"


def npy_header(d: Path, infos, rng, nrng):
    """Hand-written .npy headers that lie about what follows."""
    name, shape, dtype = infos[0]
    descr = np.dtype(dtype).str
    lies = {"huge_shape": f"{{'descr': '{descr}', 'fortran_order': False, 'shape': (1099511627776, 1099511627776), }}",
            "huge_1d": f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({2**40},), }}",
            "negative": f"{{'descr': '{descr}', 'fortran_order': False, 'shape': (-1, 4), }}",
            "bad_descr": "{'descr': '<q9', 'fortran_order': False, 'shape': (1,), }",
            "object_descr": "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }",
            "not_a_dict": "[1, 2, 3]",
            "code": "__import__('os').system('true')",
            "short_data": f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}",
            "fortran_str": f"{{'descr': '{descr}', 'fortran_order': 'yes', 'shape': {tuple(shape)!r}, }}"}
    how = rng.choice(sorted(lies))
    header = lies[how].encode("latin1")
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    major = rng.choice([1, 1, 1, 3, 9])
    head = b"\x93NUMPY" + bytes([major, 0]) + struct.pack("<H", len(header)) if major != 3 else \
        b"\x93NUMPY\x03\x00" + struct.pack("<I", len(header))
    p = d / f"{name}.npy"
    p.write_bytes(head + header + bytes(16))
    return _inputs(d, infos, nrng, {}, {name: p}), f"{name}: header {how}, version {major}"


def npy_args(d: Path, infos, rng, nrng):
    """--input arguments that name the wrong things."""
    name, shape, dtype = infos[0]
    argv = _inputs(d, infos, nrng, {})
    how = rng.choice(["unknown_name", "twice", "missing_one", "unnamed", "empty_name", "no_path"])
    if how == "unknown_name":
        argv += ["--input", f"nosuch={d / f'{name}.npy'}"]
    elif how == "twice":
        argv += argv[:2]
    elif how == "missing_one":
        argv = argv[2:]
        if not argv:  # a single-input model: no --input means random inputs, so name a missing file
            argv = ["--input", f"{name}={d / 'missing.npy'}"]
    elif how == "unnamed":
        argv = ["--input", str(d / f"{name}.npy")] + argv[2:]
    elif how == "empty_name":
        argv = ["--input", f"={d / f'{name}.npy'}"]
    else:
        argv = ["--input", f"{name}="]
    return argv, f"--input: {how}"


def _inputs(d: Path, infos, nrng, arrays: dict, paths: dict | None = None) -> list[str]:
    """--input arguments for every input: the given arrays or paths, valid arrays for the rest."""
    argv = []
    for name, shape, dtype in infos:
        p = (paths or {}).get(name)
        if p is None:
            p = d / f"{name}.npy"
            np.save(p, arrays[name] if name in arrays else _valid(shape, dtype, nrng), allow_pickle=False)
        argv += ["--input", f"{name}={p}"]
    return argv


NPY_MUTATIONS = {"npy.shape": npy_shape, "npy.dtype": npy_dtype, "npy.zero_d": npy_zero_d,
                 "npy.layout": npy_layout, "npy.pickle": npy_pickle, "npy.truncated": npy_truncated,
                 "npy.not_npy": npy_not_npy, "npy.header": npy_header, "npy.args": npy_args}

KINDS = list(BYTE_MUTATIONS) + list(ONNX_MUTATIONS) + list(ARTIFACT_MUTATIONS) + list(NPY_MUTATIONS)


# ---------------------------------------------------------------------------------- campaign


@dataclass
class Case:
    index: int
    kind: str
    seed_model: str
    detail: str
    commands: list[tuple[list[str], float, list[Path]]] = field(default_factory=list)  # argv, timeout, outputs


@dataclass
class Finding:
    case: Case
    outcome: str
    argv: list[str]
    error_line: str
    seconds: float

    @property
    def bad(self) -> bool:
        return self.outcome in harness.BAD


class Campaign:
    """Seed models and their compiled artifacts in `workdir`; cases made and run one at a time."""

    def __init__(self, workdir: Path, seed: int = 0):
        self.workdir, self.seed = Path(workdir), seed
        self.models: dict[str, Path] = {}
        self.artifacts: dict[str, Path] = {}

    def model(self, name: str) -> Path:
        if name not in self.models:
            p = self.workdir / "seeds" / f"{name}.onnx"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(SEEDS[name]().SerializeToString())
            self.models[name] = p
        return self.models[name]

    def artifact(self, name: str) -> Path:
        """The seed compiled once, in a forked child like every case (this process never starts TVM)."""
        if name not in self.artifacts:
            out = self.workdir / "seeds" / f"{name}-host"
            if not (out / "manifest.json").exists():  # else made by an earlier campaign in this workdir
                r = harness.run_cli(["compile", str(self.model(name)), "-o", str(out)], COMPILE_TIMEOUT)
                if r.outcome != "ok":
                    raise RuntimeError(f"seed model {name} does not compile ({r.outcome}): {r.stderr[-2000:]}")
            self.artifacts[name] = out
        return self.artifacts[name]

    def make(self, index: int) -> Case:
        """Case `index`: its files under workdir/case-<index>, the same for the same seed and index."""
        rng = random.Random(f"edgetvm-fuzz:{self.seed}:{index}")
        kind = KINDS[index % len(KINDS)]
        seed_model = rng.choice(sorted(SEEDS))
        d = self.workdir / f"case-{index}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        case = Case(index, kind, seed_model, "")
        if kind in BYTE_MUTATIONS or kind in ONNX_MUTATIONS:
            flags = []
            if kind in BYTE_MUTATIONS:
                data, case.detail = BYTE_MUTATIONS[kind](self.model(seed_model).read_bytes(), rng)
            else:
                m = onnx.load_from_string(self.model(seed_model).read_bytes())
                got = ONNX_MUTATIONS[kind](m, rng)
                case.detail, flags = got if isinstance(got, tuple) else (got, [])
                data = m.SerializeToString()
            (d / "model.onnx").write_bytes(data)
            out = d / "out"
            case.commands.append((["compile", str(d / "model.onnx"), "-o", str(out), *flags],
                                  COMPILE_TIMEOUT, [out]))
            # run only if the compile succeeds: see run_case
            case.commands.append((["run", str(out), "--repeat", "1", "--output", str(d / "y.npz")],
                                  RUN_TIMEOUT, [d / "y.npz"]))
            return case
        base = self.artifact(seed_model)
        nrng = np.random.default_rng(rng.getrandbits(64))
        if kind in ARTIFACT_MUTATIONS:
            art = d / "art"
            shutil.copytree(base, art)
            others = [self.artifact(n) for n in sorted(SEEDS) if n != seed_model and n in self.artifacts] \
                or [self.artifact(sorted(set(SEEDS) - {seed_model})[0])]
            case.detail = ARTIFACT_MUTATIONS[kind](art, rng, others)
            inputs = []
        else:
            art = base
            infos = [(t["name"], tuple(t["shape"]), t["dtype"]) for t in _manifest(base)["inputs"]]
            inputs, case.detail = NPY_MUTATIONS[kind](d, infos, rng, nrng)
        case.commands.append((["run", str(art), "--repeat", "1", "--output", str(d / "y.npz"), *inputs],
                              RUN_TIMEOUT, [d / "y.npz"]))
        return case


def run_case(case: Case) -> Finding:
    """Run the case's commands in order until one does not succeed; the worst outcome is the case's."""
    worst, seconds = None, 0.0
    for argv, timeout, outputs in case.commands:
        r = harness.run_cli(argv, timeout, outputs=outputs)
        seconds += r.seconds
        outcome = r.outcome
        if outcome == "ok" and r.stderr.strip():  # a result must not come with warnings or debris
            outcome = "noisy"
        if worst is None or harness.OUTCOMES.index(outcome) > harness.OUTCOMES.index(worst.outcome):
            worst = Finding(case, outcome, argv, r.error_line, 0.0)
        if outcome != "ok":
            break
    worst.seconds = seconds
    return worst


def campaign(n: int, seed: int = 0, workdir: Path | None = None, only: list[int] | None = None,
             keep: bool = False, progress=lambda f: None) -> list[Finding]:
    """Make and run cases 0..n-1 (or `only` those); each case's files are deleted after it unless `keep`."""
    harness.preload()
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="edgetvm-fuzz-")) if own else Path(workdir)
    findings = []
    try:
        camp = Campaign(workdir, seed)
        for i in (only if only is not None else range(n)):
            case = camp.make(i)
            f = run_case(case)
            findings.append(f)
            progress(f)
            if not keep:
                shutil.rmtree(workdir / f"case-{i}", ignore_errors=True)
    finally:
        if own and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return findings


def table(findings: list[Finding]) -> str:
    """Counts by mutation kind x outcome, then every bad case with what reproduces it."""
    counts = Counter((f.case.kind, f.outcome) for f in findings)
    cols = [o for o in harness.OUTCOMES if any(k[1] == o for k in counts)] or ["ok"]
    kinds = [k for k in KINDS if any(f.case.kind == k for f in findings)]
    lines = [f"{'mutation':<24}" + "".join(f"{c:>13}" for c in cols) + f"{'cases':>8}"]
    for k in kinds + ["total"]:
        row = [sum(v for (kk, o), v in counts.items() if o == c and k in (kk, "total")) for c in cols]
        lines.append(f"{k:<24}" + "".join(f"{v:>13}" for v in row) + f"{sum(row):>8}")
    bad = [f for f in findings if f.bad]
    lines.append(f"\nbad cases: {len(bad)}")
    for f in bad:
        lines.append(f"  case {f.case.index} [{f.outcome}] {f.case.kind} on {f.case.seed_model}: {f.case.detail}")
        lines.append(f"    edgetvm {' '.join(f.argv)}")
        lines.append(f"    {f.error_line}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgetvm.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000, help="cases 0..N-1 (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed (default 0)")
    p.add_argument("--only", type=int, action="append", metavar="I", help="run only case I (repeatable)")
    p.add_argument("--keep", metavar="DIR", help="build the cases in DIR and keep their files, to reproduce them")
    p.add_argument("--quiet", action="store_true", help="no line per case")
    args = p.parse_args(argv)

    t0 = time.perf_counter()

    def progress(f: Finding):
        if not args.quiet or f.bad:
            print(f"case {f.case.index:>4} {f.case.kind:<24} {f.case.seed_model:<16} {f.outcome:<12} "
                  f"{f.seconds:5.1f} s  {f.case.detail}: {f.error_line[:200] or '(ran)'}", flush=True)

    findings = campaign(args.cases, args.seed, Path(args.keep) if args.keep else None, args.only,
                        keep=bool(args.keep), progress=progress)
    print(f"\n{len(findings)} cases, seed {args.seed}, {time.perf_counter() - t0:.0f} s\n")
    print(table(findings))
    return 1 if any(f.bad for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
