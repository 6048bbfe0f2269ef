"""The decoder as one library for a board: everything a step needs runs there, state included.

The library holds the dense functions of `runtime.build_dense` (pre, post, head), our attention
kernel, the dequantizing matmuls, the KV policies as TIR (`kvdevice`) and these Relax functions:

  alloc_weights()                   zeroed weight tensors on the device, to be filled by the host
  alloc_state(Shape[cap, nb, policy, sinks, recent])
                                    the KV cache and the policies' state (see `state_types`)
  embed(ids) / layer(x, lw, ls, ctl, cos, sin) / head(...)
                                    one piece at a time, for a host that streams layer weights
  prefill(ids, W, S) -> int32[1]    a chunk of n tokens: greedy next token after the last one
  decode(ids[1], W, S) -> int32[1]  one token (its input may be the previous call's output)
  nll(ids[n + 1], W, S) -> f64[n]   -log p(ids[t + 1]) for the n tokens fed
  logits(ids, W, S) -> f32[n, V]

W = (head: (output norm, head weights..., rope cos, rope sin), layer 0 weights, ..., layer L-1)
and S = (ctl, layer 0 state, ...) are tuples that live on the device: a step sends its token
ids and gets back a token or n numbers. Each piece updates the state in place (call_tir_inplace)
and returns what it changed, or Relax's dead-code elimination would drop the update.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx

from edgetvm.llm import kernels, kvdevice, quant
from edgetvm.llm.kvcache import DEFAULT_KV_DTYPE, KV_DTYPES  # noqa: F401
from edgetvm.llm.reference import rope_tables
from edgetvm.llm.runtime import PackedWeights, add_dense_functions

STATE_FIELDS = ("k", "v", "kr", "krpos", "kpos", "pos", "score")




def state_types(cfg, kvd: str, cap, nb) -> list:
    KH, D = cfg.n_kv_heads, cfg.head_dim
    TT = relax.TensorType
    return [TT((KH, cap, D), kvd), TT((KH, cap, D), kvd), TT((KH, nb, D, kernels.JB), kvd), TT((KH, cap), "int32"),
            TT((cap,), "int32"), TT((cap,), "int32"), TT((cap,), "float64")]


def state_bytes(cfg, kvd: str, cap: int) -> int:
    """The state alloc_state makes for a capacity (rotated keys padded to whole blocks)."""
    e = np.dtype(kvd).itemsize
    KH, D = cfg.n_kv_heads, cfg.head_dim
    per_layer = KH * cap * D * e * 2 + KH * kernels.padded(cap) * D * e + KH * cap * 4 + cap * (4 + 4 + 8)
    return per_layer * cfg.n_layers + kvdevice.CTL_LEN * 4


def flat_weights(packed: PackedWeights, cfg) -> list[tuple[str, np.ndarray]]:
    """(name, array) in the library's order: the head group (final norm, head, the embedding when
    not tied, RoPE tables), then each layer's; each group is contiguous in an artifact's weight
    file, so a layer can be mapped and dropped as one range."""
    cos, sin = rope_tables(cfg, cfg.max_pos)
    out = [("output_norm", packed.onw)] + [(f"head.{i}", a) for i, a in enumerate(packed.head)]
    out += [(f"embed.{i}", a) for i, a in enumerate(packed.emb or [])]
    out += [("rope.cos", cos), ("rope.sin", sin)]
    for l, (pre, post) in enumerate(packed.layers):
        out += [(f"blk.{l}.{i}", a) for i, a in enumerate([*pre, *post])]
    return out


def groups(cfg, fmt) -> tuple[int, int]:
    """(tensors in the head group, tensors per layer) for a --weights mode or {role: format}."""
    f = quant.role_formats(fmt)
    n_head = 1 + quant.n_params(f["head"]) + (0 if cfg.tied else quant.n_params(f["embed"])) + 2
    n_layer = 2 + int(cfg.qkv_bias) + sum(quant.n_params(f[r]) for r in ("qkv", "o", "gu", "down"))
    return n_head, n_layer


def group_bytes(cfg, fmt) -> tuple[int, int]:
    """(bytes of the head group, bytes of one layer) before a build, from the shapes alone."""
    from edgetvm.llm.runtime import role_shape

    f = quant.role_formats(fmt)
    d, D = cfg.d_model, cfg.head_dim
    lin = lambda role: quant.weight_bytes(*role_shape(cfg, role), f[role])
    layer = 2 * 4 * d + sum(lin(r) for r in ("qkv", "o", "gu", "down"))
    if cfg.qkv_bias:
        layer += 4 * role_shape(cfg, "qkv")[1]
    head = 4 * d + lin("head") + (0 if cfg.tied else lin("embed")) + 2 * 4 * cfg.max_pos * (D // 2)
    return head, layer


def build_module(cfg, fmt, kvd: str = DEFAULT_KV_DTYPE) -> tvm.IRModule:
    from edgetvm.llm.runtime import weight_types

    d, H, D, V, L = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.vocab, cfg.n_layers
    fmts = quant.role_formats(fmt)
    bb = relax.BlockBuilder()
    add_dense_functions(bb, cfg, fmt)
    mod0 = bb.get()
    gv = {g.name_hint: g for g in mod0.get_global_vars()}
    pre_w = [p.ty for p in mod0["pre1"].params[1:]]
    post_w = [p.ty for p in mod0["post1"].params[2:]]
    head_w = [p.ty for p in mod0["head1"].params[2:]]
    nh = len(head_w)
    # the embedding: the head's arrays when tied, else its own (in the embed role's format)
    emb_w = [] if cfg.tied else weight_types(d, V, fmts["embed"])
    efmt = fmts["head"] if cfg.tied else fmts["embed"]
    lw_types = pre_w + post_w
    npre = len(pre_w)
    T32 = lambda shape: relax.TensorType(shape, "float32")
    rope_ty = [T32((cfg.max_pos, D // 2)), T32((cfg.max_pos, D // 2))]
    hw_types = [T32((d,))] + head_w + emb_w + rope_ty
    # hws (the head group's tensors) -> (the head's arrays, the embedding's arrays)
    head_of = lambda hws: hws[1:1 + nh]
    emb_of = lambda hws: hws[1:1 + nh] if cfg.tied else hws[1 + nh:-2]
    ctl_ty = relax.TensorType((kvdevice.CTL_LEN,), "int32")

    attn = bb.add_func(kernels.make_attention(H, cfg.n_kv_heads, D, kvd), "attention")
    ins = bb.add_func(kvdevice.kv_insert, "kv_insert")
    obs = bb.add_func(kvdevice.make_kv_observe(H), "kv_observe")
    conf = bb.add_func(kvdevice.kv_config, "kv_config")
    greedy_tail, nll_tail, logits_tail = kvdevice.make_tails(d, V)
    g_tail = bb.add_func(greedy_tail, "greedy_tail")
    n_tail = bb.add_func(nll_tail, "nll_tail")
    l_tail = bb.add_func(logits_tail, "logits_tail")
    emb = bb.add_func(kvdevice.make_embed(d, V, efmt).with_attr("global_symbol", "embed_rows"), "embed_rows")
    last = bb.add_func(kvdevice.make_last_row(d), "last_row")

    def fresh_state(tag=""):
        cap, nb = tirx.Var("cap" + tag, "int64"), tirx.Var("nb" + tag, "int64")
        return cap, nb, state_types(cfg, kvd, cap, nb)

    # one layer: pre, the policy places the tokens, attention, the policy scores, post
    for name, n in (("layer", tirx.Var("n", "int64")), ("layer1", 1)):
        sfx = "1" if n == 1 else ""
        cap, nb, lst = fresh_state()
        x = relax.Var("x", T32((n, d)))
        lw = relax.Var("lw", relax.TupleType(lw_types))
        ls = relax.Var("ls", relax.TupleType(lst))
        ctl = relax.Var("ctl", ctl_ty)
        cos, sin = relax.Var("cos", rope_ty[0]), relax.Var("sin", rope_ty[1])
        with bb.function(name, [x, lw, ls, ctl, cos, sin]):
            ws = [bb.emit(relax.TupleGetItem(lw, i)) for i in range(len(lw_types))]
            K, Vc, KR, KRPOS, kpos, pos, score = [bb.emit(relax.TupleGetItem(ls, i)) for i in range(len(lst))]
            qkv = bb.emit(relax.Call(gv["pre" + sfx], [x, *ws[:npre]]))
            q, k, v = [bb.emit(relax.TupleGetItem(qkv, i)) for i in range(3)]
            r = bb.emit(relax.op.call_tir_inplace(
                ins, [ctl, pos, score, kpos], [1, 2, 3, -1, -1],
                [lst[5], lst[6], lst[4], relax.TensorType((n,), "int32"), relax.TensorType((2,), "int32")]))
            score1, kpos1, qpos, meta = [bb.emit(relax.TupleGetItem(r, i)) for i in (1, 2, 3, 4)]
            a = bb.emit(relax.op.call_tir_inplace(
                attn, [q, k, v, qpos, meta, kpos1, cos, sin, K, Vc, KR, KRPOS], [8, 9, 10, 11, -1, -1],
                [*lst[:4], T32((n, H, D)), T32((n, H, nb * kernels.JB))]))
            out, probs = bb.emit(relax.TupleGetItem(a, 4)), bb.emit(relax.TupleGetItem(a, 5))
            score2 = bb.emit(relax.op.call_tir_inplace(obs, [ctl, meta, probs, score1], [3], lst[6]))
            y = bb.emit(relax.Call(gv["post" + sfx], [x, out, *ws[npre:]]))
            bb.emit_func_output(relax.Tuple([y, score2]))
    gv_layer = {g.name_hint: g for g in bb.get().get_global_vars()}

    def weights_var():
        return relax.Var("w", relax.TupleType([relax.TupleType(hw_types)] + [relax.TupleType(lw_types)] * L))

    def state_var(lst):
        return relax.Var("s", relax.TupleType([ctl_ty] + [relax.TupleType(lst)] * L))

    def run_layers(ids, n, w, st, x_rows):
        hw = bb.emit(relax.TupleGetItem(w, 0))
        hws = [bb.emit(relax.TupleGetItem(hw, i)) for i in range(len(hw_types))]
        onw, embt, cos, sin = hws[0], head_of(hws), hws[-2], hws[-1]
        ctl = bb.emit(relax.TupleGetItem(st, 0))
        x = bb.emit(relax.call_tir(emb, [ids, *emb_of(hws)], T32((x_rows, d))))
        layer = gv_layer["layer1" if n == 1 else "layer"]
        for l in range(L):
            r = bb.emit(relax.Call(layer, [x, bb.emit(relax.TupleGetItem(w, l + 1)),
                                           bb.emit(relax.TupleGetItem(st, l + 1)), ctl, cos, sin]))
            x = bb.emit(relax.TupleGetItem(r, 0))
        return x, ctl, onw, embt

    for name, n in (("prefill", tirx.Var("n", "int64")), ("decode", 1)):
        cap, nb, lst = fresh_state()
        ids = relax.Var("ids", relax.TensorType((n,), "int32"))
        w, st = weights_var(), state_var(lst)
        with bb.function(name, [ids, w, st]):
            x, ctl, onw, embt = run_layers(ids, n, w, st, n)
            xl = x if n == 1 else bb.emit(relax.call_tir(last, [x], T32((1, d))))
            lg = bb.emit(relax.Call(gv["head1"], [xl, onw, *embt]))
            r = bb.emit(relax.op.call_tir_inplace(g_tail, [ctl, x, lg], [0, -1],
                                                  [ctl_ty, relax.TensorType((1,), "int32")]))
            bb.emit_func_output(bb.emit(relax.TupleGetItem(r, 1)))

    m = tirx.Var("m", "int64")
    n = m - 1
    cap, nb, lst = fresh_state()
    ids = relax.Var("ids", relax.TensorType((m,), "int32"))
    w, st = weights_var(), state_var(lst)
    with bb.function("nll", [ids, w, st]):
        x, ctl, onw, embt = run_layers(ids, m, w, st, n)
        lg = bb.emit(relax.Call(gv["head"], [x, onw, *embt]))
        r = bb.emit(relax.op.call_tir_inplace(n_tail, [ctl, ids, lg], [0, -1],
                                              [ctl_ty, relax.TensorType((n,), "float64")]))
        bb.emit_func_output(bb.emit(relax.TupleGetItem(r, 1)))

    n = tirx.Var("n", "int64")
    cap, nb, lst = fresh_state()
    ids = relax.Var("ids", relax.TensorType((n,), "int32"))
    w, st = weights_var(), state_var(lst)
    with bb.function("logits", [ids, w, st]):
        x, ctl, onw, embt = run_layers(ids, n, w, st, n)
        lg = bb.emit(relax.Call(gv["head"], [x, onw, *embt]))
        r = bb.emit(relax.op.call_tir_inplace(l_tail, [ctl, lg], [0, -1], [ctl_ty, T32((n, V))]))
        bb.emit_func_output(bb.emit(relax.TupleGetItem(r, 1)))

    # pieces for a host that streams the layers' weights: embed, then `layer` per layer, then a tail
    n = tirx.Var("n", "int64")
    ids = relax.Var("ids", relax.TensorType((n,), "int32"))
    hw = relax.Var("hw", relax.TupleType(hw_types))
    with bb.function("embed", [ids, hw]):
        hws = [bb.emit(relax.TupleGetItem(hw, i)) for i in range(len(hw_types))]
        bb.emit_func_output(bb.emit(relax.call_tir(emb, [ids, *emb_of(hws)], T32((n, d)))))
    for name, tail in (("greedy", g_tail), ("nll_head", n_tail)):
        n = tirx.Var("n", "int64")
        x = relax.Var("x", T32((n, d)))
        ids = relax.Var("ids", relax.TensorType((tirx.Var("m", "int64"),), "int32"))
        ctl = relax.Var("ctl", ctl_ty)
        hw = relax.Var("hw", relax.TupleType(hw_types))
        with bb.function(name, [x, ids, ctl, hw]):
            hws = [bb.emit(relax.TupleGetItem(hw, i)) for i in range(len(hw_types))]
            if name == "greedy":
                xl = bb.emit(relax.call_tir(last, [x], T32((1, d))))
                lg = bb.emit(relax.Call(gv["head1"], [xl, hws[0], *head_of(hws)]))
                r = bb.emit(relax.op.call_tir_inplace(tail, [ctl, x, lg], [0, -1],
                                                      [ctl_ty, relax.TensorType((1,), "int32")]))
            else:
                lg = bb.emit(relax.Call(gv["head"], [x, hws[0], *head_of(hws)]))
                r = bb.emit(relax.op.call_tir_inplace(tail, [ctl, ids, lg], [0, -1],
                                                      [ctl_ty, relax.TensorType((n,), "float64")]))
            bb.emit_func_output(bb.emit(relax.TupleGetItem(r, 1)))

    # allocation on the device: a plain RPC server can only fill tensors that the device owns
    cap, nb, pol, sinks, recent = (tirx.Var(v, "int64") for v in ("cap", "nb", "policy", "sinks", "recent"))
    shape = relax.Var("shape", relax.ShapeType([cap, nb, pol, sinks, recent]))
    with bb.function("alloc_state", [shape]):
        cfg_t = bb.emit(relax.op.shape_to_tensor(relax.ShapeExpr([pol, sinks, recent, cap])))
        ctl = bb.emit(relax.call_tir(conf, [cfg_t], ctl_ty))
        layers = []
        for _ in range(L):
            ts = []
            for field, ty in zip(STATE_FIELDS, state_types(cfg, kvd, cap, nb)):
                sh = relax.ShapeExpr(list(ty.shape.values))
                if field in ("krpos", "pos"):  # -1: not rotated yet / free slot
                    ts.append(bb.emit(relax.op.full(sh, relax.const(-1, "int32"), "int32")))
                else:
                    ts.append(bb.emit(relax.op.zeros(sh, ty.dtype)))
            layers.append(relax.Tuple(ts))
        bb.emit_func_output(relax.Tuple([ctl, *layers]))
    # Uninitialised (the host overwrites them): zeros of a static shape would be folded into
    # constants, and equal constants shared, so that all layers would get one norm vector.
    with bb.function("alloc_weights", [], pure=False):
        groups_ = [hw_types] + [lw_types] * L
        bb.emit_func_output(relax.Tuple([
            relax.Tuple([bb.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr(list(t.shape.values)), str(t.dtype), 0))
                         for t in g]) for g in groups_]))
    return bb.get()


def build(cfg, fmt, target, kvd: str = DEFAULT_KV_DTYPE):
    """The library's Executable for `target` (export it with edgetvm.passes.pipeline.export);
    fmt: a uniform --weights mode or {role: kernel format}."""
    from edgetvm.passes import pipeline

    if not isinstance(fmt, dict) and fmt not in quant.FORMATS[1:]:
        raise ValueError(fmt)
    mod = build_module(cfg, fmt, kvd)
    return pipeline.finish(pipeline.fuse(mod, target), target)


@dataclass
class Layout:
    """Where each tensor of the flat weight list goes in the library's weight tuple."""
    n_head: int
    n_layer: int
    n_layers: int

    def nest(self, flat: list) -> list:
        h = flat[:self.n_head]
        return [h] + [flat[self.n_head + l * self.n_layer: self.n_head + (l + 1) * self.n_layer]
                      for l in range(self.n_layers)]
