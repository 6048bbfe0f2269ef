"""Fold inference batch norm into the preceding conv2d when its weights are parameters.

Relax's own FoldBatchnormToConv2D only matches constants; edgetvm keeps weights as parameters
(so they can live in a file, be swapped, be lifted), so this matches parameters of `main`
instead. The weight-only part, W * gamma / sqrt(var + eps), is then lifted to compile time by
LiftTransformParams, and the kernel's epilogue shrinks to one add.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import TupleGetItemPattern, is_op, rewrite_call, wildcard


@tvm.transform.module_pass(opt_level=0, name="FoldBatchNormIntoConvParams")
def fold_batchnorm_into_conv(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Rewrite conv2d(x, W) -> batch_norm[0] into conv2d(x, W * s) + (beta - mean * s), s = gamma / sqrt(var + eps)."""
    func = mod["main"]
    num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else 0
    weights = {p for p in func.params[num_input:]}

    x, w = wildcard(), wildcard()
    gamma, beta, mean, var = wildcard(), wildcard(), wildcard(), wildcard()
    conv = is_op("relax.nn.conv2d")(x, w)
    pattern = TupleGetItemPattern(is_op("relax.nn.batch_norm")(conv, gamma, beta, mean, var), 0)

    def rewriter(expr, m):
        conv_call = m[conv]
        bn_call = m[pattern.tuple]
        if not all(isinstance(m[p], relax.Var) and m[p] in weights for p in (w, gamma, beta, mean, var)):
            return expr
        if conv_call.attrs["kernel_layout"] != "OIHW" or conv_call.attrs["data_layout"] != "NCHW" \
                or int(bn_call.attrs["axis"]) != 1:
            return expr
        eps = relax.const(float(bn_call.attrs["epsilon"]), "float32")
        scale = relax.op.divide(m[gamma], relax.op.sqrt(relax.op.add(m[var], eps)))
        out_ch = m[gamma].ty.shape[0]
        w_scaled = relax.op.multiply(m[w], relax.op.reshape(scale, (out_ch, 1, 1, 1)))
        shift = relax.op.subtract(m[beta], relax.op.multiply(m[mean], scale))
        new_conv = relax.Call(conv_call.op, [m[x], w_scaled], conv_call.attrs)
        return relax.op.add(new_conv, relax.op.reshape(shift, (1, out_ch, 1, 1)))

    out = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(mod.functions)
    out["main"] = rewrite_call(pattern, rewriter, func)
    return out
