"""Our own attention kernel (TIR) over a fixed-capacity KV cache, plus its numpy reference.

One kernel serves prefill (n queries) and decode (n = 1). The cache holds UN-rotated keys;
the kernel applies RoPE (adjacent pairs) to each query with `qpos[t]` and to each key with
`kpos[slot]`, so a policy can re-assign positions within the cache (StreamingLLM) without
rewriting keys. Rotated (and 1/sqrt(d)-scaled) keys are kept in `kr` [kv_heads, cap, d] across
calls, with `krpos` [kv_heads, cap] the position each row was rotated with: a key is rotated
again only when kpos[slot] != krpos[slot], so decoding rotates one new key per step (all of
them when StreamingLLM re-assigns positions). Whoever writes a new key into a slot must set
that slot's krpos to -1. It returns the attention output and the softmax weights per slot, which the
H2O and TOVA policies score.

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


def make_attention(n_heads: int = 9, n_kv_heads: int = 3, head_dim: int = 64):
    H, KH, D = n_heads, n_kv_heads, head_dim
    G = H // KH
    D2 = D // 2
    scale = float(1.0 / np.sqrt(D))

    @T.prim_func
    def attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, qpos_h: T.handle, kpos_h: T.handle,
                  cos_h: T.handle, sin_h: T.handle, out_h: T.handle, p_h: T.handle,
                  kr_h: T.handle, krpos_h: T.handle, start: T.int32, n_valid: T.int32):
        T.func_attr({"global_symbol": "attention", "tir.noalias": True})
        n = T.int32()
        cap = T.int32()
        npos = T.int32()
        Q = T.match_buffer(q_h, (n, H, D), "float32")
        K = T.match_buffer(k_h, (KH, cap, D), "float32")
        V = T.match_buffer(v_h, (KH, cap, D), "float32")
        QPOS = T.match_buffer(qpos_h, (n,), "int32")
        KPOS = T.match_buffer(kpos_h, (cap,), "int32")
        COS = T.match_buffer(cos_h, (npos, D2), "float32")
        SIN = T.match_buffer(sin_h, (npos, D2), "float32")
        OUT = T.match_buffer(out_h, (n, H, D), "float32")
        P = T.match_buffer(p_h, (n, H, cap), "float32")
        KR = T.match_buffer(kr_h, (KH, cap, D), "float32")  # rotated, pre-scaled keys (kept across calls)
        KRPOS = T.match_buffer(krpos_h, (KH, cap), "int32")  # the position each KR row was rotated with
        for kj in T.parallel(KH * n_valid):
            kh = T.bind(kj // n_valid)
            j = T.bind(kj % n_valid)
            kp = T.bind(KPOS[j])
            if KRPOS[kh, j] != kp:
                for i in range(D2):
                    c = T.bind(COS[kp, i])
                    s = T.bind(SIN[kp, i])
                    k0 = T.bind(K[kh, j, 2 * i])
                    k1 = T.bind(K[kh, j, 2 * i + 1])
                    KR[kh, j, 2 * i] = (k0 * c - k1 * s) * T.float32(scale)
                    KR[kh, j, 2 * i + 1] = (k0 * s + k1 * c) * T.float32(scale)
                KRPOS[kh, j] = kp
        for th in T.parallel(n * H):
            qr = T.alloc_buffer((D,), "float32")
            acc = T.alloc_buffer((D,), "float32")
            part = T.alloc_buffer((8,), "float32")
            red = T.alloc_buffer((2,), "float32")
            t = T.bind(th // H)
            h = T.bind(th % H)
            kh = T.bind(h // G)
            qp = T.bind(QPOS[t])
            for i in range(D2):
                c = T.bind(COS[qp, i])
                s = T.bind(SIN[qp, i])
                qr[2 * i] = Q[t, h, 2 * i] * c - Q[t, h, 2 * i + 1] * s
                qr[2 * i + 1] = Q[t, h, 2 * i] * s + Q[t, h, 2 * i + 1] * c
            red[0] = T.float32(-3.0e38)
            for j in range(n_valid):
                if j < start or j >= start + n or j <= start + t:
                    for l in T.vectorized(8):
                        part[l] = T.float32(0)
                    for i in range(D // 8):
                        for l in T.vectorized(8):
                            part[l] = part[l] + qr[i * 8 + l] * KR[kh, j, i * 8 + l]
                    red[1] = part[0] + part[1] + part[2] + part[3] + part[4] + part[5] + part[6] + part[7]
                    P[t, h, j] = red[1]
                    red[0] = T.max(red[0], red[1])
                else:
                    P[t, h, j] = T.float32(-3.0e38)
            red[1] = T.float32(0)
            for j in range(n_valid):
                if j < start or j >= start + n or j <= start + t:
                    P[t, h, j] = T.exp(P[t, h, j] - red[0])
                    red[1] = red[1] + P[t, h, j]
                else:
                    P[t, h, j] = T.float32(0)
            for j in range(cap - n_valid):
                P[t, h, n_valid + j] = T.float32(0)
            for d in T.vectorized(D):
                acc[d] = T.float32(0)
            red[1] = T.float32(1) / red[1]
            for j in range(n_valid):
                P[t, h, j] = P[t, h, j] * red[1]
                for d in T.vectorized(D):
                    acc[d] = acc[d] + P[t, h, j] * V[kh, j, d]
            for d in T.vectorized(D):
                OUT[t, h, d] = acc[d]

    return attention


_BUILT: dict = {}


def build_attention(cfg, target=None):
    """Compiled attention kernel: f(q, k, v, qpos, kpos, cos, sin, out, probs, kr, krpos, start, n_valid)."""
    key = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
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
