"""Roofline bound: a fused kernel takes at least max(FLOPs / peak compute, bytes it must move / bandwidth)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax


@dataclass(frozen=True)
class KernelCost:
    name: str
    flops: float
    bytes: int  # inputs read once + outputs written once: the least traffic the kernel can make

    def seconds(self, board) -> float:
        return max(self.flops / (board.peak_gflops * 1e9), self.bytes / (board.mem_bandwidth_gbs * 1e9))


def nbytes(ty) -> int:
    """Bytes of a Relax tensor (or tuple of tensors) type with a static shape; 0 when unknown."""
    if isinstance(ty, relax.TupleType):
        return sum(nbytes(f) for f in ty.fields)
    if isinstance(ty, relax.TensorType) and ty.shape is not None and ty.shape.values is not None:
        n = int(np.prod([int(v) for v in ty.shape.values]))
        return n * tvm.runtime.DataType(str(ty.dtype)).bits // 8
    return 0


def kernel_costs(fused: tvm.IRModule, func: str = "main") -> list[KernelCost]:
    """One entry per kernel call in `func` of a module after FuseOps/FuseTIR (before VM lowering)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    call_tir = tvm.ir.Op.get("relax.call_tir")
    flops_of: dict[str, float] = {}
    costs = []
    for block in fused[func].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not isinstance(call, relax.Call) or call.op != call_tir:
                continue
            gv = call.args[0]
            if gv.name_hint not in flops_of:
                flops_of[gv.name_hint] = float(estimate_tir_flops(tvm.IRModule({gv: fused[gv]})))
            moved = sum(nbytes(a.ty) for a in call.args[1].fields) + nbytes(binding.var.ty)
            costs.append(KernelCost(gv.name_hint, flops_of[gv.name_hint], moved))
    return costs


def bound_seconds(costs: list[KernelCost], board) -> float:
    return sum(c.seconds(board) for c in costs)
