"""The compiled decoder: Relax functions for the dense compute, our TIR attention kernel,
and a fixed-capacity KV cache driven by a policy.

Weights: `weights="native"` keeps each role's (q/k/v, o, gate/up, down, head) blocks as stored
where one of our kernel formats holds every layer's tensors of that role exactly (`plan_formats`:
Q4_0 -> q4s (symmetric, no min), Q4_1/Q4_K (or Q4_0 mixed with them) -> q4, Q8_0/Q5_0 -> q8, Q6_K
-> q8 with groups of 16, a mix of Q4_K and Q6_K -> q8 with groups of 16 and mins, F16/F32 -> fp32);
a role whose layers mix types with no common exact format is requantized to q8 (the error is
reported).
`weights="fp32"` dequantizes everything once to fp32, pre-transposed to [in, out], and the
matmuls are TVM's (our CPU schedule); `"q8"`/`"q4"` force those formats for every layer.
The quantized formats run our own dequantizing matmul kernels (TIR, `edgetvm.llm.quant`).
Per layer the Relax function `pre` does RMSNorm + fused QKV projection, our `attention` kernel
does RoPE + GQA attention over the cache (and returns the weights for H2O/TOVA), and `post`
does the output projection, residuals, RMSNorm and the SwiGLU MLP. `head` is the final norm
plus the tied embedding. All functions take a symbolic number of tokens, so prefill (chunks)
and decode (1 token) share one compiled module. KV memory is 2 * layers * kv_heads * budget *
head_dim * 4 bytes (2 with the fp16 cache that q8/q4 use): O(budget), never O(sequence length).
The attention kernel also keeps a rotated copy of the keys (the same size as K) across steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import tvm
from tvm import relax

from edgetvm.errors import UserError
from edgetvm.llm import kernels, quant
from edgetvm.llm.gguf_model import load_raw, load_tokenizer, load_weights
from edgetvm.llm.kvcache import make_policy
from edgetvm.llm.reference import rope_tables
from edgetvm.runtime.tensors import to_tvm


def aligned(shape, dtype=np.float32, align=64):
    """A zeroed numpy array whose data is `align`-byte aligned (needed for zero-copy DLPack)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off: off + nbytes].view(dtype).reshape(shape)


def shared(arr):
    """A tvm tensor sharing `arr`'s memory."""
    return tvm.runtime.from_dlpack(arr)


HEAD_CHUNK = 64


def build_dense(cfg, target, use_edgetvm_pipeline: bool = True, weights: str = "fp32"):
    """Relax functions pre/post/head(/head_chunk). edgetvm's CPU pipeline (fused, vectorised,
    parallel default schedule) decodes ~8x faster here than relax.get_default_pipeline.
    For q8/q4 every matmul is a call to our quantized kernel and each weight is several params."""
    bb = relax.BlockBuilder()
    add_dense_functions(bb, cfg, weights)
    mod = bb.get()
    if use_edgetvm_pipeline:
        from edgetvm.passes import pipeline

        return pipeline.finish(pipeline.fuse(mod, target), target)
    return tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))


def weight_types(K: int, N: int, fmt: str) -> list:
    """Relax types of the arrays holding a [K in, N out] weight in a kernel format."""
    T = lambda shape: relax.TensorType(shape, "float32")
    if fmt == "fp32":
        return [T((K, N))]
    NB, KG, TJ = N // quant.TJ, K // quant.group_of(fmt), quant.TJ
    if fmt in ("q8", "q8_16"):
        return [relax.TensorType((NB, K, TJ), "int8"), T((NB, KG, TJ))]
    if fmt == "q8m_16":
        return [relax.TensorType((NB, K, TJ), "int8"), T((NB, KG, TJ)), T((NB, KG, TJ))]
    if fmt == "q4s":
        return [relax.TensorType((NB, K // 2, TJ), "uint8"), T((NB, KG, TJ))]
    if fmt == "q5":
        return [relax.TensorType((NB, K // 2, TJ), "uint8"), relax.TensorType((NB, K // 8, TJ), "uint8"),
                T((NB, KG, TJ)), T((NB, KG, TJ))]
    return [relax.TensorType((NB, K // 2, TJ), "uint8"), T((NB, KG, TJ)), T((NB, KG, TJ))]


def add_dense_functions(bb, cfg, weights) -> None:
    """Add pre, pre1, post, post1, head, head1 and head_chunk to the BlockBuilder `bb`.
    `weights`: a --weights mode name or {role: kernel format} (quant.role_formats)."""
    d, H, KH, D, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab
    qkv_out = (H + 2 * KH) * D
    T = lambda shape: relax.TensorType(shape, "float32")
    gvs: dict = {}
    fmts = quant.role_formats(weights)

    def weight(name, K, N, fmt):
        """Params for a [K in, N out] weight: one fp32 [K, N] or the packed arrays."""
        return [relax.Var(f"{name}_{i}", t) for i, t in enumerate(weight_types(K, N, fmt))]

    def mm(h, ws, n, K, N, fmt):
        if fmt == "fp32":
            return relax.op.matmul(h, ws[0])
        key = (fmt, K, N)
        if key not in gvs:
            name = f"matmul_{fmt}_{K}x{N}"
            gvs[key] = bb.add_func(quant.make_matmul(K, N, fmt).with_attr("global_symbol", name), name)
        return relax.call_tir(gvs[key], relax.Tuple([h, *ws]), out_ty=T((n, N)))

    # Each function twice: a symbolic number of tokens (prefill chunks) and a static single token
    # (decode; the default schedules are 2-3x faster on static shapes: the head 36 ms -> 14 ms).
    for suffix, n in (("", tvm.tirx.Var("n", "int64")), ("1", 1)):
        x = relax.Var("x", T((n, d)))
        nw = relax.Var("nw", T((d,)))
        wqkv = weight("wqkv", d, qkv_out, fmts["qkv"])
        bias = [relax.Var("bqkv", T((qkv_out,)))] if getattr(cfg, "qkv_bias", False) else []
        with bb.function("pre" + suffix, [x, nw, *wqkv, *bias]):
            with bb.dataflow():
                h = bb.emit(relax.op.nn.rms_norm(x, nw, axes=[-1], epsilon=cfg.eps))
                y = bb.emit(mm(h, wqkv, n, d, qkv_out, fmts["qkv"]))
                if bias:
                    y = bb.emit(relax.op.add(y, bias[0]))
                q = bb.emit(relax.op.reshape(relax.op.strided_slice(y, [1], [0], [H * D]), (n, H, D)))
                k = bb.emit(relax.op.reshape(relax.op.strided_slice(y, [1], [H * D], [(H + KH) * D]), (n, KH, D)))
                v = bb.emit(relax.op.reshape(relax.op.strided_slice(y, [1], [(H + KH) * D], [qkv_out]), (n, KH, D)))
                out = bb.emit_output(relax.Tuple([q, k, v]))
            bb.emit_func_output(out)

        x = relax.Var("x", T((n, d)))
        a = relax.Var("a", T((n, H, D)))
        wo = weight("wo", H * D, d, fmts["o"])
        fw = relax.Var("fw", T((d,)))
        wgu = weight("wgu", d, 2 * F, fmts["gu"])
        wd = weight("wd", F, d, fmts["down"])
        with bb.function("post" + suffix, [x, a, *wo, fw, *wgu, *wd]):
            with bb.dataflow():
                ao = bb.emit(mm(bb.emit(relax.op.reshape(a, (n, H * D))), wo, n, H * D, d, fmts["o"]))
                x1 = bb.emit(relax.op.add(x, ao))
                h = bb.emit(relax.op.nn.rms_norm(x1, fw, axes=[-1], epsilon=cfg.eps))
                gu = bb.emit(mm(h, wgu, n, d, 2 * F, fmts["gu"]))
                g = relax.op.strided_slice(gu, [1], [0], [F])
                u = relax.op.strided_slice(gu, [1], [F], [2 * F])
                m = bb.emit(relax.op.multiply(relax.op.nn.silu(g), u))
                out = bb.emit_output(relax.op.add(x1, bb.emit(mm(m, wd, n, F, d, fmts["down"]))))
            bb.emit_func_output(out)

    # The head for a symbolic n, a single token and whole prefill chunks (static shapes are faster).
    for name, n in (("head", tvm.tirx.Var("n", "int64")), ("head1", 1), ("head_chunk", HEAD_CHUNK)):
        x = relax.Var("x", T((n, d)))
        onw = relax.Var("onw", T((d,)))
        hfmt = fmts["head"]
        embt = weight("embt", d, V, hfmt)
        with bb.function(name, [x, onw, *embt]):
            with bb.dataflow():
                h = bb.emit(relax.op.nn.rms_norm(x, onw, axes=[-1], epsilon=cfg.eps))
                out = bb.emit_output(mm(h, embt, n, d, V, hfmt))
            bb.emit_func_output(out)


@dataclass
class PackedWeights:
    """The decoder's weights as its functions take them (numpy): per layer pre's and post's
    parameters, the head's (in the head role's format), the embedding's when the head is not tied
    (else empty: the head's arrays double as the embedding), and the final norm."""
    layers: list
    head: list
    onw: np.ndarray
    emb: list = None
    formats: dict = None
    notes: list = None


def role_tensors(cfg, role: str, layer: int | None = None) -> list:
    """GGUF tensor names of a role (stacked along the output axis in this order) in one layer."""
    p = f"blk.{layer}."
    return {"qkv": [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"], "o": [p + "attn_output.weight"],
            "gu": [p + "ffn_gate.weight", p + "ffn_up.weight"], "down": [p + "ffn_down.weight"],
            "head": ["token_embd.weight" if cfg.tied else "output.weight"], "embed": ["token_embd.weight"]}[role]


def role_shape(cfg, role: str) -> tuple[int, int]:
    """(K in, N out) of a role's stacked weight."""
    d, H, KH, D, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab
    return {"qkv": (d, (H + 2 * KH) * D), "o": (H * D, d), "gu": (d, 2 * F), "down": (F, d), "head": (d, V),
            "embed": (d, V)}[role]


def _fits(fmt: str, K: int, N: int) -> bool:
    return fmt == "fp32" or (K % quant.group_of(fmt) == 0 and N % quant.TJ == 0)


def plan_formats(cfg, types: dict, weights: str = "native") -> tuple[dict, list]:
    """({role: kernel format}, notes) for a file's tensor types. native: per role the format (fewest
    bytes first) that holds every layer's tensors of that role exactly; a role mixing types with no
    common exact format is requantized to q8 (noted). fp32/q8/q4: that format for every layer."""
    if weights not in quant.FORMATS:
        raise UserError(f"unknown --weights '{weights}'; use one of: {', '.join(quant.FORMATS)}")
    formats, notes = {}, []
    uniform = None if weights == "native" else quant.role_formats(weights)
    for role in quant.ROLES:
        K, N = role_shape(cfg, role)
        names = [n for l in (range(cfg.n_layers) if role not in ("head", "embed") else [None])
                 for n in role_tensors(cfg, role, l)]
        tys = sorted({types[n] for n in names})
        if uniform is not None:
            fmt = uniform[role] if _fits(uniform[role], K, N) else "fp32"
            if fmt != "fp32" and not all(fmt in quant.EXACT[t] for t in tys):
                notes.append(f"{role}: {'/'.join(tys)} requantized to {fmt}")
        else:
            # q5 has no embedding-row reader: the head and embedding take the next exact format
            common = [f for f in ("q4s", "q4", "q5", "q8", "q8_16", "q8m_16", "fp32")
                      if all(f in quant.EXACT[t] for t in tys) and _fits(f, K, N)
                      and not (f == "q5" and role in ("head", "embed"))]
            if common:
                fmt = common[0]
            elif all(quant.EXACT[t] == ("fp32",) for t in tys) or not _fits("q8", K, N):
                fmt = "fp32"  # the dequantized values, exactly
            else:
                fmt = "q8"
                notes.append(f"{role}: layers mix {'/'.join(tys)}, no kernel format holds all exactly: "
                             "requantized to q8")
        formats[role] = fmt
    if cfg.tied:
        formats["embed"] = formats["head"]
    return formats, notes


def _permute_neox(cfg, a: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a Q/K weight (or bias) reordered per head (i, i + D/2) -> (2i, 2i + 1), so that
    rotating adjacent pairs (our kernel) equals NEOX RoPE on the file's order. Dot products of q
    and k are unchanged (the same permutation on both)."""
    D = cfg.head_dim
    perm = np.stack([np.arange(D // 2), np.arange(D // 2) + D // 2], 1).reshape(-1)
    idx = (np.arange(heads)[:, None] * D + perm[None, :]).reshape(-1)
    return a[idx]


def pack_weights(name: str, weights="native", w: dict | None = None, cfg=None) -> PackedWeights:
    """The weights for the functions of `add_dense_functions(formats)`, taken from the GGUF's blocks
    exactly where the role's format holds them, else from the dequantized values."""
    from edgetvm.llm.gguf_model import model_config, tensor_types

    if w is None:
        cfg, w = load_weights(name)
    cfg = cfg or model_config(name)
    if isinstance(weights, dict):
        formats, notes = dict(weights), []
    else:
        formats, notes = plan_formats(cfg, tensor_types(name), weights)
    raw = load_raw(name) if any(f != "fp32" for f in formats.values()) else None
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
    H, KH = cfg.n_heads, cfg.n_kv_heads
    err: dict = {}

    def perm(k, a):
        if cfg.rope_neox and (k.endswith("attn_q.weight") or k.endswith("attn_q.bias")):
            return _permute_neox(cfg, a, H)
        if cfg.rope_neox and (k.endswith("attn_k.weight") or k.endswith("attn_k.bias")):
            return _permute_neox(cfg, a, KH)
        return a

    def lin(names, role):
        """Weights [out, in] stacked along out -> the function's params for them."""
        fmt = formats[role]
        if fmt == "fp32":
            return [f32(np.concatenate([perm(k, w[k]) for k in names], 0).T)]
        types = {raw[k][0] for k in names}
        K = raw[names[0]][2][1]
        if all(fmt in quant.EXACT[t] for t in types):  # exact: the blocks as stored
            rows = [quant.gguf_rows(raw[k][0], perm(k, np.asarray(raw[k][1])), raw[k][2][0], K, fmt) for k in names]
            return quant.strip_rows([np.concatenate(r, 0) for r in zip(*rows)], fmt)
        full = np.concatenate([perm(k, w[k]) for k in names], 0)
        packed = list(quant.pack(full, fmt))
        e = float(np.linalg.norm(quant.unpack(packed, fmt) - full) / max(np.linalg.norm(full), 1e-30))
        err[role] = max(err.get(role, 0.0), e)
        return packed

    def bias(l):
        if not cfg.qkv_bias:
            return []
        p = f"blk.{l}."
        return [f32(np.concatenate([perm(p + f"attn_{x}.bias", w[p + f"attn_{x}.bias"]) for x in "qkv"]))]

    layers = []
    for l in range(cfg.n_layers):
        p = f"blk.{l}."
        pre = [f32(w[p + "attn_norm.weight"]), *lin(role_tensors(cfg, "qkv", l), "qkv"), *bias(l)]
        post = [*lin(role_tensors(cfg, "o", l), "o"), f32(w[p + "ffn_norm.weight"]),
                *lin(role_tensors(cfg, "gu", l), "gu"), *lin(role_tensors(cfg, "down", l), "down")]
        layers.append((pre, post))
    head = lin(role_tensors(cfg, "head"), "head")
    emb = [] if cfg.tied else lin(role_tensors(cfg, "embed"), "embed")
    notes = notes + [f"{r}: requantized to {formats[r]}, relative RMS weight error {e:.2e}" for r, e in err.items()]
    return PackedWeights(layers, head, f32(w["output_norm.weight"]), emb, formats, notes)


def _nbytes(t) -> int:
    return int(np.prod(t.shape)) * np.dtype(str(t.dtype)).itemsize


class Model:
    """SmolLM2 compiled for the CPU. `session(policy, budget)` makes a KV cache to decode with."""

    def __init__(self, name: str = "smollm2-135m", target=None, use_edgetvm_pipeline: bool = True,
                 weights: str = "native"):
        if weights not in quant.FORMATS:
            raise UserError(f"unknown weight format '{weights}'; use one of: {', '.join(quant.FORMATS)}")
        from edgetvm.llm.gguf_model import tensor_types

        self.name = name
        self.weights = weights
        self.cfg, w = load_weights(name)
        self.tokenizer = load_tokenizer(name)
        cfg = self.cfg
        self.formats, notes = plan_formats(cfg, tensor_types(name), weights)
        self.target = target or kernels.cpu_target()
        t0 = time.perf_counter()
        self.ex = build_dense(cfg, self.target, use_edgetvm_pipeline, self.formats)
        self.vm = relax.VirtualMachine(self.ex, tvm.cpu())
        # The kernel for this model's default cache; another cache dtype compiles its own on first use.
        kernels.build_attention(cfg, self.target, self.default_kv_dtype)
        self.compile_s = time.perf_counter() - t0
        self.f_pre, self.f_post, self.f_head = self.vm["pre"], self.vm["post"], self.vm["head"]
        self.f_head_chunk = self.vm["head_chunk"]
        self.f_pre1, self.f_post1, self.f_head1 = self.vm["pre1"], self.vm["post1"], self.vm["head1"]
        packed = pack_weights(name, self.formats, w, cfg)
        self.notes = notes + packed.notes
        self.layers = [([to_tvm(a) for a in pre], [to_tvm(a) for a in post]) for pre, post in packed.layers]
        self.emb = np.ascontiguousarray(w["token_embd.weight"])  # [V, d] for the lookup
        self.head_w = [to_tvm(a) for a in packed.head]  # [d, V] fp32 or packed
        self.onw = to_tvm(packed.onw)
        # Bytes of weights each decoded token reads (the layers and the head; the embedding lookup
        # reads one row of a separate fp32 table).
        self.weight_bytes = sum(_nbytes(a) for pre, post in self.layers for a in (*pre, *post)) \
            + sum(_nbytes(a) for a in self.head_w)
        cos, sin = rope_tables(cfg, cfg.max_pos)
        self.cos, self.sin = tvm.runtime.tensor(cos), tvm.runtime.tensor(sin)
        del w

    @property
    def default_kv_dtype(self) -> str:
        # fp32 weights keep an fp32 cache (the exact path, checked against numpy); quantized weights
        # hold the cache in fp16 like llama.cpp: half the bytes read per decoded token at long contexts.
        return "float32" if all(f == "fp32" for f in self.formats.values()) else "float16"

    def describe(self) -> str:
        """The format each role runs in, and what was requantized."""
        roles = ", ".join(f"{r} {f}" for r, f in self.formats.items() if r != "embed" or not self.cfg.tied)
        return f"{self.cfg.arch}, {self.cfg.n_layers} layers, weights {self.weights}: {roles}" + \
            "".join(f"; {n}" for n in self.notes)

    def session(self, policy: str = "full", budget: int = 256, **kw) -> "Session":
        return Session(self, policy, budget, **kw)


class Session:
    """One sequence: per-layer K/V buffers [kv_heads, budget, head_dim] plus per-layer policies."""

    def __init__(self, model: Model, policy: str, budget: int, sinks: int = 4, recent: int | None = None,
                 kv_dtype: str | None = None):
        self.kv_dtype = kv_dtype or model.default_kv_dtype
        if self.kv_dtype not in ("float32", "float16"):
            raise UserError(f"unknown KV cache dtype '{self.kv_dtype}'; use float32 or float16")
        if budget > model.cfg.max_pos:
            raise UserError(f"--kv-budget {budget} exceeds the model's context {model.cfg.max_pos}; lower it")
        self.model = model
        cfg = model.cfg
        self.policies = [make_policy(policy, budget, sinks, recent) for _ in range(cfg.n_layers)]
        self.capacity = budget
        kvd = np.dtype(self.kv_dtype)
        self.attn = kernels.build_attention(cfg, model.target, self.kv_dtype)
        self.K = [aligned((cfg.n_kv_heads, budget, cfg.head_dim), kvd) for _ in range(cfg.n_layers)]
        self.V = [aligned((cfg.n_kv_heads, budget, cfg.head_dim), kvd) for _ in range(cfg.n_layers)]
        self.tK = [shared(a) for a in self.K]
        self.tV = [shared(a) for a in self.V]
        self.kpos = [aligned((budget,), np.int32) for _ in range(cfg.n_layers)]
        self.tkpos = [shared(a) for a in self.kpos]
        # Rotated keys kept across steps by the attention kernel (-1: not rotated yet). Scratch for
        # speed, not counted in kv_bytes (the cache proper is K and V).
        self.tKR = [shared(aligned(kernels.kr_shape(cfg.n_kv_heads, cfg.head_dim, budget), kvd))
                    for _ in range(cfg.n_layers)]
        self.krpos = [aligned((cfg.n_kv_heads, budget), np.int32) for _ in range(cfg.n_layers)]
        for a in self.krpos:
            a[:] = -1
        self.tkrpos = [shared(a) for a in self.krpos]
        self.position = 0  # original position of the next token
        self._bufs: dict = {}

    @property
    def kv_bytes(self) -> int:
        return sum(a.nbytes for a in self.K) + sum(a.nbytes for a in self.V)

    @property
    def n_valid(self) -> int:
        return self.policies[0].n_valid

    # The steps `generate` and `perplexity` take, shared with the board's session (edgetvm.llm.board).
    def greedy_prefill(self, ids) -> int:
        return int(np.argmax(self.prefill(ids)[-1]))

    def greedy_next(self, token: int) -> int:
        return int(np.argmax(self.forward([int(token)])[-1]))

    def nll(self, ids) -> np.ndarray:
        """-log p(ids[t + 1] | ...) for the len(ids) - 1 tokens fed (float64)."""
        lg = self.forward(ids[:-1]).astype(np.float64)
        mx = lg.max(-1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(lg - mx).sum(-1))
        return lse - lg[np.arange(len(ids) - 1), np.asarray(ids[1:])]

    def _buffers(self, n):
        if n not in self._bufs:
            cfg = self.model.cfg
            qpos = aligned((n,), np.int32)
            meta = aligned((2,), np.int32)
            out = aligned((n, cfg.n_heads, cfg.head_dim))
            probs = aligned((n, cfg.n_heads, kernels.padded(self.capacity)))
            self._bufs[n] = (qpos, shared(qpos), meta, shared(meta), shared(out), probs[:, :, :self.capacity],
                             shared(probs))
        return self._bufs[n]

    def forward(self, ids) -> np.ndarray:
        """Feed tokens (all must fit without evicting one of them); logits [n, vocab]."""
        m = self.model
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        x = tvm.runtime.tensor(m.emb[ids])
        qpos, tqpos, meta, tmeta, tout, probs, tprobs = self._buffers(n)
        positions = range(self.position, self.position + n)
        f_pre, f_post = (m.f_pre1, m.f_post1) if n == 1 else (m.f_pre, m.f_post)
        for l, (pre_w, post_w) in enumerate(m.layers):
            pol = self.policies[l]
            slots = [pol.slot_for(p) for p in positions]
            start = slots[0]
            if n > 1 and slots != list(range(start, start + n)):
                raise RuntimeError("a prefill chunk must land in consecutive free slots")
            q, k, v = f_pre(x, *pre_w)  # the kernel writes k, v into the cache slots
            rp = pol.rope_positions()
            self.kpos[l][:] = rp
            qpos[:] = rp[start:start + n]
            meta[:] = start, pol.n_valid
            self.attn(q, k, v, tqpos, tmeta, self.tkpos[l], m.cos, m.sin, self.tK[l], self.tV[l], self.tKR[l],
                      self.tkrpos[l], tout, tprobs)
            pol.observe(probs)
            x = f_post(x, tout, *post_w)
        self.position += n
        head = m.f_head_chunk if n == HEAD_CHUNK else m.f_head1 if n == 1 else m.f_head
        return head(x, m.onw, *m.head_w).numpy()

    def prefill(self, ids, chunk: int = 64) -> np.ndarray:
        """Logits for every token of `ids`: chunks while the cache has room, then one at a time."""
        ids = list(ids)
        out = []
        i = 0
        while i < len(ids):
            room = self.capacity - self.n_valid
            step = min(chunk, room, len(ids) - i) if room > 0 else 1
            out.append(self.forward(ids[i:i + step]))
            i += step
        return np.concatenate(out, 0)


def check_text(text: str, what: str) -> str:
    if not text.strip():
        raise UserError(f"{what} is empty; give it some text")
    return text


def generate(model: Model, prompt: str, max_new: int = 32, policy: str = "full", budget: int = 256,
             sinks: int = 4, stop_at_eos: bool = True) -> Iterator[str]:
    """Greedy decoding; yields text pieces as tokens are made."""
    check_text(prompt, "the prompt")
    tok = model.tokenizer
    ids = tok.encode(prompt).ids
    if policy == "full" and len(ids) + max_new > budget:
        raise UserError(f"prompt ({len(ids)} tokens) + --max-new {max_new} exceed the full cache of "
                        f"{budget}; raise --kv-budget or pick an evicting --kv-policy")
    s = model.session(policy, budget, sinks=sinks)
    made: list[int] = []
    text = ""
    nxt = None
    for _ in range(max_new):
        nxt = s.greedy_prefill(ids) if nxt is None else s.greedy_next(nxt)
        if stop_at_eos and nxt == model.cfg.eos:
            break
        made.append(nxt)
        full = tok.decode(made)
        if not full.endswith("\ufffd"):  # wait for a whole UTF-8 character
            yield full[len(text):]
            text = full


def perplexity(model: Model, ids, policy: str = "full", budget: int | None = None, sinks: int = 4,
               chunk: int = 64, recent: int | None = None, extra_decode: int = 0) -> dict:
    """Perplexity of `ids` decoded with the policy (exact: every token sees at most `budget`).
    `extra_decode` greedy tokens are decoded after the text (in the same cache) to time decoding
    when the text itself needed none (the full cache prefills everything)."""
    ids = list(ids)
    if len(ids) < 2:
        raise UserError("the text has fewer than 2 tokens; give a longer text file")
    budget = budget or len(ids)
    s = model.session(policy, budget, sinks=sinks, recent=recent)
    t0 = time.perf_counter()
    nll = 0.0
    i = 0
    n_decode = 0
    t_decode = 0.0
    chunk = min(chunk, getattr(s, "chunk", chunk))  # a memory-budgeted session may need smaller chunks
    while i < len(ids) - 1:
        room = s.capacity - s.n_valid
        step = min(chunk, room, len(ids) - 1 - i) if room > 0 else 1
        ts = time.perf_counter()
        nll += float(np.sum(s.nll(ids[i:i + step + 1])))
        if step == 1:
            n_decode += 1
            t_decode += time.perf_counter() - ts
        i += step
    tok = ids[-1]
    for _ in range(extra_decode):
        ts = time.perf_counter()
        tok = s.greedy_next(tok)
        n_decode += 1
        t_decode += time.perf_counter() - ts
    n = len(ids) - 1
    return {"ppl": float(np.exp(nll / n)), "tokens": n, "seconds": time.perf_counter() - t0,
            "kv_bytes": s.kv_bytes, "decode_tokens": n_decode,
            "decode_tok_s": (n_decode / t_decode) if t_decode else None}
