"""Quantized weights for the decoder and our own dequantizing matmul kernels (TIR).

Two formats, both with groups of 32 along the input (reduction) axis, as in the GGUF:

* ``q8``: int8 values with one fp32 scale per group and output column (w = s * q). The layer
  weights are re-quantized from the fp32 values dequantized from the GGUF's Q4_1 blocks
  (round to nearest, scale = max|w| / 127: a small extra error); the tied embedding / head is
  the GGUF's own Q8_0, taken exactly.
* ``q4``: the GGUF's own Q4_1 blocks, taken exactly (w = d * q + m, q in 0..15, fp16 d and m
  widened to fp32): the same weight values llama.cpp computes with. The head stays Q8_0 (q8).

Layout: a weight W [out N, in K] (GGUF order) becomes column strips of TJ = 32 outputs, each
strip contiguous in memory: values [N/TJ, K, TJ] (q8) or [N/TJ, K/2, TJ] with two 4-bit values
per byte, k even in the low nibble, k odd in the high one (q4); scales (and q4 mins)
[N/TJ, K/32, TJ]. The kernel runs strips in parallel; in a strip it keeps TJ accumulators in
vector registers, converts the integers to fp32 in the inner loop, and applies the group scale
once per group (q4: acc += d * sum(x q) + m * sum(x)). One kernel serves decode (n = 1) and
prefill chunks (n tokens, the strip stays in cache across them).

Scratch buffers are allocated in the default ("global") scope: TVM's LowerTVMBuiltin puts small
constant-size global allocations on the stack (LLVM then keeps them in registers), while
"local" scope becomes a TVMBackendAllocWorkspace call per loop iteration on CPU.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

G = 32  # group size along the input axis (the GGUF block size)
TJ = 32  # outputs per strip
FORMATS = ("fp32", "q8", "q4")


# ------------------------------------------------------------------ packing (numpy, offline)
def _strips(a: np.ndarray) -> np.ndarray:
    """[N, X] -> [N/TJ, X, TJ] contiguous."""
    N, X = a.shape
    return np.ascontiguousarray(a.reshape(N // TJ, TJ, X).transpose(0, 2, 1))


def quantize_q8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 W [N, K] -> (int8 [N/TJ, K, TJ], fp32 scales [N/TJ, K/G, TJ]); symmetric, per group."""
    N, K = w.shape
    g = w.reshape(N, K // G, G).astype(np.float32)
    s = np.abs(g).max(-1) / 127.0
    q = np.round(g / np.where(s == 0, 1, s)[..., None]).clip(-127, 127).astype(np.int8)
    return _strips(q.reshape(N, K)), _strips(s.astype(np.float32))


def _unstrips(w: np.ndarray) -> np.ndarray:
    """[N/TJ, K, TJ] (any shape that reshapes to it) -> [N, K]."""
    NB, K = w.shape[0], w.size // (w.shape[0] * TJ)
    return w.reshape(NB, K, TJ).transpose(0, 2, 1).reshape(NB * TJ, K)


def dequantize_q8(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Inverse of the packing: W [N, K] fp32."""
    NB, K, _ = q.shape
    return _unstrips(q.astype(np.float32).reshape(NB, K // G, G, TJ) * s[:, :, None, :])


def from_gguf_q8_0(raw: np.ndarray, N: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q8_0 blocks (uint8 [N, K/32*34]: fp16 d, 32 x int8) -> the q8 packing, exactly."""
    b = np.ascontiguousarray(raw).reshape(N, K // 32, 34)
    d = b[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = b[:, :, 2:].copy().view(np.int8).reshape(N, K)
    return _strips(q), _strips(d)


def from_gguf_q4_1(raw: np.ndarray, N: int, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_1 blocks (uint8 [N, K/32*20]: fp16 d, fp16 m, 16 bytes; element j in the low nibble
    of byte j, element j+16 in the high one) -> (packed uint8 [N/TJ, K/2, TJ], d, m [N/TJ, K/G, TJ])."""
    b = np.ascontiguousarray(raw).reshape(N, K // 32, 20)
    d = b[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = b[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = b[:, :, 4:]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(N, K)  # 0..15 in element order
    return pack_q4(q), _strips(d), _strips(m)


def pack_q4(q: np.ndarray) -> np.ndarray:
    """uint8 values 0..15, [N, K] -> [N/TJ, K/2, TJ], k even low nibble, k odd high nibble."""
    qs = _strips(q.astype(np.uint8))  # [NB, K, TJ]
    return np.ascontiguousarray(qs[:, 0::2, :] | (qs[:, 1::2, :] << 4))


def quantize_q4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fp32 W [N, K] -> Q4_1-style asymmetric 4-bit groups (used in tests; the model takes the GGUF's)."""
    N, K = w.shape
    g = w.reshape(N, K // G, G).astype(np.float32)
    lo, hi = g.min(-1), g.max(-1)
    d = (hi - lo) / 15.0
    q = np.round((g - lo[..., None]) / np.where(d == 0, 1, d)[..., None]).clip(0, 15).astype(np.uint8)
    return pack_q4(q.reshape(N, K)), _strips(d), _strips(lo)


def dequantize_q4(p: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    NB, K2, _ = p.shape
    q = np.empty((NB, 2 * K2, TJ), np.float32)
    q[:, 0::2, :] = p & 15
    q[:, 1::2, :] = p >> 4
    K = 2 * K2
    return _unstrips(q.reshape(NB, K // G, G, TJ) * d[:, :, None, :] + m[:, :, None, :])


# ------------------------------------------------------------------ kernels (TIR)
def make_matmul(K: int, N: int, fmt: str):
    """y [n, N] = x [n, K] @ W.T for a packed W; a PrimFunc taking (x, *packed, y)."""
    assert K % G == 0 and N % TJ == 0, (K, N)
    NB, KG = N // TJ, K // G
    if fmt == "q8":
        @T.prim_func
        def matmul_q8(x_h: T.handle, w_h: T.handle, s_h: T.handle, y_h: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            n = T.int64()
            X = T.match_buffer(x_h, (n, K), "float32")
            W = T.match_buffer(w_h, (NB, K, TJ), "int8")
            S = T.match_buffer(s_h, (NB, KG, TJ), "float32")
            Y = T.match_buffer(y_h, (n, N), "float32")
            for nb in T.parallel(NB):
                acc = T.alloc_buffer((TJ,), "float32")
                part = T.alloc_buffer((TJ,), "float32")
                for t in range(n):
                    for j in T.vectorized(TJ):
                        acc[j] = T.float32(0)
                    for g in range(KG):
                        for j in T.vectorized(TJ):
                            part[j] = T.float32(0)
                        for kk in T.unroll(G):
                            for j in T.vectorized(TJ):
                                part[j] = part[j] + X[t, g * G + kk] * T.Cast("float32", W[nb, g * G + kk, j])
                        for j in T.vectorized(TJ):
                            acc[j] = acc[j] + part[j] * S[nb, g, j]
                    for j in T.vectorized(TJ):
                        Y[t, nb * TJ + j] = acc[j]

        return matmul_q8
    if fmt == "q4":
        G2 = G // 2

        @T.prim_func
        def matmul_q4(x_h: T.handle, w_h: T.handle, d_h: T.handle, m_h: T.handle, y_h: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            n = T.int64()
            X = T.match_buffer(x_h, (n, K), "float32")
            W = T.match_buffer(w_h, (NB, K // 2, TJ), "uint8")
            D = T.match_buffer(d_h, (NB, KG, TJ), "float32")
            M = T.match_buffer(m_h, (NB, KG, TJ), "float32")
            Y = T.match_buffer(y_h, (n, N), "float32")
            for nb in T.parallel(NB):
                acc = T.alloc_buffer((TJ,), "float32")
                part = T.alloc_buffer((TJ,), "float32")
                xs = T.alloc_buffer((1,), "float32")
                for t in range(n):
                    for j in T.vectorized(TJ):
                        acc[j] = T.float32(0)
                    for g in range(KG):
                        xs[0] = T.float32(0)
                        for kk in range(G):
                            xs[0] = xs[0] + X[t, g * G + kk]
                        for j in T.vectorized(TJ):
                            part[j] = T.float32(0)
                        for kk in T.unroll(G2):
                            # 8 lanes at a time: one zero-extending load of 8 bytes into int32 lanes,
                            # then the low and high nibbles (1.6x faster here than masking 32 bytes
                            # first, which LLVM lowered to cross-lane shuffles).
                            for jo in T.unroll(TJ // 8):
                                for j in T.vectorized(8):
                                    part[jo * 8 + j] = (
                                        part[jo * 8 + j]
                                        + X[t, g * G + 2 * kk]
                                        * T.Cast("float32", T.Cast("int32", W[nb, g * G2 + kk, jo * 8 + j]) & 15)
                                        + X[t, g * G + 2 * kk + 1]
                                        * T.Cast("float32", T.Cast("int32", W[nb, g * G2 + kk, jo * 8 + j]) >> 4))
                        for j in T.vectorized(TJ):
                            acc[j] = acc[j] + part[j] * D[nb, g, j] + M[nb, g, j] * xs[0]
                    for j in T.vectorized(TJ):
                        Y[t, nb * TJ + j] = acc[j]

        return matmul_q4
    raise ValueError(f"unknown weight format {fmt!r}; use one of {', '.join(FORMATS)}")


def pack(w: np.ndarray, fmt: str) -> tuple[np.ndarray, ...]:
    """fp32 W [N, K] -> the arrays `make_matmul(K, N, fmt)` takes after x."""
    if fmt == "q8":
        return quantize_q8(w)
    if fmt == "q4":
        return quantize_q4(w)
    raise ValueError(fmt)


def unpack(arrays, fmt: str) -> np.ndarray:
    return dequantize_q8(*arrays) if fmt == "q8" else dequantize_q4(*arrays)
