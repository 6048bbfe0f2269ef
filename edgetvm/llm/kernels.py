"""Our own attention kernel (TIR) over a fixed-capacity KV cache, plus its numpy reference.

One kernel serves prefill (n queries) and decode (n = 1). It first writes the chunk's new keys
and values (knew, vnew [n, kv_heads, d]) into slots start .. start + n - 1 of the cache (k, v
[kv_heads, cap, d]), then attends. The cache holds UN-rotated keys;
the kernel applies RoPE (adjacent pairs) to each query with `qpos[t]` and to each key with
`kpos[slot]`, so a policy can re-assign positions within the cache (StreamingLLM) without
rewriting keys. Rotated (and 1/sqrt(d)-scaled) keys are kept in `kr` [kv_heads, padded cap / 32,
d, 32] (blocks of 32 slots, each contiguous) across calls, with `krpos` [kv_heads, cap] the position each was rotated with: a key is rotated
again only when kpos[slot] != krpos[slot], so decoding rotates one new key per step (all of
them when StreamingLLM re-assigns positions); the slots it writes get krpos -1. It returns the attention output and the softmax weights per slot
(`probs` [n, heads, padded cap], zero past n_valid), which the H2O and TOVA policies score.

Schedule: scores in parallel over (query, kv head, block of 32 slots) with the 32 slots in
vector lanes and the 3 query heads of a group sharing each key load; then softmax with a
vectorised exp and the weighted sum of values in parallel over (query, head).

Visibility: query t (written at slot `start + t`) sees slot j when j < n_valid and
(j < start or j >= start + n or j <= start + t): the whole cache plus the chunk's causal prefix.

Scalars are `T.bind` lets and scratch arrays use the default ("global") scope: in TVM 0.27 a
plain `x = ...` in TVMScript is a mutable variable and a "local"-scope buffer on CPU both become
a TVMBackendAllocWorkspace call per loop iteration (9x slower decode attention here); small
global-scope buffers go on the stack.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T


JB = 32  # keys per score block; the rotated-key cache and the probabilities are padded to it


def padded(cap: int) -> int:
    """Capacity rounded up to whole score blocks: the width of `kr` and `probs`."""
    return (cap + JB - 1) // JB * JB


def kr_shape(n_kv_heads: int, head_dim: int, cap: int) -> tuple:
    return (n_kv_heads, padded(cap) // JB, head_dim, JB)


def make_attention(n_heads: int = 9, n_kv_heads: int = 3, head_dim: int = 64, kv_dtype: str = "float32"):
    H, KH, D = n_heads, n_kv_heads, head_dim
    G = H // KH
    D2 = D // 2
    scale = float(1.0 / np.sqrt(D))
    LOG2E, LN2_HI, LN2_LO = 1.4426950408889634, 0.693359375, -2.12194440e-4

    @T.prim_func
    def attention(q_h: T.handle, knew_h: T.handle, vnew_h: T.handle, qpos_h: T.handle, meta_h: T.handle,
                  kpos_h: T.handle, cos_h: T.handle, sin_h: T.handle, k_h: T.handle, v_h: T.handle,
                  kr_h: T.handle, krpos_h: T.handle, out_h: T.handle, p_h: T.handle):
        T.func_attr({"global_symbol": "attention", "tir.noalias": True, "tir.is_scheduled": True})
        n = T.int32()
        cap = T.int32()
        capp = T.int32()
        npos = T.int32()
        Q = T.match_buffer(q_h, (n, H, D), "float32")
        KNEW = T.match_buffer(knew_h, (n, KH, D), "float32")
        VNEW = T.match_buffer(vnew_h, (n, KH, D), "float32")
        K = T.match_buffer(k_h, (KH, cap, D), kv_dtype)
        V = T.match_buffer(v_h, (KH, cap, D), kv_dtype)
        QPOS = T.match_buffer(qpos_h, (n,), "int32")
        META = T.match_buffer(meta_h, (2,), "int32")
        KPOS = T.match_buffer(kpos_h, (cap,), "int32")
        COS = T.match_buffer(cos_h, (npos, D2), "float32")
        SIN = T.match_buffer(sin_h, (npos, D2), "float32")
        OUT = T.match_buffer(out_h, (n, H, D), "float32")
        P = T.match_buffer(p_h, (n, H, capp), "float32")
        # rotated, pre-scaled keys in blocks of JB slots: [kv head, slot block, dim, slot in block]
        KR = T.match_buffer(kr_h, (KH, capp // JB, D, JB), kv_dtype)
        KRPOS = T.match_buffer(krpos_h, (KH, cap), "int32")  # the position each KR column was rotated with
        start = T.bind(META[0])
        n_valid = T.bind(META[1])
        nblk = T.bind((n_valid + JB - 1) // JB)
        # 0. write the chunk's keys and values into their slots (start .. start + n - 1)
        for t in range(n):
            for kh in range(KH):
                for d in T.vectorized(D):
                    K[kh, start + t, d] = T.Cast(kv_dtype, KNEW[t, kh, d])
                    V[kh, start + t, d] = T.Cast(kv_dtype, VNEW[t, kh, d])
                KRPOS[kh, start + t] = -1
        # 1. rotate the keys whose position changed (or that are new: krpos -1)
        for kj in T.parallel(KH * n_valid):
            kh = T.bind(kj // n_valid)
            j = T.bind(kj % n_valid)
            kp = T.bind(KPOS[j])
            if KRPOS[kh, j] != kp:
                for i in range(D2):
                    c = T.bind(COS[kp, i])
                    s = T.bind(SIN[kp, i])
                    k0 = T.bind(T.Cast("float32", K[kh, j, 2 * i]))
                    k1 = T.bind(T.Cast("float32", K[kh, j, 2 * i + 1]))
                    KR[kh, j // JB, 2 * i, j % JB] = T.Cast(kv_dtype, (k0 * c - k1 * s) * T.float32(scale))
                    KR[kh, j // JB, 2 * i + 1, j % JB] = T.Cast(kv_dtype, (k0 * s + k1 * c) * T.float32(scale))
                KRPOS[kh, j] = kp
        # 2. scores, in parallel over (query, kv head, block of JB keys), the G query heads of the
        #    group together: JB keys in vector lanes, one FMA per (head, dim), no horizontal sums.
        for u in T.parallel(n * KH * nblk):
            qr = T.alloc_buffer((G, D), "float32")
            sc = T.alloc_buffer((G, JB), "float32")
            t = T.bind(u // (KH * nblk))
            kh = T.bind(u // nblk % KH)
            jb = T.bind(u % nblk)
            qp = T.bind(QPOS[t])
            for g in range(G):
                for i in range(D2):
                    c = T.bind(COS[qp, i])
                    s = T.bind(SIN[qp, i])
                    q0 = T.bind(Q[t, kh * G + g, 2 * i])
                    q1 = T.bind(Q[t, kh * G + g, 2 * i + 1])
                    qr[g, 2 * i] = q0 * c - q1 * s
                    qr[g, 2 * i + 1] = q0 * s + q1 * c
                for l in T.vectorized(JB):
                    sc[g, l] = T.float32(0)
            for d in range(D):
                for g in T.unroll(G):
                    for l in T.vectorized(JB):
                        sc[g, l] = sc[g, l] + qr[g, d] * T.Cast("float32", KR[kh, jb, d, l])
            for g in range(G):
                for l in T.vectorized(JB):
                    P[t, kh * G + g, jb * JB + l] = T.if_then_else(
                        jb * JB + l < n_valid and (jb * JB + l < start or jb * JB + l >= start + n
                                                   or jb * JB + l <= start + t),
                        sc[g, l], T.float32(-3.0e38))
        # 3. softmax (vectorised exp: Cody-Waite reduction + degree-6 polynomial, rel. error ~1e-7)
        #    and the weighted sum of values, in parallel over (query, head)
        for th in T.parallel(n * H):
            mx = T.alloc_buffer((JB,), "float32")
            sm = T.alloc_buffer((JB,), "float32")
            acc = T.alloc_buffer((D,), "float32")
            red = T.alloc_buffer((2,), "float32")
            xb = T.alloc_buffer((JB,), "float32")
            fb = T.alloc_buffer((JB,), "float32")
            rb = T.alloc_buffer((JB,), "float32")
            t = T.bind(th // H)
            h = T.bind(th % H)
            kh = T.bind(h // G)
            for l in T.vectorized(JB):
                mx[l] = T.float32(-3.0e38)
                sm[l] = T.float32(0)
            for jb in range(nblk):
                for l in T.vectorized(JB):
                    mx[l] = T.max(mx[l], P[t, h, jb * JB + l])
            red[0] = T.float32(-3.0e38)
            for l in range(JB):
                red[0] = T.max(red[0], mx[l])
            for jb in range(nblk):
                for l in T.vectorized(JB):  # x = s - max (clamped), fn = round(x / ln 2)
                    xb[l] = T.max(P[t, h, jb * JB + l] - red[0], T.float32(-87.0))
                    fb[l] = T.floor(xb[l] * T.float32(LOG2E) + T.float32(0.5))
                for l in T.vectorized(JB):  # r = x - fn ln 2, exp(r) by polynomial, times 2^fn
                    rb[l] = xb[l] - fb[l] * T.float32(LN2_HI) - fb[l] * T.float32(LN2_LO)
                    xb[l] = ((((((rb[l] * T.float32(1.0 / 720) + T.float32(1.0 / 120)) * rb[l] + T.float32(1.0 / 24))
                                * rb[l] + T.float32(1.0 / 6)) * rb[l] + T.float32(0.5)) * rb[l] + T.float32(1.0))
                             * rb[l] + T.float32(1.0)) \
                        * T.reinterpret("float32", T.shift_left(T.Cast("int32", fb[l]) + 127, 23))
                    P[t, h, jb * JB + l] = T.if_then_else(P[t, h, jb * JB + l] > T.float32(-1.0e38), xb[l],
                                                          T.float32(0))
                    sm[l] = sm[l] + P[t, h, jb * JB + l]
            red[1] = T.float32(0)
            for l in range(JB):
                red[1] = red[1] + sm[l]
            red[1] = T.float32(1) / red[1]
            for j in range(capp - nblk * JB):
                P[t, h, nblk * JB + j] = T.float32(0)
            for d in T.vectorized(D):
                acc[d] = T.float32(0)
            for j in range(n_valid):
                P[t, h, j] = P[t, h, j] * red[1]
                for d in T.vectorized(D):
                    acc[d] = acc[d] + P[t, h, j] * T.Cast("float32", V[kh, j, d])
            for d in T.vectorized(D):
                OUT[t, h, d] = acc[d]

    return attention


_BUILT: dict = {}


def build_attention(cfg, target=None, kv_dtype: str = "float32"):
    """Compiled attention kernel: f(q, knew, vnew, qpos, meta, kpos, cos, sin, k, v, kr, krpos, out, probs)
    with meta = [start, n_valid] (int32); probs is [n, heads, padded(cap)] and kr
    [kv_heads, padded(cap) / JB, head_dim, JB]. The cache (k, v, kr, krpos) is updated in place and
    out, probs come last, so a Relax function calls it with call_tir_inplace."""
    key = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, kv_dtype)
    if key not in _BUILT:
        target = target or cpu_target()
        mod = tvm.IRModule({"attention": make_attention(*key)})
        _BUILT[key] = tvm.compile(mod, target=target)["attention"]
    return _BUILT[key]


def cpu_target():
    from tvm.target import codegen

    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 2})


def attention_ref(q, k, v, qpos, kpos, cos, sin, start, n_valid):
    """Numpy reference with the kernel's exact contract (un-rotated q/k, slot visibility)."""
    from edgetvm.llm.reference import rope

    n, H, D = q.shape
    KH, cap, _ = k.shape
    g = H // KH
    qr = rope(q, np.asarray(qpos), cos, sin)
    kr = rope(k.transpose(1, 0, 2), np.asarray(kpos), cos, sin)  # [cap, KH, D]
    kk = np.repeat(kr, g, axis=1)
    vv = np.repeat(v.transpose(1, 0, 2), g, axis=1)
    s = np.einsum("nhd,mhd->nhm", qr, kk) / np.sqrt(D)
    j = np.arange(cap)[None, :]
    t = np.arange(n)[:, None]
    vis = (j < n_valid) & ((j < start) | (j >= start + n) | (j <= start + t))  # [n, cap]
    s = np.where(vis[:, None, :], s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nhm,mhd->nhd", p, vv), p
