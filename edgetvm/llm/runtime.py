"""The compiled decoder: Relax functions for the dense compute, our TIR attention kernel,
and a fixed-capacity KV cache driven by a policy.

Weights: `weights="fp32"` (default) dequantizes the GGUF's Q4_1/Q8_0 once to fp32, pre-transposed
to [in, out], and the matmuls are TVM's (our CPU schedule). `weights="q8"` (8-bit groups) and
`weights="q4"` (the GGUF's own Q4_1 blocks, exactly) keep the weights quantized and run our own
dequantizing matmul kernels (TIR, `edgetvm.llm.quant`); see that module for the formats.
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
    d, H, KH, D, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab
    qkv_out = (H + 2 * KH) * D
    bb = relax.BlockBuilder()
    T = lambda shape: relax.TensorType(shape, "float32")
    gvs: dict = {}

    def weight(name, K, N, fmt=None):
        """Params for a [K in, N out] weight: one fp32 [K, N] or the packed arrays."""
        fmt = fmt or weights
        if fmt == "fp32":
            return [relax.Var(name, T((K, N)))]
        NB, KG, TJ = N // quant.TJ, K // quant.G, quant.TJ
        if fmt == "q8":
            return [relax.Var(name + "_q", relax.TensorType((NB, K, TJ), "int8")),
                    relax.Var(name + "_s", T((NB, KG, TJ)))]
        return [relax.Var(name + "_q", relax.TensorType((NB, K // 2, TJ), "uint8")),
                relax.Var(name + "_d", T((NB, KG, TJ))), relax.Var(name + "_m", T((NB, KG, TJ)))]

    def mm(h, ws, n, K, N, fmt=None):
        fmt = fmt or weights
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
        wqkv = weight("wqkv", d, qkv_out)
        with bb.function("pre" + suffix, [x, nw, *wqkv]):
            with bb.dataflow():
                h = bb.emit(relax.op.nn.rms_norm(x, nw, axes=[-1], epsilon=cfg.eps))
                y = bb.emit(mm(h, wqkv, n, d, qkv_out))
                q = bb.emit(relax.op.reshape(relax.op.strided_slice(y, [1], [0], [H * D]), (n, H, D)))
                k = bb.emit(relax.op.reshape(relax.op.strided_slice(y, [1], [H * D], [(H + KH) * D]), (n, KH, D)))
                v = bb.emit(relax.op.reshape(relax.op.strided_slice(y, [1], [(H + KH) * D], [qkv_out]), (n, KH, D)))
                out = bb.emit_output(relax.Tuple([q, k, v]))
            bb.emit_func_output(out)

        x = relax.Var("x", T((n, d)))
        a = relax.Var("a", T((n, H, D)))
        wo = weight("wo", H * D, d)
        fw = relax.Var("fw", T((d,)))
        wgu = weight("wgu", d, 2 * F)
        wd = weight("wd", F, d)
        with bb.function("post" + suffix, [x, a, *wo, fw, *wgu, *wd]):
            with bb.dataflow():
                ao = bb.emit(mm(bb.emit(relax.op.reshape(a, (n, H * D))), wo, n, H * D, d))
                x1 = bb.emit(relax.op.add(x, ao))
                h = bb.emit(relax.op.nn.rms_norm(x1, fw, axes=[-1], epsilon=cfg.eps))
                gu = bb.emit(mm(h, wgu, n, d, 2 * F))
                g = relax.op.strided_slice(gu, [1], [0], [F])
                u = relax.op.strided_slice(gu, [1], [F], [2 * F])
                m = bb.emit(relax.op.multiply(relax.op.nn.silu(g), u))
                out = bb.emit_output(relax.op.add(x1, bb.emit(mm(m, wd, n, F, d))))
            bb.emit_func_output(out)

    # The head for a symbolic n, a single token and whole prefill chunks (static shapes are faster).
    for name, n in (("head", tvm.tirx.Var("n", "int64")), ("head1", 1), ("head_chunk", HEAD_CHUNK)):
        x = relax.Var("x", T((n, d)))
        onw = relax.Var("onw", T((d,)))
        hfmt = "fp32" if weights == "fp32" else "q8"  # the GGUF's head is Q8_0
        embt = weight("embt", d, V, hfmt)
        with bb.function(name, [x, onw, *embt]):
            with bb.dataflow():
                h = bb.emit(relax.op.nn.rms_norm(x, onw, axes=[-1], epsilon=cfg.eps))
                out = bb.emit_output(mm(h, embt, n, d, V, hfmt))
            bb.emit_func_output(out)

    mod = bb.get()
    if use_edgetvm_pipeline:
        from edgetvm.passes import pipeline

        return pipeline.finish(pipeline.fuse(mod, target), target)
    return tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))


def _nbytes(t) -> int:
    return int(np.prod(t.shape)) * np.dtype(str(t.dtype)).itemsize


class Model:
    """SmolLM2 compiled for the CPU. `session(policy, budget)` makes a KV cache to decode with."""

    def __init__(self, name: str = "smollm2-135m", target=None, use_edgetvm_pipeline: bool = True,
                 weights: str = "fp32"):
        if weights not in quant.FORMATS:
            raise UserError(f"unknown weight format '{weights}'; use one of: {', '.join(quant.FORMATS)}")
        self.name = name
        self.weights = weights
        self.cfg, w = load_weights(name)
        self.tokenizer = load_tokenizer(name)
        cfg = self.cfg
        self.target = target or kernels.cpu_target()
        t0 = time.perf_counter()
        self.ex = build_dense(cfg, self.target, use_edgetvm_pipeline, weights)
        self.vm = relax.VirtualMachine(self.ex, tvm.cpu())
        # The kernel for this model's default cache; another cache dtype compiles its own on first use.
        kernels.build_attention(cfg, self.target, "float32" if weights == "fp32" else "float16")
        self.compile_s = time.perf_counter() - t0
        self.f_pre, self.f_post, self.f_head = self.vm["pre"], self.vm["post"], self.vm["head"]
        self.f_head_chunk = self.vm["head_chunk"]
        self.f_pre1, self.f_post1, self.f_head1 = self.vm["pre1"], self.vm["post1"], self.vm["head1"]
        tt = lambda a: to_tvm(np.asarray(a, dtype=np.float32))
        raw = load_raw(name) if weights != "fp32" else None

        def lin(names, fmt=weights):
            """Weights [out, in] stacked along out -> the function's params for them."""
            if fmt == "fp32":
                return [tt(np.concatenate([w[k] for k in names], 0).T)]
            types = {raw[k][0] for k in names}
            if fmt == "q4" and types == {"Q4_1"} or fmt == "q8" and types == {"Q8_0"}:  # exact
                K = raw[names[0]][2][1]
                data = np.concatenate([np.asarray(raw[k][1]) for k in names], 0)
                N = data.shape[0]
                arrs = quant.from_gguf_q4_1(data, N, K) if fmt == "q4" else quant.from_gguf_q8_0(data, N, K)
            else:
                arrs = quant.pack(np.concatenate([w[k] for k in names], 0), fmt)
            return [to_tvm(a) for a in arrs]

        self.layers = []  # per layer: (pre's weight params, post's weight params)
        for l in range(cfg.n_layers):
            p = f"blk.{l}."
            pre = [tt(w[p + "attn_norm.weight"]), *lin([p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"])]
            post = [*lin([p + "attn_output.weight"]), tt(w[p + "ffn_norm.weight"]),
                    *lin([p + "ffn_gate.weight", p + "ffn_up.weight"]), *lin([p + "ffn_down.weight"])]
            self.layers.append((pre, post))
        self.emb = np.ascontiguousarray(w["token_embd.weight"])  # [V, d] for the lookup
        head = "output.weight" if "output.weight" in w else "token_embd.weight"  # tied
        self.head_w = lin([head], "fp32" if weights == "fp32" else "q8")  # [d, V] fp32 or packed
        self.onw = tt(w["output_norm.weight"])
        # Bytes of weights each decoded token reads (the layers and the head; the embedding lookup
        # reads one row of a separate fp32 table).
        self.weight_bytes = sum(_nbytes(a) for pre, post in self.layers for a in (*pre, *post)) \
            + sum(_nbytes(a) for a in self.head_w)
        cos, sin = rope_tables(cfg, cfg.max_pos)
        self.cos, self.sin = tvm.runtime.tensor(cos), tvm.runtime.tensor(sin)
        del w

    def session(self, policy: str = "full", budget: int = 256, **kw) -> "Session":
        return Session(self, policy, budget, **kw)


class Session:
    """One sequence: per-layer K/V buffers [kv_heads, budget, head_dim] plus per-layer policies."""

    def __init__(self, model: Model, policy: str, budget: int, sinks: int = 4, recent: int | None = None,
                 kv_dtype: str | None = None):
        # fp32 weights keep an fp32 cache (the exact path, checked against numpy); q8/q4 hold the
        # cache in fp16 like llama.cpp: half the bytes read per decoded token at long contexts.
        self.kv_dtype = kv_dtype or ("float32" if model.weights == "fp32" else "float16")
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

    def _buffers(self, n):
        if n not in self._bufs:
            cfg = self.model.cfg
            qpos = aligned((n,), np.int32)
            out = aligned((n, cfg.n_heads, cfg.head_dim))
            probs = aligned((n, cfg.n_heads, kernels.padded(self.capacity)))
            self._bufs[n] = (qpos, shared(qpos), shared(out), probs[:, :, :self.capacity], shared(probs))
        return self._bufs[n]

    def forward(self, ids) -> np.ndarray:
        """Feed tokens (all must fit without evicting one of them); logits [n, vocab]."""
        m = self.model
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        x = tvm.runtime.tensor(m.emb[ids])
        qpos, tqpos, tout, probs, tprobs = self._buffers(n)
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
            self.attn(q, k, v, self.tK[l], self.tV[l], tqpos, self.tkpos[l], m.cos, m.sin, tout, tprobs, self.tKR[l],
                   self.tkrpos[l], start, pol.n_valid)
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
            room = self.capacity - self.policies[0].n_valid
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
    logits = s.prefill(ids)[-1]
    made: list[int] = []
    text = ""
    for _ in range(max_new):
        nxt = int(np.argmax(logits))
        if stop_at_eos and nxt == model.cfg.eos:
            break
        made.append(nxt)
        full = tok.decode(made)
        if not full.endswith("\ufffd"):  # wait for a whole UTF-8 character
            yield full[len(text):]
            text = full
        logits = s.forward([nxt])[-1]


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
    while i < len(ids) - 1:
        room = s.capacity - s.policies[0].n_valid
        step = min(chunk, room, len(ids) - 1 - i) if room > 0 else 1
        ts = time.perf_counter()
        lg = s.forward(ids[i:i + step]).astype(np.float64)
        if step == 1:
            n_decode += 1
            t_decode += time.perf_counter() - ts
        mx = lg.max(-1, keepdims=True)
        lse = (mx[:, 0] + np.log(np.exp(lg - mx).sum(-1)))
        tgt = np.asarray(ids[i + 1:i + step + 1])
        nll += float((lse - lg[np.arange(step), tgt]).sum())
        i += step
    lg = lg[-1]
    for _ in range(extra_decode):
        ts = time.perf_counter()
        lg = s.forward([int(np.argmax(lg))])[-1]
        n_decode += 1
        t_decode += time.perf_counter() - ts
    n = len(ids) - 1
    return {"ppl": float(np.exp(nll / n)), "tokens": n, "seconds": time.perf_counter() - t0,
            "kv_bytes": s.kv_bytes, "decode_tokens": n_decode,
            "decode_tok_s": (n_decode / t_decode) if t_decode else None}
