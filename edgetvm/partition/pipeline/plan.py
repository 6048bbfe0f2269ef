"""Planning a pipeline: profiles per device kind, placement (PSO) and stages (DP), and the plan
directory `edgetvm pipeline run` executes.

A plan directory holds plan.json (the fleet, the placement, each stage's layers, devices, bands and
the rows each device reads, the predicted periods, throughput and latency) and, per stage and
device, the compiled library of what that device computes (`s{stage}-{device}.so`, the stage's
Relax part or its band of rows from passes/row_slices.py, fused and compiled for the device) with
its weights (`.npz`), plus the single-device build of the whole model (`reference.so`) that the
run's outputs are checked against.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError
from edgetvm.partition.pipeline import dp, pso
from edgetvm.partition.pipeline.fleet import Fleet

FORMAT = "edgetvm-pipeline"
FORMAT_VERSION = 1


@dataclass
class Prepared:
    model: object               # partition.split.Model
    canonical: object           # the deploy module as row_slices sees it
    groups: list[list[int]]     # layer -> canonical binding indices
    problem: dp.Problem


def prepare(model_path, fleet: Fleet, log=lambda *a: None, shapes=None, calibrate=False) -> Prepared:
    """Import the model, map its layers to the fused graph, profile each device kind of the fleet.
    `calibrate`: True measures the costs of moving tensors on one emulated device per kind
    (calibrate.py; needs root), a dict gives them (from an earlier measurement), False leaves them out."""
    from tvm import relax

    from edgetvm.partition import split
    from edgetvm.passes import graph_cut, row_slices

    if any(d.tracker_key for d in fleet.devices):
        raise UserError("fleets with real boards (tracker_key) cannot be planned yet: profile each board "
                        "with `edgetvm partition --tracker` first; emulated devices only for now")
    m = split.load_model(model_path, shapes)
    can = row_slices.canonical(m.deploy)
    g = m.graph
    groups = kernel_layers(can, g, len(m.weights))
    if groups is None:
        raise UserError(f"{Path(model_path).name}: its layers do not map one to one onto the {len(g.ops)} "
                        f"kernel calls of the fused graph; pipeline planning needs one kernel per layer")
    bindings = graph_cut.bindings_of(can)
    heights, windows = {}, []
    main = can["main"]
    for k, v in enumerate(main.params[:int(main.attrs["num_input"])]):
        s = row_slices._shape(v)
        if s is not None and len(s) == 4:
            heights[f"in{k}"] = s[2]
    for l, grp in enumerate(groups):
        last = bindings[grp[-1]]
        s = row_slices._shape(last.var)
        if s is not None and len(s) == 4:
            heights[g.ops[l]["out"]] = s[2]
        first = bindings[grp[0]].value
        name = row_slices.op_name(first)
        ok = s is not None and len(s) == 4 and all(
            row_slices.op_name(bindings[b].value) in row_slices.ELEMENTWISE for b in grp[1:])
        if name in row_slices.WINDOWED and ok and row_slices._window(first) is not None:
            w = row_slices._window(first)
            windows.append((w.k, w.s, w.d))
        elif name in row_slices.ELEMENTWISE and ok:
            windows.append(())
        else:
            windows.append(None)
    sizes = [int(np.asarray(w).nbytes) for w in m.weights]
    _check_capacity(model_path, fleet, g, sizes)
    times = {}
    for kind in sorted({d.kind for d in fleet.devices}):
        prof = split.profile(m, next(d.profile for d in fleet.devices if d.kind == kind), log)
        times[kind] = list(prof.time_s)
    problem = dp.Problem(g, times, windows, heights, [], [op["weights"] for op in g.ops], sizes,
                         list(fleet.devices), sum(g.values[v] for v in g.inputs))
    if calibrate is True:
        from edgetvm.partition.pipeline.calibrate import calibrate as measure

        problem.overhead = measure(fleet, log)
    elif calibrate:
        problem.overhead = dict(calibrate)
    return Prepared(m, can, groups, problem)


def kernel_layers(can, graph, num_weights: int) -> list[list[int]] | None:
    """The canonical module's bindings grouped as fusion grouped them into the graph's kernels: layer l
    holds the bindings of kernel l, so a cut between layers means the same on both sides. None when
    they do not map one to one.

    Grouping the bindings by their own order (row_slices.layers) is not enough: fusion may compute a
    residual block's shortcut before its second convolution while the bindings have it after, and
    then attaches the join (add, relu) to the other branch; layer l of one would be a different
    kernel of the other, and a stage would send values the next stage does not read."""
    from tvm import relax

    from edgetvm.passes import graph_cut, row_slices

    bindings = graph_cut.bindings_of(can)
    main = can["main"]
    num_input = int(main.attrs["num_input"])
    weight_index = {p: i for i, p in enumerate(main.params[num_input:num_input + num_weights])}
    index = {b.var: i for i, b in enumerate(bindings)}
    reads = [list(relax.analysis.free_vars(b.value)) for b in bindings]
    anchors = [i for i, b in enumerate(bindings) if row_slices.op_name(b.value) not in row_slices.ELEMENTWISE]
    if len(anchors) != len(graph.ops):
        return None
    # A kernel with weights is found by them; one without (mean, reshape) by its place among those.
    by_weight = {}
    for i in anchors:
        for v in reads[i]:
            if v in weight_index:
                by_weight.setdefault(weight_index[v], i)
    owner: dict[int, int] = {}
    free = iter([i for i in anchors if not any(v in weight_index for v in reads[i])])
    for l, op in enumerate(graph.ops):
        hits = {by_weight[w] for w in op["weights"] if w in by_weight}
        i = hits.pop() if len(hits) == 1 else (next(free, None) if not op["weights"] else None)
        if i is None or i in owner:
            return None
        owner[i] = l
    # An elementwise binding belongs to the last kernel it reads from, as fusion appends it there.
    for i, b in enumerate(bindings):
        if i in owner:
            continue
        srcs = [owner[index[v]] for v in reads[i] if v in index]
        if not srcs:
            return None
        owner[i] = max(srcs)
    groups = [[] for _ in graph.ops]
    for i in sorted(owner):
        groups[owner[i]].append(i)
    try:
        graph_cut.check_closed(can, groups)
    except ValueError:
        return None
    # The same dataflow on both sides: each layer reads exactly the layers its kernel reads.
    inputs = {v: f"in{k}" for k, v in enumerate(main.params[:num_input])}
    for l, (op, grp) in enumerate(zip(graph.ops, groups)):
        got = {inputs[v] if v in inputs else f"v{owner[index[v]]}"
               for i in grp for v in reads[i] if v in inputs or (v in index and owner[index[v]] != l)}
        if got != set(op["reads"]):
            return None
    return groups


def _check_capacity(model_path, fleet: Fleet, graph, sizes: list[int]) -> None:
    """Before profiling anything: a fleet whose memory cannot hold the weights at all (every weight
    somewhere, every layer's weights on one device) is refused at once; the DP then checks each
    stage's weights and live tensors exactly."""
    from edgetvm.partition.pipeline.dp import MEMORY_HEADROOM

    total = sum(d.memory_bytes for d in fleet.devices)
    largest = max(d.memory_bytes for d in fleet.devices)
    need = sum(sizes)
    layer = max((sum(sizes[w] for w in set(op["weights"])) + MEMORY_HEADROOM * graph.values.get(op["out"], 0)
                 for op in graph.ops), default=0)
    if need > total or layer > largest:
        mib = 1 << 20
        raise UserError(f"the fleet {fleet.name} cannot hold {Path(model_path).name}: "
                        + (f"its weights are {need / mib:.2f} MiB, its {len(fleet.devices)} devices have "
                           f"{total / mib:.2f} MiB in all" if need > total else
                           f"a layer needs {layer / mib:.2f} MiB, its largest device has {largest / mib:.2f} MiB"))


def plan(prep: Prepared, method: str = "pso", seed: int = 0, particles: int = 24, iterations: int = 40,
         bands: bool = False) -> dict:
    """The placement and stages: "pso" (PSO + DP, intra-layer bands), "exhaustive" (<= 5 devices),
    "dp" (one device per stage, every device, fastest first, DP boundaries), "equal" (the same with
    equal layer counts), "single" (the best device alone). `bands` (pso, exhaustive): only placements
    in which a stage's devices share a run of layers in row bands."""
    p = prep.problem
    if bands and method not in ("pso", "exhaustive"):
        raise UserError(f"--bands needs --method pso or exhaustive (not {method})")
    if p.force_bands != bands:
        p.force_bands = bands
        p._cache.clear()  # stage costs depend on it
    search = pso.Search(p)
    t0 = time.perf_counter()
    if method == "pso":
        r = search.pso(particles, iterations, seed)
        stages, bounds = r.stages, r.bounds
    elif method == "exhaustive":
        r = search.exhaustive()
        stages, bounds = r.stages, r.bounds
    elif method in ("dp", "equal"):
        usable = [d for d in search.order if search.usable[d]][: p.n]
        stages = [(d,) for d in usable]
        bounds = dp.partition(p, stages)[1] if method == "dp" else dp.equal_split(p, stages)
    elif method == "single":
        best = min((search.solve([(d,)]) + ((d,),) for d in range(len(p.devices)) if search.usable[d]),
                   key=lambda t: t[0], default=None)
        stages, bounds = ([best[2]], best[1]) if best else ([], [])
    else:
        raise UserError(f"unknown planning method '{method}'")
    seconds = time.perf_counter() - t0
    if not bounds and bands:
        raise UserError(f"no placement of {prep.model.path.name} over the fleet splits a stage in row bands "
                        f"(none of its runs of layers can be sliced by rows, or too few devices fit)")
    if not bounds:
        raise UserError(f"the fleet cannot hold {prep.model.path.name}: no placement fits every stage's "
                        f"weights and tensors in its devices' memory")
    costs = dp.evaluate(p, stages, bounds)
    if any(c["period_s"] == dp.INF for c in costs):
        raise UserError(f"the fleet cannot hold {prep.model.path.name} with the {method} split: a stage does not "
                        f"fit its devices' memory")
    period = max(c["period_s"] for c in costs)
    return {"method": method + ("+bands" if bands else ""), "search_s": seconds, "evaluations": len(search.cache),
            "stages": [{"devices": [p.devices[d].name for d in c["devices"]], "layers": c["layers"],
                        "bands": c["bands"], **{k: c[k] for k in ("worker_s", "forward_s", "links_s", "busy_s",
                                                                    "period_s", "latency_s", "compute_s", "in_bytes",
                                                                    "out_bytes")}}
                       for c in costs],
            "calibration": p.overhead,
            "predicted": {"period_s": period, "throughput_fps": 1.0 / period,
                          "latency_s": costs[0]["receive_s"] + sum(c["latency_s"] for c in costs)}}


def write_plan(prep: Prepared, fleet: Fleet, decision: dict, out) -> Path:
    """Compile every device's part (its band where the stage is split) and write the plan directory."""
    import tvm

    from edgetvm.partition import split
    from edgetvm.passes import graph_cut, pipeline, row_slices
    from edgetvm.runtime import artifact

    out = Path(out)
    m, can, groups = prep.model, prep.canonical, prep.groups
    target = split._host().target()
    cname = {f"v{l}": f"v{groups[l][-1]}" for l in range(len(groups))}  # graph value -> canonical value
    cname.update({v: v for v in m.graph.inputs})
    with artifact.staging_dir(out) as stage_dir:
        stages_json = []
        for s, st in enumerate(decision["stages"]):
            i, j = st["layers"]
            before = [b for l in range(0, i) for b in groups[l]]
            mine = [b for l in range(i, j) for b in groups[l]]
            after = [b for l in range(j, len(groups)) for b in groups[l]]
            parts = [x for x in (before, mine, after) if x]
            mod, sigs, _, _ = graph_cut.emit_parts(can, parts, len(m.weights), [f"p{k}" for k in range(len(parts))])
            k = parts.index(mine)
            sig, func = sigs[k], mod[f"p{k}"]
            ins, outs = prep.problem.crossing(i, j)
            carry = [cname[v] for v in outs if cname[v] not in sig.outputs]
            received = list(m.graph.inputs) if s == 0 else stages_json[-1]["outputs"] + stages_json[-1]["carry"]
            if missing := [v for v in sig.inputs + carry if v not in received]:
                # A plan whose stage waits for a value nobody sends would stall its first frame.
                raise RuntimeError(f"stage {s} needs {missing}, which the stage before it does not send")
            entries = []
            bands = st["bands"] or [None]
            for dev_name, band in zip(st["devices"], bands):
                if band is None:
                    f, rows = func, [None] * len(sig.inputs)
                else:
                    f = row_slices.slice_function(func, band[0], band[1], "stage")
                    rows = row_slices.input_rows(func, band[0], band[1])[:len(sig.inputs)]
                f = f.with_attr("global_symbol", "stage")
                ex = pipeline.build(tvm.IRModule({"stage": f}), target)
                lib = f"s{s}-{dev_name}.so"
                pipeline.export(ex, str(stage_dir / lib))
                wfile = f"s{s}-{dev_name}.npz"
                np.savez(stage_dir / wfile, *[m.weights[w] for w in sig.weights])
                entries.append({"device": dev_name, "library": lib, "weights": wfile, "band": band,
                                "input_rows": [list(r) if r else None for r in rows]})
            stages_json.append({**st, "inputs": sig.inputs, "outputs": sig.outputs, "carry": carry,
                                "parts": entries})
        ex = pipeline.build(m.deploy, target)
        pipeline.export(ex, str(stage_dir / "reference.so"))
        np.savez(stage_dir / "reference.npz", *m.weights)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "model": {"path": str(m.path.resolve()), "sha256": m.sha256},
                    "inputs": [{"value": v, **i.to_json()} for v, i in zip(m.graph.inputs, m.inputs)],
                    "outputs": [cname.get(v, v) for v in m.graph.outputs],
                    "fleet": fleet.to_json(), **{k: v for k, v in decision.items() if k != "stages"},
                    "stages": stages_json}
        (stage_dir / "plan.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def open_plan(path) -> dict:
    p = Path(path)
    try:
        manifest = json.loads((p / "plan.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{p} is not a pipeline plan (no readable plan.json); make one with "
                        f"`edgetvm pipeline plan`") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{p}/plan.json is not an edgetvm pipeline plan of format version {FORMAT_VERSION}")
    for st in manifest["stages"]:
        for part in st["parts"]:
            for f in (part["library"], part["weights"]):
                if not (p / f).is_file():
                    raise UserError(f"{p / f} is missing: plan the pipeline again")
    return manifest
