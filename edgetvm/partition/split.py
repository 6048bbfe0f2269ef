"""A model split between a device and a server: the fused graph, per-side profiles, and the split artifact.

A split artifact is a directory with two ordinary artifacts, `device/` and `server/` (each a library
for its own board, its own weights and a manifest whose entry is `device` or `server`, taking the
part's live-in values), and a top-level manifest.json: the cut, the crossing tensors with shapes and
bytes, the profiles it was planned with, the predicted times, and the sha256 of both part manifests.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import edgetvm
from edgetvm.costmodels import profile as profiles
from edgetvm.errors import UserError
from edgetvm.passes import graph_cut, onnx_import, pipeline
from edgetvm.passes.onnx_import import TensorInfo
from edgetvm.runtime import artifact

FORMAT = "edgetvm-split"
FORMAT_VERSION = 1
PARTS = ("device", "server")


@dataclass
class Model:
    """A model imported once: deployed main, its weights, and the kernel-call graph partitioners see."""
    path: Path
    sha256: str
    inputs: list[TensorInfo]
    output_names: list[str]
    deploy: object
    weights: list
    weight_names: list[str]
    graph: profiles.Graph


def load_model(path: str | Path, shapes=None) -> Model:
    path = Path(path)
    model, inputs = onnx_import.prepare(path, shapes)
    mod, weights = onnx_import.import_onnx(model, inputs)
    # Weights kept in the model's layouts: graph cuts and row slices split them as the model has them.
    transform, deploy = pipeline.lift_weight_transforms(mod, pack_matmuls=False)
    deployed = pipeline.transform_weights(transform, weights)
    fused = pipeline.fuse(deploy, _host().target())
    return Model(path, artifact.sha256_file(path), inputs, [o.name for o in model.graph.output], deploy,
                 deployed, pipeline.weight_names(deploy), profiles.graph_of(fused))


def _host():
    from edgetvm.targets import load_board

    return load_board("host")


def fused_for(m: Model, board):
    """main fused and scheduled for `board`; its kernel calls must be the profiled graph's, in order."""
    fused = pipeline.fuse(m.deploy, board.target())
    got = profiles.graph_of(fused)
    if [op["reads"] for op in got.ops] != [op["reads"] for op in m.graph.ops]:
        raise UserError(f"fusing for {board.name} gives another graph than for this machine; "
                        f"split for boards of the same fusion rules")
    return fused


def profile(m: Model, device, log=lambda *a: None, profile_file: str | Path | None = None,
            session=None) -> profiles.Profile:
    """The model's per-layer profile on `device`: an emulated device profile, a board that runs here, or
    a board behind an RPC `session`."""
    key = profiles.profile_key(m.sha256, m.inputs, device, m.graph)
    if profile_file is not None:
        return profiles.load(profile_file, key)
    from edgetvm.compiler import compile_model
    from edgetvm.targets import Board

    if isinstance(device, Board) and not device.runs_on_host():
        if session is None:
            raise UserError(f"profiling on board '{device.name}' needs the board: give --rpc HOST:PORT or "
                            f"--tracker HOST:PORT --key KEY")
        fused = fused_for(m, device)
        return profiles.cached(None, m.graph, device, key, log,
                               measure_fn=lambda: profiles.measure_on_board(fused, m.graph, device, session, key))

    with tempfile.TemporaryDirectory(prefix="edgetvm-prof-") as tmp:
        path = profiles.cache_dir() / f"{profiles._digest(key)}.json"
        if path.is_file():
            try:
                return profiles.load(path, key)
            except UserError:
                pass
        art = compile_model(m.path, _host(), Path(tmp) / "host", {i.name: i.shape for i in m.inputs},
                            pack_weights=False)  # the kernels of m.graph
        return profiles.cached(art.path, m.graph, device, key, log)


def write_split(m: Model, device_set: frozenset[int], device_board, server_board, out: str | Path,
                plan: dict) -> Path:
    """Compile both parts for their boards and write the split artifact (all or nothing)."""
    out = Path(out)
    groups = [sorted(device_set), [k for k in range(len(m.graph.ops)) if k not in device_set]]
    with artifact.staging_dir(out) as stage:
        parts = {}
        for side, board in zip(PARTS, (device_board, server_board)):
            fused = fused_for(m, board)
            mod, sigs, data_inputs, outputs = graph_cut.emit_parts(fused, groups, len(m.weights), list(PARTS))
            sig = sigs[PARTS.index(side)]
            part = graph_cut.single_output_bare(graph_cut.only(mod, side), side)
            ex = pipeline.finish(part, board.target())
            d = stage / side
            d.mkdir()
            pipeline.export(ex, str(d / "model.so"), board.cross_compiler)
            named = [(m.weight_names[w], m.weights[w]) for w in sig.weights]
            index = artifact.write_weights(d / "weights.bin", named)
            params = part[side].params
            infos = [TensorInfo(n, _shape(p), str(p.ty.dtype)) for n, p in zip(sig.inputs, params)]
            ret = part[side].ret_ty
            ret = ret.fields if hasattr(ret, "fields") else [ret]
            outs = [TensorInfo(n, _shape(t), str(t.dtype)) for n, t in zip(sig.outputs, ret)]
            import tvm

            artifact.write_manifest(d, {
                "model": {"source": m.path.name, "sha256": m.sha256, "part": side},
                "board": {"name": board.name, "arch": board.arch, "target": board.tvm_target},
                "tvm_version": tvm.__version__, "edgetvm_version": edgetvm.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "entry": side, "library": "model.so", "weights_file": "weights.bin",
                "inputs": [i.to_json() for i in infos], "outputs": [o.to_json() for o in outs],
                "weights": index, "weight_bytes": int(sum(w["nbytes"] for w in index))})
            parts[side] = {"inputs": sig.inputs, "outputs": sig.outputs,
                           "manifest_sha256": artifact.sha256_file(d / artifact.MANIFEST)}
        values = {v: dict(zip(("shape", "dtype"), _describe(t))) for v, t in _value_types(fused).items()}
        crossing = [{"value": v, **values[v], "bytes": m.graph.values[v]} for v in plan["crossing"]]
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model": {"source": m.path.name, "sha256": m.sha256},
            "inputs": [{"value": v, **i.to_json()} for v, i in zip(data_inputs, m.inputs)],
            "outputs": [{"value": v, "name": n, **values[v]} for v, n in zip(outputs, _names(m, outputs))],
            "device_ops": sorted(device_set), "ops": len(m.graph.ops), "crossing": crossing,
            "parts": parts, "plan": {k: v for k, v in plan.items() if k != "crossing"},
        }
        (stage / artifact.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _names(m: Model, outputs: list[str]) -> list[str]:
    return m.output_names if len(m.output_names) == len(outputs) else [f"output{i}" for i in range(len(outputs))]


def _shape(p) -> tuple[int, ...]:
    ty = getattr(p, "ty", p)
    return tuple(int(s) for s in ty.shape.values)


def _describe(ty) -> tuple[list[int], str]:
    return [int(s) for s in ty.shape.values], str(ty.dtype)


def _value_types(fused) -> dict:
    names, data_inputs, _ = graph_cut.value_names(fused)
    out = {names[v]: v.ty for v in data_inputs}
    for b in graph_cut.bindings_of(fused):
        if hasattr(b.var.ty, "shape") and getattr(b.var.ty, "dtype", None) is not None:
            out[names[b.var]] = b.var.ty
    return out


def open_split(path: str | Path) -> dict:
    """The split artifact's manifest, with both parts checked against the sha256 it recorded."""
    p = Path(path)
    mf = p / artifact.MANIFEST
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError):
        raise UserError(f"{p} is not a split artifact (no readable {artifact.MANIFEST}); "
                        f"make one with `edgetvm partition`") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{mf} is not an edgetvm split artifact of format version {FORMAT_VERSION}; "
                        f"partition the model again with this edgetvm")
    for side in PARTS:
        part_mf = p / side / artifact.MANIFEST
        if not part_mf.is_file() or artifact.sha256_file(part_mf) != manifest["parts"][side]["manifest_sha256"]:
            raise UserError(f"{p / side} does not match the split artifact's manifest: the part was modified "
                            f"or replaced; partition the model again")
        artifact.open_artifact(p / side)  # checks the part's own files against its hashes
    return manifest


def is_split(path: str | Path) -> bool:
    try:
        return json.loads((Path(path) / artifact.MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False
