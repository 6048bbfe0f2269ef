"""Cut a fused `main` into parts: one Relax function per group of its kernel calls.

Every value a part needs from outside (main's data inputs, or values other parts compute) becomes one
of its inputs; every value it computes that a later part or main's result needs becomes one of its
outputs. SwapNet's blocks are contiguous groups; a device/server split is any group that is closed
under predecessors (a DAG's branches, skip connections and concats then cross as several tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax


@relax.expr_functor.mutator
class _Rename(relax.PyExprMutator):
    def __init__(self, mod, mapping):
        super().__init__(mod)
        self.mapping = mapping

    def visit_var_(self, var):
        return self.mapping.get(var, var)

    def visit_dataflow_var_(self, var):
        return self.mapping.get(var, var)


@dataclass
class PartSignature:
    function: str
    inputs: list[str]      # value names: data inputs or outputs of other parts
    outputs: list[str]
    weights: list[int]     # indices into main's weight parameters


def bindings_of(fused: tvm.IRModule) -> list:
    main = fused["main"]
    return [b for blk in main.body.blocks for b in blk.bindings]


def value_names(fused: tvm.IRModule) -> tuple[dict, list, list]:
    """Stable names of main's values: `in{i}` for data inputs, `v{k}` for the k-th binding; plus the
    data-input and output variables."""
    main = fused["main"]
    num_input = int(main.attrs["num_input"])
    data_inputs = list(main.params[:num_input])
    names = {v: f"in{i}" for i, v in enumerate(data_inputs)}
    names |= {b.var: f"v{k}" for k, b in enumerate(bindings_of(fused))}
    out = main.body.body
    outputs = list(out.fields) if isinstance(out, relax.Tuple) else [out]
    return names, data_inputs, outputs


def check_closed(fused: tvm.IRModule, groups: list[list[int]]) -> None:
    """Each group may only read values of earlier groups (or its own earlier bindings)."""
    bindings = bindings_of(fused)
    group_of = {i: g for g, idx in enumerate(groups) for i in idx}
    if sorted(group_of) != list(range(len(bindings))):
        raise ValueError("groups must cover every binding of main exactly once")
    index = {b.var: i for i, b in enumerate(bindings)}
    for i, b in enumerate(bindings):
        for v in relax.analysis.free_vars(b.value):
            j = index.get(v)
            if j is not None and (group_of[j] > group_of[i] or (group_of[j] == group_of[i] and j > i)):
                raise ValueError(f"binding {i} reads binding {j} of a later part: the cut is not closed "
                                 f"under predecessors")


def emit_parts(fused: tvm.IRModule, groups: list[list[int]], num_weights: int,
               names: list[str] | None = None) -> tuple[tvm.IRModule, list[PartSignature], list[str], list[str]]:
    """A module with one function per group (named `names`, default part_0..), each taking
    (live-in values..., its weights...) and returning a tuple of its live-out values."""
    check_closed(fused, groups)
    main = fused["main"]
    num_input = int(main.attrs["num_input"])
    weight_params = list(main.params[num_input:num_input + num_weights])
    weight_index = {p: i for i, p in enumerate(weight_params)}
    bindings = bindings_of(fused)
    name_of, data_inputs, outputs = value_names(fused)
    names = names or [f"part_{k}" for k in range(len(groups))]
    reads = [[v for v in relax.analysis.free_vars(b.value)] for b in bindings]
    out_set = set(outputs)
    bb = relax.BlockBuilder(fused)
    sigs = []
    for k, idx in enumerate(groups):
        mine = set(idx)
        defined_here = {bindings[i].var for i in idx}
        later = {v for g in groups[k + 1:] for i in g for v in reads[i]} | out_set
        live_in, weights = [], []
        for i in idx:
            for v in reads[i]:
                if v in weight_index:
                    if weight_index[v] not in weights:
                        weights.append(weight_index[v])
                elif v not in defined_here and v not in live_in:
                    live_in.append(v)
        weights.sort()
        live_out = [bindings[i].var for i in sorted(mine) if bindings[i].var in later]
        mapping = {v: relax.Var(name_of[v], v.ty) for v in live_in}
        wvars = [relax.Var(weight_params[w].name, weight_params[w].ty) for w in weights]
        mapping.update({weight_params[w]: wv for w, wv in zip(weights, wvars)})
        rename = _Rename(fused, mapping)
        with bb.function(names[k], [mapping[v] for v in live_in] + wvars, attrs={"num_input": len(live_in)}):
            with bb.dataflow():
                for i in sorted(mine):
                    b = bindings[i]
                    mapping[b.var] = bb.emit(rename.visit_expr(b.value), name_hint=name_of[b.var])
                ret = bb.emit_output(relax.Tuple([mapping[v] for v in live_out]))
            bb.emit_func_output(ret)
        sigs.append(PartSignature(names[k], [name_of[v] for v in live_in], [name_of[v] for v in live_out], weights))
    mod = bb.get()
    mod = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"})
    return mod, sigs, [name_of[v] for v in data_inputs], [name_of[v] for v in outputs]


def only(mod: tvm.IRModule, function: str) -> tvm.IRModule:
    """`function` alone, with the kernels it calls: a part to compile for its own board."""
    part = tvm.IRModule({gv: f for gv, f in mod.functions.items()
                         if not isinstance(f, relax.Function) or gv.name_hint == function})
    return relax.transform.DeadCodeElimination(entry_functions=[function])(part)


def single_output_bare(mod: tvm.IRModule, function: str) -> tvm.IRModule:
    """`function` returning its one live-out tensor itself rather than a 1-tuple: a tuple returned over TVM
    RPC stays on the board as a handle, and taking it apart costs round trips (its size, its item, its free)."""
    func = mod[function]
    body = func.body
    ret = body.body
    if not (isinstance(ret, relax.Var) and isinstance(ret.ty, relax.TupleType) and len(ret.ty.fields) == 1):
        return mod
    item = relax.Var("out", ret.ty.fields[0])
    blocks = list(body.blocks) + [relax.BindingBlock([relax.VarBinding(item, relax.TupleGetItem(ret, 0))])]
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out[function] = relax.Function(func.params, relax.SeqExpr(blocks, item), item.ty, func.is_pure, func.attrs)
    return relax.transform.Normalize()(out)
