"""SwapNet as Relax passes: cut `main` into blocks that fit a memory budget, so a runtime can swap weights.

1. `split_oversized_layers`: a matmul or conv2d whose weight alone would not fit is split inside
   the layer (by output columns / output channels) into pieces joined by a concat.
2. `op_memory`: for each kernel call of the fused `main`: the weights it uses, the activations
   live while it runs (residual/skip values stay live across blocks), and its kernel scratch
   (buffers the TIR allocates itself, which Relax's memory planning does not see).
3. `plan_blocks`: dynamic programming over cut points minimising predicted latency (compute vs
   the next block's load overlap) under: this block's weights + the next block's weights (being
   prefetched) + live activations + scratch <= budget.
4. `emit_blocks`: one Relax function per block (passes/graph_cut.py), taking the live-in activations and its weights,
   returning the live-out activations; the runtime fetches each block's weights before the call
   and releases them after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax, s_tir, tirx

from edgetvm.costmodels.roofline import nbytes
from edgetvm.errors import UserError
from edgetvm.passes.graph_cut import PartSignature, emit_parts

MIB = 1 << 20
# What a run holds beyond its weights, activations and scratch: the worker threads' stacks and TVM
# workspace pools, page rounding of every allocation, the library's relocated pages, the output copies.
# Measured in a cgroup above a loaded, idle runtime (naive allocator): 0.2-1.0 MiB over the plan for
# VGG-11 and the MobileNetV3 at 4x and 6x oversubscription.
RUNTIME_RESERVE = 3 << 19  # 1.5 MiB
BLOCK_OVERHEAD_S = 50e-6  # fixed part of loading a block (its syscalls): overlaps compute under prefetch
# What every block adds to the critical path whatever overlaps: its VM call, waiting for and handing
# work to the prefetch thread. Measured on a MobileNet cut into 9 blocks (0.1 MiB each): ~100 us a
# block (33 us of it with the weights kept resident).
BLOCK_CALL_S = 100e-6


# ---------------------------------------------------------------- 1. split layers bigger than the budget

def _pieces(total: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, total, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def split_oversized_layers(deploy: tvm.IRModule, weights: list[np.ndarray], names: list[str],
                           max_bytes: int, cuts: dict[str, list[tuple[int, int]]] | None = None):
    """Split matmul(x, W[K, N]) by columns and conv2d(x, W[O, I, h, w]) by output channels where W > max_bytes.

    `cuts` gives some weights (by name) their own column / channel ranges instead of equal pieces.
    """
    cuts = cuts or {}
    main = deploy["main"]
    num_input = int(main.attrs["num_input"])
    params = list(main.params)
    weight_of = {params[num_input + i]: i for i in range(len(weights))}
    new_params = params[:num_input]
    new_weights, new_names = [], []
    split_vars: dict = {}  # old weight var -> [(piece var, (lo, hi))]
    uses = {}

    def count_uses(e):
        if isinstance(e, relax.Var) and e in weight_of:
            uses[e] = uses.get(e, 0) + 1

    relax.analysis.post_order_visit(main.body, count_uses)
    for var, i in weight_of.items():
        w = weights[i]
        if w.nbytes > max_bytes and w.ndim in (2, 4) and uses.get(var) == 1:
            axis = 1 if w.ndim == 2 else 0
            parts = min(w.shape[axis], -(-w.nbytes // max_bytes))
            ranges = cuts.get(names[i]) or _pieces(w.shape[axis], parts)
            if len(ranges) == 1:
                new_params.append(var)
                new_weights.append(w)
                new_names.append(names[i])
                continue
            pieces = []
            for k, (lo, hi) in enumerate(ranges):
                piece = np.ascontiguousarray(w[:, lo:hi] if axis == 1 else w[lo:hi])
                v = relax.Var(f"{var.name}_part{k}", relax.TensorType(list(piece.shape), str(w.dtype)))
                pieces.append((v, (lo, hi)))
                new_params.append(v)
                new_weights.append(piece)
                new_names.append(f"{names[i]}.part{k}")
            split_vars[var] = pieces
        else:
            new_params.append(var)
            new_weights.append(w)
            new_names.append(names[i])
    if not split_vars:
        return deploy, weights, names

    @relax.expr_functor.mutator
    class Splitter(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or len(call.args) < 2 or call.args[1] not in split_vars:
                return call
            name = call.op.name
            if name == "relax.matmul" and call.args[1].ty.ndim == 2:
                axis = -1
            elif name == "relax.nn.conv2d" and call.attrs["kernel_layout"] == "OIHW" \
                    and call.attrs["data_layout"] == "NCHW" and int(call.attrs["groups"]) == 1:
                axis = 1
            else:
                return call
            outs = [self.builder_.emit(relax.Call(call.op, [call.args[0], v, *call.args[2:]], call.attrs))
                    for v, _ in split_vars[call.args[1]]]
            return relax.op.concat(outs, axis=axis)

    mutated = Splitter(deploy).visit_expr(main)
    # Replace the split weights' parameters by their pieces.
    func = relax.Function(new_params, mutated.body, mutated.ret_ty, mutated.is_pure, mutated.attrs)
    still_used = set(relax.analysis.free_vars(func.body))
    if any(p in still_used for p in split_vars):  # an op we do not know how to split uses this weight: leave the model as it was
        return deploy, weights, names
    out = tvm.IRModule(dict(deploy.functions))
    out["main"] = func
    return relax.transform.Normalize()(out), new_weights, new_names


def merged_cuts(plan: "Plan", weights: list[np.ndarray], names: list[str]) -> dict[str, list[tuple[int, int]]]:
    """For each split weight, its pieces that landed in one block joined into one range.

    Pieces of a layer computed in the same block only cost extra kernels and a concat."""
    block_of = {w: k for k, bk in enumerate(plan.blocks) for w in bk.weights}
    groups: dict[str, list[list]] = {}
    for i, name in enumerate(names):
        base, sep, part = name.rpartition(".part")
        if not sep or not part.isdigit():
            continue
        axis = 1 if weights[i].ndim == 2 else 0
        g = groups.setdefault(base, [])
        if g and g[-1][0] == block_of.get(i):
            g[-1][2] += weights[i].shape[axis]
        else:
            lo = g[-1][2] if g else 0
            g.append([block_of.get(i), lo, lo + weights[i].shape[axis]])
    return {base: [(lo, hi) for _, lo, hi in g] for base, g in groups.items()}


# ---------------------------------------------------------------- 2. per-op memory

@dataclass
class Op:
    index: int
    var: relax.Var
    kernel: str
    weights: list[int]          # indices into the weight list
    inputs: list[relax.Var]     # activation values it reads
    out_bytes: int
    scratch: int
    flops: float
    live: int = 0               # activation bytes live while it runs (its inputs, output, everything kept for later)


def _alloc_bytes(stmt) -> int:
    """Bytes of every buffer a TIR function allocates for itself (an upper bound: siblings counted together)."""
    if isinstance(stmt, (list, tuple)) or type(stmt).__name__ == "Array":
        return sum(_alloc_bytes(s) for s in stmt)
    total = 0
    for buf in getattr(stmt, "alloc_buffers", None) or []:
        if all(isinstance(d, tirx.IntImm) for d in buf.shape):
            total += int(np.prod([int(d) for d in buf.shape])) * tvm.runtime.DataType(str(buf.dtype)).bits // 8
    for attr in ("body", "block", "init", "then_case", "else_case", "seq"):
        child = getattr(stmt, attr, None)
        if isinstance(child, (tirx.Stmt, s_tir.SBlock)) or type(child).__name__ == "Array":
            total += _alloc_bytes(child)
    return total


def op_memory(fused: tvm.IRModule, num_weights: int) -> tuple[list[Op], list[relax.Var], list[relax.Var]]:
    """Each kernel call of fused `main` with its weights, activation liveness and scratch; plus main's data inputs and outputs."""
    from tvm.s_tir.analysis import estimate_tir_flops

    main = fused["main"]
    num_input = int(main.attrs["num_input"])
    data_inputs = list(main.params[:num_input])
    weight_index = {p: i for i, p in enumerate(main.params[num_input:num_input + num_weights])}
    bindings = [b for blk in main.body.blocks for b in blk.bindings]
    call_tir = tvm.ir.Op.get("relax.call_tir")
    ops, sizes = [], {v: nbytes(v.ty) for v in data_inputs}
    for i, b in enumerate(bindings):
        free = relax.analysis.free_vars(b.value)
        kernel, scratch, flops = type(b.value).__name__, 0, 0.0
        if isinstance(b.value, relax.Call) and b.value.op == call_tir:
            gv = b.value.args[0]
            kernel = gv.name_hint
            scratch = _alloc_bytes(fused[gv].body)
            flops = float(estimate_tir_flops(tvm.IRModule({gv: fused[gv]})))
        ws = sorted({weight_index[v] for v in free if v in weight_index})
        acts = [v for v in free if v not in weight_index]
        sizes[b.var] = nbytes(b.var.ty)
        ops.append(Op(i, b.var, kernel, ws, acts, sizes[b.var], scratch, flops))
    out_expr = main.body.body
    outputs = [f for f in out_expr.fields] if isinstance(out_expr, relax.Tuple) else [out_expr]
    # Liveness: a value is live from its definition to its last use (main's outputs: to the end).
    last_use = {v: -1 for v in sizes}
    for op in ops:
        for v in op.inputs:
            last_use[v] = max(last_use.get(v, -1), op.index)
    for v in outputs:
        last_use[v] = len(ops)
    defined = {v: -1 for v in data_inputs} | {op.var: op.index for op in ops}
    for op in ops:
        op.live = sum(sizes[v] for v in sizes
                      if defined.get(v, -1) <= op.index and last_use.get(v, -1) >= op.index
                      and (defined.get(v, -1) < op.index or v is op.var))
    return ops, data_inputs, outputs


# ---------------------------------------------------------------- 3. choose the cut points

@dataclass
class Block:
    start: int
    stop: int
    weights: list[int]
    weight_bytes: int
    act_bytes: int        # peak live activations + scratch while the block runs
    compute_s: float

    @property
    def planned_bytes(self) -> int:
        return self.weight_bytes + self.act_bytes


@dataclass
class Plan:
    budget: int
    blocks: list[Block]
    prefetch: bool
    predicted_peak: int
    predicted_s: float
    extra: dict = field(default_factory=dict)


def _block(ops, a, b, weight_bytes, board) -> Block:
    ws = sorted({w for op in ops[a:b] for w in op.weights})
    wb = sum(weight_bytes[w] for w in ws)
    act = max(op.live + op.scratch for op in ops[a:b])
    compute = sum(max(op.flops / (board.peak_gflops * 1e9),
                      (op.out_bytes + op.live) / (board.mem_bandwidth_gbs * 1e9)) for op in ops[a:b])
    return Block(a, b, ws, wb, act, compute)


def plan_blocks(ops: list[Op], weight_bytes: list[int], budget: int, board, prefetch: bool = True,
                reserve: int = 0) -> Plan:
    """Cut ops into contiguous blocks minimising predicted latency; raise UserError if none fits the budget.

    `reserve` is set aside for the runtime (RUNTIME_RESERVE); the blocks share what is left.
    """
    n = len(ops)
    user_budget, budget = budget, budget - reserve
    load_bw = board.mem_bandwidth_gbs * 1e9  # weights come from the page cache: a memory-speed copy/map

    cache: dict[tuple[int, int], Block] = {}

    def blk(a, b):
        if (a, b) not in cache:
            cache[(a, b)] = _block(ops, a, b, weight_bytes, board)
        return cache[(a, b)]

    def load(bk):
        return bk.weight_bytes / load_bw + BLOCK_OVERHEAD_S

    # Candidate blocks: those that fit on their own, growing from each start until the weights overflow.
    fits: dict[int, list[int]] = {}
    for a in range(n):
        fits[a] = []
        for b in range(a + 1, n + 1):
            bk = blk(a, b)
            if bk.weight_bytes > budget:
                break
            if bk.planned_bytes <= budget:
                fits[a].append(b)
    inf = float("inf")
    # best[(a, b)]: least predicted time for ops[:b] whose last block is [a, b), excluding that block's compute.
    best: dict[tuple[int, int], float] = {}
    back: dict[tuple[int, int], tuple[int, int] | None] = {}
    for b in fits[0]:
        best[(0, b)] = load(blk(0, b)) + BLOCK_CALL_S
        back[(0, b)] = None
    for a in range(1, n):
        for b in fits[a]:
            nxt = blk(a, b)
            cand, arg = inf, None
            for p in range(a):
                if (p, a) not in best:
                    continue
                prev = blk(p, a)
                # While block [p, a) computes, [a, b) is prefetched: both sets of weights are resident.
                need = prev.planned_bytes + (nxt.weight_bytes if prefetch else 0)
                if need > budget:
                    continue
                step = (max(prev.compute_s, load(nxt)) if prefetch else prev.compute_s + load(nxt)) + BLOCK_CALL_S
                if best[(p, a)] + step < cand:
                    cand, arg = best[(p, a)] + step, (p, a)
            if arg is not None:
                best[(a, b)] = cand
                back[(a, b)] = arg
    finals = [(best[(a, n)] + blk(a, n).compute_s, (a, n)) for a in range(n) if (a, n) in best]
    if not finals:
        need = -(-(min_budget(ops, weight_bytes) + reserve) * 100 // MIB) / 100  # rounded up: that figure compiles
        raise UserError(f"--memory-budget {user_budget / MIB:.2f} MiB cannot hold this model: "
                        f"it needs at least {need:.2f} MiB "
                        f"(the largest single kernel's weights, activations and scratch"
                        f"{f', plus {reserve / MIB:.1f} MiB for the runtime' if reserve else ''}); raise the budget")
    total, key = min(finals)
    blocks = []
    while key is not None:
        blocks.append(blk(*key))
        key = back[key]
    blocks.reverse()
    peak = max(bk.planned_bytes + (blocks[i + 1].weight_bytes if prefetch and i + 1 < len(blocks) else 0)
               for i, bk in enumerate(blocks))
    return Plan(user_budget, blocks, prefetch, peak + reserve, total, {"reserve": reserve})


def min_budget(ops: list[Op], weight_bytes: list[int]) -> int:
    """The least budget any plan needs: every kernel on its own, without prefetch."""
    return max(sum(weight_bytes[w] for w in op.weights) + op.live + op.scratch for op in ops)


# ---------------------------------------------------------------- 4. one function per block

def emit_blocks(fused: tvm.IRModule, ops: list[Op], plan: Plan, data_inputs, outputs,
                num_weights: int) -> tuple[tvm.IRModule, list[PartSignature], list[str], list[str]]:
    """A module with `block_0..block_{k-1}`; each takes (live-in values..., its weights...)."""
    groups = [list(range(bk.start, bk.stop)) for bk in plan.blocks]
    return emit_parts(fused, groups, num_weights, [f"block_{k}" for k in range(len(groups))])
