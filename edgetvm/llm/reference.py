"""Numpy reference forward pass of the llama architecture: the ground truth for the TVM build.

RoPE rotates adjacent pairs (2i, 2i+1) for llama (llama.cpp's GGUF converter permuted the Q/K
weights) and the halves (i, i + D/2) for qwen2 (NEOX style, `cfg.rope_neox`); qwen2's q/k/v
projections add biases. The weights are the file's, dequantized, unpermuted.
"""

from __future__ import annotations

import numpy as np


def rope_tables(cfg, n_pos: int | None = None):
    """cos, sin tables [n_pos, head_dim/2] (fp32) for positions 0..n_pos-1, scaled as llama.cpp's
    ggml_rope_ext scales them (frequency factors, linear scaling, YaRN)."""
    n_pos = n_pos or cfg.max_pos
    D = cfg.head_dim
    i = np.arange(D // 2, dtype=np.float64)
    inv = cfg.rope_base ** (-2 * i / D)
    factors = getattr(cfg, "rope_freq_factors", None)
    if factors is not None:
        inv = inv / np.asarray(factors, np.float64)
    scale, ext = getattr(cfg, "rope_scale", 1.0), getattr(cfg, "rope_ext", 0.0)
    mscale = getattr(cfg, "rope_attn", 1.0)
    if ext != 0.0:
        # YaRN: pairs that turn fast (i below the corrected dims) keep their angle, slow ones are
        # interpolated, a linear ramp between; the magnitude grows with log(factor)
        low, high = yarn_corr_dims(D, cfg.rope_orig_ctx or cfg.max_pos, cfg.rope_base, 32.0, 1.0)
        keep = (1 - np.clip((i - low) / max(0.001, high - low), 0, 1)) * ext
        inv = scale * inv * (1 - keep) + inv * keep
        if scale < 1.0:   # a factor <= 1 leaves the magnitude alone, as llama.cpp since PR #17945
            mscale *= 1 + 0.1 * np.log(1 / scale)
    else:
        inv = scale * inv
    ang = np.arange(n_pos, dtype=np.float64)[:, None] * inv[None, :]
    return (mscale * np.cos(ang)).astype(np.float32), (mscale * np.sin(ang)).astype(np.float32)


def yarn_corr_dims(n_dims: int, n_ctx_orig: int, base: float, beta_fast: float, beta_slow: float):
    """The pair indices between which YaRN ramps from extrapolation to interpolation (ggml's corr dims):
    where a pair turns beta times over the original context."""
    dim = lambda beta: n_dims * np.log(n_ctx_orig / (beta * 2 * np.pi)) / (2 * np.log(base))
    return max(0.0, float(np.floor(dim(beta_fast)))), min(n_dims - 1.0, float(np.ceil(dim(beta_slow))))


def rope(x, pos, cos, sin, neox: bool = False):
    """x [..., n, heads, head_dim] rotated by positions pos [n] (adjacent pairs, or halves if neox)."""
    c = cos[pos][:, None, :]
    s = sin[pos][:, None, :]
    h = x.shape[-1] // 2
    i0, i1 = (slice(0, h), slice(h, None)) if neox else (slice(0, None, 2), slice(1, None, 2))
    x0, x1 = x[..., i0], x[..., i1]
    out = np.empty_like(x)
    out[..., i0] = x0 * c - x1 * s
    out[..., i1] = x0 * s + x1 * c
    return out


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def attention(q, k, v, qpos=None, kpos=None, causal=True):
    """Grouped-query attention. q [n, H, D], k/v [m, KH, D] (already rotated).
    Query i sees key j when kpos[j] <= qpos[i] (causal). Returns (out [n, H, D], probs [n, H, m])."""
    n, H, D = q.shape
    m, KH, _ = k.shape
    g = H // KH
    kk = np.repeat(k, g, axis=1)  # [m, H, D]
    vv = np.repeat(v, g, axis=1)
    s = np.einsum("nhd,mhd->nhm", q, kk) / np.sqrt(D)
    if causal:
        qpos = np.arange(m - n, m) if qpos is None else np.asarray(qpos)
        kpos = np.arange(m) if kpos is None else np.asarray(kpos)
        s = np.where(kpos[None, None, :] <= qpos[:, None, None], s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nhm,mhd->nhd", p, vv), p


def forward(cfg, w, ids):
    """Logits [n, vocab] for token ids [n] with a full causal cache (no eviction)."""
    ids = np.asarray(ids)
    n = len(ids)
    cos, sin = rope_tables(cfg, n)
    pos = np.arange(n)
    x = w["token_embd.weight"][ids]
    H, KH, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    for l in range(cfg.n_layers):
        p = f"blk.{l}."
        h = rmsnorm(x, w[p + "attn_norm.weight"], cfg.eps)
        b = (lambda name: w[p + f"attn_{name}.bias"]) if getattr(cfg, "qkv_bias", False) else (lambda name: 0)
        q = (h @ w[p + "attn_q.weight"].T + b("q")).reshape(n, H, D)
        k = (h @ w[p + "attn_k.weight"].T + b("k")).reshape(n, KH, D)
        v = (h @ w[p + "attn_v.weight"].T + b("v")).reshape(n, KH, D)
        neox = getattr(cfg, "rope_neox", False)
        q, k = rope(q, pos, cos, sin, neox), rope(k, pos, cos, sin, neox)
        o, _ = attention(q, k, v)
        x = x + o.reshape(n, H * D) @ w[p + "attn_output.weight"].T
        h = rmsnorm(x, w[p + "ffn_norm.weight"], cfg.eps)
        gate = h @ w[p + "ffn_gate.weight"].T
        up = h @ w[p + "ffn_up.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * up) @ w[p + "ffn_down.weight"].T
    x = rmsnorm(x, w["output_norm.weight"], cfg.eps)
    head = w.get("output.weight", w["token_embd.weight"])  # tied embeddings
    return x @ head.T
