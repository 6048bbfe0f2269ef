"""`edgetvm compile`: an ONNX or TFLite file and a board in, an artifact directory out (all or nothing)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import edgetvm
from edgetvm.costmodels import roofline
from edgetvm.errors import UserError
from edgetvm.passes import alq, model_import, onnx_import, pipeline, sparse
from edgetvm.runtime import artifact
from edgetvm.targets import Board

LIBRARY = "model.so"
WEIGHTS = "weights.bin"


@dataclass
class CompileResult:
    path: Path
    manifest: dict
    seconds: dict = field(default_factory=dict)


def output_infos(deploy, model) -> list[onnx_import.TensorInfo]:
    """Outputs of `main`, named after the model's graph outputs, with their static shapes."""
    from tvm import relax

    ret = deploy["main"].ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    names = model_import.output_names(model)
    if len(fields) != len(names):
        names = [f"output{i}" for i in range(len(fields))]
    infos = []
    for name, t in zip(names, fields):
        if not isinstance(t, relax.TensorType) or t.shape is None or t.shape.values is None:
            # The inputs' shapes are all static by now: the output's shape depends on input values.
            node = model_import.shape_source(model)
            where = (f" (operator {node.op_type}, node '{node.name or node.output[0]}', computes a shape from "
                     f"them)" if node is not None else "")
            raise UserError(f"output '{name}' has a shape that depends on input values, not only input "
                            f"shapes{where}; edgetvm compiles static shapes only: make those values constants "
                            f"when exporting the model")
        infos.append(onnx_import.TensorInfo(name, tuple(int(s) for s in t.shape.values), str(t.dtype)))
    return infos


def check_fits(infos, board: Board, kind: str) -> None:
    """An input or output larger than the board's memory is a wrong shape, not a model to build
    (a dimension of 2**40 would otherwise reach TVM, and a run would try to allocate it)."""
    for i in infos:
        n = np.dtype(i.dtype).itemsize
        for d in i.shape:
            n *= d
        if n > board.memory_mib << 20:
            raise UserError(f"{kind} '{i.name}' is {i.dtype}[{','.join(map(str, i.shape))}], {n / 2**30:.3g} GiB: more "
                            f"than {board.name}'s {board.memory_mib} MiB of memory; check the model's shapes "
                            f"(and --input-shape)")


def compile_model(model_path: str | Path, board: Board, out: str | Path,
                  input_shapes: dict[str, tuple[int, ...]] | None = None,
                  tuning_db=None, memory_budget: int | None = None, log=lambda *a: None,
                  pack_weights: bool = True) -> CompileResult:
    model_path, out = Path(model_path), Path(out)
    t0 = time.perf_counter()
    seconds = {}
    model, inputs = model_import.prepare(model_path, input_shapes)
    check_fits(inputs, board, "input")
    mod, weights = model_import.import_model(model, inputs)
    packed = alq.packed_in(model) if model_import.is_onnx(model) else None  # quantize writes ONNX
    if packed:  # multi-bit weights (edgetvm quantize): computed by the bit-packed kernels, stored packed
        mod, weights = alq.apply(mod, weights, packed)
    subnets = sparse.subnets_in(model) if model_import.is_onnx(model) else None  # `edgetvm dress` writes ONNX
    if subnets:  # nested sparse subnets over one weight store: the `subnet` input picks one per call
        mod, weights, stores = sparse.apply(mod, weights, subnets, board.target())
        inputs = sparse.with_subnet_input(inputs)
    seconds["import"] = time.perf_counter() - t0

    # Fail on the output directory before minutes of compilation, not after.
    with artifact.staging_dir(out) as stage:
        t = time.perf_counter()
        # Swapping builds split weights by columns: they keep the model's layouts.
        transform, deploy = pipeline.lift_weight_transforms(mod, pack_matmuls=pack_weights and memory_budget is None,
                                                            target=board.target())
        deployed_weights = pipeline.transform_weights(transform, weights)
        names = pipeline.weight_names(deploy)
        outputs = output_infos(deploy, model)
        check_fits(outputs, board, "output")
        seconds["weights"] = time.perf_counter() - t

        t = time.perf_counter()
        target = board.target()
        swap_plan = None
        if memory_budget is None:
            fused = pipeline.fuse(deploy, target, database=tuning_db)
            costs = roofline.kernel_costs(fused)
            ex = pipeline.finish(fused, target)
            named = list(zip(names, deployed_weights))
        else:
            fused, blocks_mod, swap_plan, named = plan_swap(deploy, deployed_weights, names, board,
                                                            memory_budget, tuning_db)
            costs = roofline.kernel_costs(fused)
            ex = pipeline.finish(blocks_mod, target)
        pipeline.export(ex, str(stage / LIBRARY), board.cross_compiler)
        seconds["build"] = time.perf_counter() - t

        index = artifact.write_weights(stage / WEIGHTS, named)
        import tvm

        manifest = {
            "model": {"source": model_path.name, "sha256": artifact.sha256_file(model_path)},
            "board": {"name": board.name, "arch": board.arch, "target": board.tvm_target},
            "tvm_version": tvm.__version__,
            "edgetvm_version": edgetvm.__version__,
            "tuning_db": str(tuning_db.path) if getattr(tuning_db, "path", None) else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "entry": "main",
            "library": LIBRARY,
            "weights_file": WEIGHTS,
            "inputs": [i.to_json() for i in inputs],
            "outputs": [o.to_json() for o in outputs],
            "weights": index,
            "weight_bytes": int(sum(w["nbytes"] for w in index)),
            "roofline": {"kernels": len(costs), "flops": sum(c.flops for c in costs),
                         "bytes": sum(c.bytes for c in costs),
                         "bound_ms": roofline.bound_seconds(costs, board) * 1e3},
        }
        if swap_plan is not None:
            manifest["swap"] = swap_plan.finish(index)
        if subnets:
            manifest["dress"] = sparse.manifest_entry(subnets, stores, weights)
        artifact.write_manifest(stage, manifest)
        artifact.open_artifact(stage, verify=False)  # never publish an artifact that `run` would refuse
    seconds["total"] = time.perf_counter() - t0
    log(f"compiled {model_path.name} for {board.name} in {seconds['total']:.1f} s -> {out}")
    return CompileResult(out, artifact.open_artifact(out, verify=False).manifest, seconds)


MIN_PIECE = 64 << 10


@dataclass
class SwapPlan:
    """A block plan and the weight order that makes each block's weights one contiguous range."""
    plan: object
    signatures: list
    data_inputs: list[str]
    outputs: list[str]
    order: list[int]  # new position -> old weight index

    def finish(self, index: list[dict]) -> dict:
        position = {old: new for new, old in enumerate(self.order)}
        placed, blocks = set(), []
        for sig, bk in zip(self.signatures, self.plan.blocks):
            mine = [position[w] for w in sig.weights if position[w] not in placed]
            placed.update(mine)
            lo = min((index[w]["offset"] for w in mine), default=0)
            hi = max((index[w]["offset"] + index[w]["nbytes"] for w in mine), default=0)
            blocks.append({"function": sig.function, "inputs": sig.inputs, "outputs": sig.outputs,
                           "weights": [position[w] for w in sig.weights], "range": [lo, hi - lo],
                           "weight_bytes": bk.weight_bytes, "act_bytes": bk.act_bytes,
                           "planned_bytes": bk.planned_bytes, "predicted_ms": bk.compute_s * 1e3})
        return {"budget": self.plan.budget, "prefetch": self.plan.prefetch,
                "predicted_peak": self.plan.predicted_peak, "reserve": self.plan.extra.get("reserve", 0),
                "predicted_ms": self.plan.predicted_s * 1e3,
                "data_inputs": self.data_inputs, "outputs": self.outputs, "blocks": blocks}


def plan_swap(deploy, weights, names, board, budget: int, tuning_db=None):
    """Fuse, partition into blocks that fit `budget` (splitting layers that are too big), emit block functions."""
    from edgetvm.passes import swap

    target = board.target()
    fused_for: dict = {}

    def attempt(piece, prefetch):
        if piece not in fused_for:
            d, w, n = (deploy, weights, names) if piece is None else \
                swap.split_oversized_layers(deploy, weights, names, piece)
            fused = pipeline.fuse(d, target, database=tuning_db)
            fused_for[piece] = (fused, w, n, *swap.op_memory(fused, len(w)))
        fused, w, n, ops, _, _ = fused_for[piece]
        return swap.plan_blocks(ops, [x.nbytes for x in w], budget, board, prefetch=prefetch,
                                reserve=swap.RUNTIME_RESERVE)

    # For each mode, the coarsest split that fits; then the mode with the lower predicted latency.
    pieces = [None] + [budget >> k for k in range(2, 16) if budget >> k >= MIN_PIECE]
    found, error = [], None
    for prefetch in (True, False):
        for piece in pieces:
            try:
                found.append((attempt(piece, prefetch), piece))
                break
            except UserError as e:
                error = e
    if not found:
        raise error
    plan, piece = min(found, key=lambda f: f[0].predicted_s)
    fused, w, n, ops, data_inputs, outputs = fused_for[piece]
    if piece is not None:
        # Rejoin the pieces of a layer that the plan puts in one block; the plan it was still fits.
        # (A joined kernel may plan more scratch than its pieces did: then keep the pieces.) The new
        # plan may cut elsewhere and put pieces together again, so repeat while that happens.
        cuts: dict = {}
        for _ in range(8):
            joined = swap.merged_cuts(plan, w, n)
            if sum(map(len, joined.values())) == sum(1 for x in n if ".part" in x):
                break
            cuts.update(joined)
            d, w2, n2 = swap.split_oversized_layers(deploy, weights, names, piece, cuts)
            fused2 = pipeline.fuse(d, target, database=tuning_db)
            ops2, din2, outs2 = swap.op_memory(fused2, len(w2))
            try:
                plan = swap.plan_blocks(ops2, [x.nbytes for x in w2], budget, board, prefetch=plan.prefetch,
                                        reserve=swap.RUNTIME_RESERVE)
            except UserError:
                break
            fused, w, n, ops, data_inputs, outputs = fused2, w2, n2, ops2, din2, outs2
    mod, sigs, din, outs = swap.emit_blocks(fused, ops, plan, data_inputs, outputs, len(w))
    order, seen = [], set()
    for sig in sigs:
        for i in sig.weights:
            if i not in seen:
                seen.add(i)
                order.append(i)
    order += [i for i in range(len(w)) if i not in seen]
    named = [(n[i], w[i]) for i in order]
    return fused, mod, SwapPlan(plan, sigs, din, outs, order), named


def random_inputs(infos, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a smoke run: uniform in [0, 1) for floats, small non-negative values for integers."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in infos:
        dt = np.dtype(i.dtype)
        if dt.kind == "f":
            out[i.name] = rng.random(i.shape, dtype=np.float32).astype(dt)
        elif dt.kind == "b":
            out[i.name] = rng.integers(0, 2, i.shape).astype(dt)
        else:
            out[i.name] = rng.integers(0, 8, i.shape).astype(dt)
    return out
