"""Quantized weights for the decoder and our own dequantizing matmul kernels (TIR).

Kernel formats (groups along the input (reduction) axis, as in the GGUF): ``q8`` (int8, one fp32
scale per 32), ``q8_16`` (the same kernel with groups of 16: Q6_K), ``q8m_16`` (int8 with a scale
and a min per 16: w = s q + m, which holds Q4_K and Q6_K alike, for roles that mix them),
``q4`` (w = d q + m per 32) and ``q4s`` (w = d (q - 8) per 32: Q4_0 without a stored min, 20 bytes
per 32 weights against q4's 24, fewer bytes for decoding to read). `EXACT` lists which GGUF types
each holds exactly and `gguf_rows` decodes a type's blocks into them (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K,
Q6_K, F16/F32/BF16). The two original formats, as the uniform --weights q8 / q4 modes use them:

* ``q8``: int8 values with one fp32 scale per group and output column (w = s * q). The layer
  weights are re-quantized from the fp32 values dequantized from the GGUF's Q4_1 blocks
  (round to nearest, scale = max|w| / 127: a small extra error); the tied embedding / head is
  the GGUF's own Q8_0, taken exactly.
* ``q4``: the GGUF's own Q4_1 blocks, taken exactly (w = d * q + m, q in 0..15, fp16 d and m
  widened to fp32): the same weight values llama.cpp computes with. The head stays Q8_0 (q8).

Layout: a weight W [out N, in K] (GGUF order) becomes column strips of TJ = 32 outputs, each
strip contiguous in memory: values [N/TJ, K, TJ] (q8) or [N/TJ, K/2, TJ] with two 4-bit values
per byte, k even in the low nibble, k odd in the high one (q4, q4s); scales (and q4 mins)
[N/TJ, K/32, TJ]. The kernel runs strips in parallel; in a strip it keeps TJ accumulators in
vector registers, converts the integers to fp32 in the inner loop, and applies the group scale
once per group (q4: acc += d * sum(x q) + m * sum(x); q4s: acc += d * (sum(x q) - 8 sum(x))).
One kernel serves decode (n = 1) and prefill chunks (n tokens, the strip stays in cache across them).

Scratch buffers are allocated in the default ("global") scope: TVM's LowerTVMBuiltin puts small
constant-size global allocations on the stack (LLVM then keeps them in registers), while
"local" scope becomes a TVMBackendAllocWorkspace call per loop iteration on CPU.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

G = 32  # group size along the input axis (the GGUF block size)
TJ = 32  # outputs per strip
FORMATS = ("native", "fp32", "q8", "q4")  # --weights: how the layers' matmul weights are held
# per role: fp32, int8 groups of 32 or 16 (w = s q), 4-bit groups of 32 (w = d q + m), symmetric 4-bit groups
# of 32 (w = d (q - 8): Q4_0), and int8 groups of 16 with a min (w = s q + m: holds Q4_K and Q6_K layers alike,
# for a role that mixes them as Q4_K_M does)
# and 5-bit groups of 32 (w = d q + m, q 0..31: q4's nibbles plus a plane of high bits; Q5_0, Q5_1, Q5_K)
KERNEL_FORMATS = ("fp32", "q8", "q8_16", "q4", "q4s", "q8m_16", "q5")
ROLES = ("qkv", "o", "gu", "down", "head", "embed")  # q/k/v, attn_output, ffn gate+up, ffn_down, head, embedding


def group_of(fmt: str) -> int:
    """Elements per scale along the input axis for a kernel format."""
    return 16 if fmt in ("q8_16", "q8m_16") else G


def n_params(fmt: str) -> int:
    """Arrays a weight of this kernel format is held in."""
    return {"fp32": 1, "q8": 2, "q8_16": 2, "q4": 3, "q4s": 2, "q8m_16": 3, "q5": 4}[fmt]


def role_formats(weights) -> dict:
    """{role: kernel format} for a --weights mode name (the formats before a file is seen: the old
    uniform modes) or an already resolved dict. q4 keeps the head in q8 (the GGUF's Q8_0)."""
    if isinstance(weights, dict):
        return dict(weights)
    if weights == "fp32":
        return {r: "fp32" for r in ROLES}
    if weights == "q8":
        return {r: "q8" for r in ROLES}
    if weights == "q4":
        return {**{r: "q4" for r in ROLES}, "head": "q8", "embed": "q8"}
    raise ValueError(f"unknown weight format {weights!r}")


def weight_bytes(K: int, N: int, fmt: str) -> int:
    g = group_of(fmt)
    return {"fp32": 4 * K * N, "q8": K * N + 4 * (K // g) * N, "q8_16": K * N + 4 * (K // g) * N,
            "q4": K * N // 2 + 8 * (K // g) * N, "q4s": K * N // 2 + 4 * (K // g) * N,
            "q8m_16": K * N + 8 * (K // g) * N, "q5": K * N // 2 + K * N // 8 + 8 * (K // g) * N}[fmt]


# ------------------------------------------------------------------ packing (numpy, offline)
def _strips(a: np.ndarray) -> np.ndarray:
    """[N, X] -> [N/TJ, X, TJ] contiguous."""
    N, X = a.shape
    return np.ascontiguousarray(a.reshape(N // TJ, TJ, X).transpose(0, 2, 1))


def quantize_q8(w: np.ndarray, G: int = G) -> tuple[np.ndarray, np.ndarray]:
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
    KG = s.shape[1]
    return _unstrips(q.astype(np.float32).reshape(NB, KG, K // KG, TJ) * s[:, :, None, :])


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


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [...] fp32 (the fp16 they hold)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes of a 32-element block (element j low nibble of byte j, j+16 high) -> [..., 32]."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def gguf_q4_0(raw, N, K):
    """Q4_0 (fp16 d, 16 bytes; w = d (q - 8)) -> (q 0..15 [N, K] uint8, d [N, K/32], m = -8d)."""
    b = np.ascontiguousarray(raw).reshape(N, K // 32, 18)
    d = _f16(b[:, :, 0:2])
    return _nibbles32(b[:, :, 2:]).reshape(N, K), d, d * np.float32(-8)


def gguf_q5_0(raw, N, K):
    """Q5_0 (fp16 d, 32 high bits, 16 bytes; w = d (q - 16)) -> (int8 q - 16 [N, K], d [N, K/32])."""
    b = np.ascontiguousarray(raw).reshape(N, K // 32, 22)
    d = _f16(b[:, :, 0:2])
    qh = b[:, :, 2:6].copy().view(np.uint32)  # [N, K/32, 1]
    hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # [N, K/32, 32]
    q = (_nibbles32(b[:, :, 6:]) | (hi << 4)).astype(np.int16) - 16
    return q.astype(np.int8).reshape(N, K), d


def gguf_q4_k(raw, N, K):
    """Q4_K super-blocks of 256 (fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes) ->
    (q 0..15 [N, K], d*sc [N, K/32], -dmin*min [N, K/32]), the products in fp32 as llama.cpp forms them."""
    from gguf.quants import Q4_K

    b = np.ascontiguousarray(raw).reshape(N * (K // 256), 144)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = Q4_K.get_scale_min(b[:, 4:16].copy())
    qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 15).reshape(N, K)
    ds = (d[:, None] * sc.astype(np.float32)).reshape(N, K // 32)
    ms = -(dmin[:, None] * mn.astype(np.float32)).reshape(N, K // 32)
    return q, ds, ms


def gguf_q6_k(raw, N, K):
    """Q6_K super-blocks of 256 (128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales, fp16 d)
    -> (int8 q - 32 [N, K], d*sc [N, K/16]) for the q8 kernel with groups of 16."""
    b = np.ascontiguousarray(raw).reshape(N * (K // 256), 210)
    ql = b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 15).reshape(-1, 8, 32)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 3).reshape(-1, 8, 32)
    q = ((ql | (qh << 4)).astype(np.int16) - 32).astype(np.int8).reshape(N, K)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    return q, (d[:, None] * sc).reshape(N, K // 16)


def gguf_q5_1(raw, N, K):
    """Q5_1 (fp16 d, fp16 m, 32 high bits, 16 bytes; w = d q + m) -> (q 0..31 [N, K], d, m [N, K/32])."""
    b = np.ascontiguousarray(raw).reshape(N, K // 32, 24)
    qh = b[:, :, 4:8].copy().view(np.uint32)
    hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    return (_nibbles32(b[:, :, 8:]) | (hi << 4)).reshape(N, K), _f16(b[:, :, 0:2]), _f16(b[:, :, 2:4])


def gguf_q5_k(raw, N, K):
    """Q5_K super-blocks of 256 (fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 32 bytes of high bits,
    128 bytes of nibbles; w = d sc q - dmin min) -> (q 0..31 [N, K], d*sc, -dmin*min [N, K/32])."""
    from gguf.quants import Q4_K

    b = np.ascontiguousarray(raw).reshape(N * (K // 256), 176)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = Q4_K.get_scale_min(b[:, 4:16].copy())
    ql = (b[:, 48:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15
    qh = (b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = (ql.reshape(-1, 8, 32) | (qh << 4)).reshape(N, K)
    return q, (d[:, None] * sc.astype(np.float32)).reshape(N, K // 32), \
        -(dmin[:, None] * mn.astype(np.float32)).reshape(N, K // 32)


def gguf_q2_k(raw, N, K):
    """Q2_K super-blocks of 256 (16 bytes of 4-bit scale/min pairs, 64 bytes of 2-bit quants, fp16 d, dmin;
    w = d sc q - dmin min per 16) -> (q 0..3 [N, K], d*sc, -dmin*min [N, K/16])."""
    b = np.ascontiguousarray(raw).reshape(N * (K // 256), 84)
    scales, d, dmin = b[:, :16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    q = (b[:, 16:80].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    return q.reshape(N, K), (d[:, None] * (scales & 15).astype(np.float32)).reshape(N, K // 16), \
        -(dmin[:, None] * (scales >> 4).astype(np.float32)).reshape(N, K // 16)


def gguf_q3_k(raw, N, K):
    """Q3_K super-blocks of 256 (32 bytes of high-bit masks, 64 bytes of 2-bit quants, 12 bytes of 6-bit
    signed scales, fp16 d; w = d (sc - 32) (q - 4 if the mask bit is 0)) -> (int8 q -4..3 [N, K], d*sc [N, K/16])."""
    b = np.ascontiguousarray(raw).reshape(N * (K // 256), 110)
    hmask, qs, sb, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    lo = (sb[:, :8].reshape(-1, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(-1, 16) & 15
    hi = (sb[:, 8:].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(-1, 16) & 3
    sc = (lo | (hi << 4)).astype(np.int8) - np.int8(32)
    ql = ((qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(-1, 256)
    qh = ((hmask.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(-1, 256)
    q = ql.astype(np.int8) - ((qh ^ 1) << 2).astype(np.int8)
    return q.reshape(N, K), (d[:, None] * sc.astype(np.float32)).reshape(N, K // 16)


IQ4_NL_VALUES = np.array((-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113), np.int8)


def gguf_iq4_nl(raw, N, K):
    """IQ4_NL (fp16 d, 16 bytes of indices into a fixed non-linear int8 table; w = d table[q]) ->
    (int8 table values [N, K], d [N, K/32]): llama.cpp's fallback for K-quants on rows not a multiple of 256."""
    b = np.ascontiguousarray(raw).reshape(N, K // 32, 18)
    return IQ4_NL_VALUES[_nibbles32(b[:, :, 2:])].reshape(N, K), _f16(b[:, :, 0:2])


def gguf_iq4_xs(raw, N, K):
    """IQ4_XS super-blocks of 256 (fp16 d, 2 + 4 bytes of 6-bit signed scales, 128 bytes of table indices;
    w = d (sc - 32) table[q] per 32) -> (int8 table values [N, K], d*sc [N, K/32])."""
    b = np.ascontiguousarray(raw).reshape(N * (K // 256), 136)
    d, hi = _f16(b[:, 0:2]), b[:, 2:4].copy().view(np.uint16)
    lo = (b[:, 4:8].reshape(-1, 4, 1) >> np.array([0, 4], np.uint8).reshape(1, 1, 2)).reshape(-1, 8) & 15
    hi = ((hi >> np.arange(0, 16, 2, dtype=np.uint16)) & 3).astype(np.uint8)
    sc = (lo | (hi << 4)).astype(np.int8) - np.int8(32)
    q = IQ4_NL_VALUES[_nibbles32(b[:, 8:].reshape(-1, 8, 16))]
    return q.reshape(N, K), (d[:, None] * sc.astype(np.float32)).reshape(N, K // 32)


def _split_groups(s: np.ndarray, times: int) -> np.ndarray:
    """Scales per group of g -> per group of g/times (each repeated)."""
    return np.repeat(s, times, axis=1)


# GGUF tensor type -> kernel formats that hold its values exactly (preferred first: fewer bytes)
EXACT = {"F32": ("fp32",), "F16": ("fp32",), "BF16": ("fp32",), "Q4_0": ("q4s", "q4", "q8", "q8_16", "q8m_16"),
         "Q4_1": ("q4", "q8m_16"), "Q4_K": ("q4", "q8m_16"), "Q5_0": ("q5", "q8", "q8_16", "q8m_16"),
         "Q8_0": ("q8", "q8_16", "q8m_16"), "Q6_K": ("q8_16", "q8m_16"), "Q3_K": ("q8_16", "q8m_16"),
         # 5-bit and 2-bit quants with a min per group: int8 values with scale and min per 16
         "Q5_1": ("q5", "q8m_16"), "Q5_K": ("q5", "q8m_16"), "Q2_K": ("q8m_16",),
         # non-linear 4-bit: the table's values are int8, so int8 with a scale per 32
         "IQ4_NL": ("q8", "q8_16", "q8m_16"), "IQ4_XS": ("q8", "q8_16", "q8m_16")}
BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q2_K": 256, "Q3_K": 256, "Q4_K": 256,
         "Q5_K": 256, "Q6_K": 256, "IQ4_NL": 32, "IQ4_XS": 256}
_WITH_MIN = {"Q5_1": (gguf_q5_1, 2), "Q5_K": (gguf_q5_k, 2), "Q2_K": (gguf_q2_k, 1)}  # decoder, groups per 32 / 16


def gguf_rows(type_name: str, raw, N: int, K: int, fmt: str) -> list:
    """The raw blocks of a GGUF tensor [N, K] (a type in EXACT with fmt among its formats) decoded
    row-major for kernel format fmt: fp32 [W [N, K]]; q8/q8_16 [int8 q [N, K], scales [N, K/g]];
    q4 [q 0..15 [N, K], d, m [N, K/32]]; q4s [q 0..15 [N, K], d [N, K/32]]. Exactly the values
    gguf.quants.dequantize gives."""
    if fmt not in EXACT.get(type_name, ()):
        raise ValueError(f"{type_name} is not exact in {fmt}")
    if fmt == "q8m_16" and type_name in _WITH_MIN:
        decode, times = _WITH_MIN[type_name]
        q, sc, mn = decode(raw, N, K)
        return [q.astype(np.int8), _split_groups(sc, times), _split_groups(mn, times)]
    if fmt == "q5":   # q 0..31, d and m per 32
        if type_name == "Q5_0":
            q8, d = gguf_q5_0(raw, N, K)
            return [(q8.astype(np.int16) + 16).astype(np.uint8), d, d * np.float32(-16)]
        return list(_WITH_MIN[type_name][0](raw, N, K))
    if fmt == "q8m_16":  # int8 q, scale and min per 16, from the type's own exact format
        base = next(f for f in EXACT[type_name] if f != "q5")
        r = gguf_rows(type_name, raw, N, K, base)
        if base == "q4":  # q 0..15, d and m per 32
            return [r[0].astype(np.int8), _split_groups(r[1], 2), _split_groups(r[2], 2)]
        if base == "q4s":  # q 0..15 and d per 32: the offset moves into the int8 values, as in q8
            s = _split_groups(r[1], 2)
            return [r[0].astype(np.int8) - 8, s, np.zeros_like(s)]
        s = r[1] if base == "q8_16" else _split_groups(r[1], 2)
        return [r[0], s, np.zeros_like(s)]
    if fmt == "fp32":
        a = _bf16(raw) if type_name == "BF16" else np.asarray(raw, dtype=np.float32)
        return [a.reshape(N, K)]
    if type_name == "Q4_1":
        b = np.ascontiguousarray(raw).reshape(N, K // 32, 20)
        return [_nibbles32(b[:, :, 4:]).reshape(N, K), _f16(b[:, :, 0:2]), _f16(b[:, :, 2:4])]
    if type_name == "Q4_K":
        return list(gguf_q4_k(raw, N, K))
    if type_name == "Q4_0":
        q, d, m = gguf_q4_0(raw, N, K)
        if fmt == "q4":
            return [q, d, m]
        if fmt == "q4s":
            return [q, d]
        q8, s = (q.astype(np.int8) - 8), d
    elif type_name == "Q8_0":
        b = np.ascontiguousarray(raw).reshape(N, K // 32, 34)
        q8, s = b[:, :, 2:].copy().view(np.int8).reshape(N, K), _f16(b[:, :, :2])
    elif type_name == "Q5_0":
        q8, s = gguf_q5_0(raw, N, K)
    elif type_name == "IQ4_NL":
        q8, s = gguf_iq4_nl(raw, N, K)
    elif type_name == "IQ4_XS":
        q8, s = gguf_iq4_xs(raw, N, K)
    elif type_name == "Q3_K":
        return list(gguf_q3_k(raw, N, K))
    else:  # Q6_K
        return list(gguf_q6_k(raw, N, K))
    return [q8, _split_groups(s, 2) if fmt == "q8_16" else s]


def strip_rows(rows: list, fmt: str) -> list:
    """Row-major arrays (gguf_rows, stacked along N) -> the arrays `make_matmul(K, N, fmt)` takes."""
    if fmt == "fp32":
        return [np.ascontiguousarray(rows[0].T, dtype=np.float32)]
    if fmt == "q4":
        return [pack_q4(rows[0]), _strips(rows[1].astype(np.float32)), _strips(rows[2].astype(np.float32))]
    if fmt == "q4s":
        return [pack_q4(rows[0]), _strips(rows[1].astype(np.float32))]
    if fmt == "q8m_16":
        return [_strips(rows[0].astype(np.int8)), _strips(rows[1].astype(np.float32)),
                _strips(rows[2].astype(np.float32))]
    if fmt == "q5":
        q = rows[0].astype(np.uint8)
        return [pack_q4(q & 15), pack_bits(q >> 4), _strips(rows[1].astype(np.float32)),
                _strips(rows[2].astype(np.float32))]
    return [_strips(rows[0].astype(np.int8)), _strips(rows[1].astype(np.float32))]


def from_gguf(type_name: str, raw, N: int, K: int, fmt: str) -> list:
    """A GGUF tensor's blocks packed for `make_matmul(K, N, fmt)`, exactly."""
    return strip_rows(gguf_rows(type_name, raw, N, K, fmt), fmt)


def _bf16(raw) -> np.ndarray:
    return (np.asarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def pack_q4(q: np.ndarray) -> np.ndarray:
    """uint8 values 0..15, [N, K] -> [N/TJ, K/2, TJ], k even low nibble, k odd high nibble."""
    qs = _strips(q.astype(np.uint8))  # [NB, K, TJ]
    return np.ascontiguousarray(qs[:, 0::2, :] | (qs[:, 1::2, :] << 4))


def pack_bits(b: np.ndarray) -> np.ndarray:
    """0/1 values [N, K] -> [N/TJ, K/8, TJ] uint8, element k in bit k % 8 of byte k // 8."""
    bs = _strips(b.astype(np.uint8)).reshape(b.shape[0] // TJ, b.shape[1] // 8, 8, TJ)
    return np.ascontiguousarray((bs << np.arange(8, dtype=np.uint8)[None, None, :, None]).sum(2, dtype=np.uint8))


def quantize_q5(w: np.ndarray) -> tuple[np.ndarray, ...]:
    """fp32 W [N, K] -> Q5_1-style asymmetric 5-bit groups of 32 (used in tests; the model takes the GGUF's)."""
    N, K = w.shape
    g = w.reshape(N, K // G, G).astype(np.float32)
    lo, hi = g.min(-1), g.max(-1)
    d = (hi - lo) / 31.0
    q = np.round((g - lo[..., None]) / np.where(d == 0, 1, d)[..., None]).clip(0, 31).astype(np.uint8).reshape(N, K)
    return pack_q4(q & 15), pack_bits(q >> 4), _strips(d), _strips(lo)


def dequantize_q5(p: np.ndarray, h: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    NB, K8, _ = h.shape
    bits = (h[:, :, None, :] >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1   # [NB, K/8, 8, TJ]
    q = _nibble_values(p) + 16 * bits.reshape(NB, K8 * 8 // G, G, TJ).astype(np.float32)
    return _unstrips(q * d[:, :, None, :] + m[:, :, None, :])


def quantize_q4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fp32 W [N, K] -> Q4_1-style asymmetric 4-bit groups (used in tests; the model takes the GGUF's)."""
    N, K = w.shape
    g = w.reshape(N, K // G, G).astype(np.float32)
    lo, hi = g.min(-1), g.max(-1)
    d = (hi - lo) / 15.0
    q = np.round((g - lo[..., None]) / np.where(d == 0, 1, d)[..., None]).clip(0, 15).astype(np.uint8)
    return pack_q4(q.reshape(N, K)), _strips(d), _strips(lo)


def quantize_q4s(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 W [N, K] -> Q4_0-style symmetric 4-bit groups (w = d (q - 8)), as llama.cpp's quantize_row_q4_0
    rounds: d = (the value of largest magnitude) / -8, so that value is exactly q = 0."""
    N, K = w.shape
    g = w.reshape(N, K // G, G).astype(np.float32)
    peak = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1)[..., 0]
    d = peak / -8.0
    q = np.floor(g / np.where(d == 0, 1, d)[..., None] + 8.5).clip(0, 15).astype(np.uint8)
    return pack_q4(q.reshape(N, K)), _strips(d.astype(np.float32))


def _nibble_values(p: np.ndarray) -> np.ndarray:
    """Packed [NB, K/2, TJ] -> q 0..15 as fp32 [NB, K/G, G, TJ]."""
    NB, K2, _ = p.shape
    q = np.empty((NB, 2 * K2, TJ), np.float32)
    q[:, 0::2, :] = p & 15
    q[:, 1::2, :] = p >> 4
    return q.reshape(NB, 2 * K2 // G, G, TJ)


def dequantize_q4(p: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    return _unstrips(_nibble_values(p) * d[:, :, None, :] + m[:, :, None, :])


def dequantize_q4s(p: np.ndarray, d: np.ndarray) -> np.ndarray:
    return _unstrips((_nibble_values(p) - 8) * d[:, :, None, :])


# ------------------------------------------------------------------ kernels (TIR)
def _bit4(h, b):
    """Bit b of byte h moved to bit 4 (16 or 0); h << 4 is shared by the byte's elements."""
    return ((h << 4) >> b) & 16


def make_matmul(K: int, N: int, fmt: str):
    """y [n, N] = x [n, K] @ W.T for a packed W; a PrimFunc taking (x, *packed, y)."""
    G = group_of(fmt)
    assert K % G == 0 and N % TJ == 0, (K, N)
    NB, KG = N // TJ, K // G
    if fmt in ("q8", "q8_16"):
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
    if fmt == "q8m_16":
        @T.prim_func
        def matmul_q8m(x_h: T.handle, w_h: T.handle, s_h: T.handle, m_h: T.handle, y_h: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            n = T.int64()
            X = T.match_buffer(x_h, (n, K), "float32")
            W = T.match_buffer(w_h, (NB, K, TJ), "int8")
            S = T.match_buffer(s_h, (NB, KG, TJ), "float32")
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
                        for kk in T.unroll(G):
                            for j in T.vectorized(TJ):
                                part[j] = part[j] + X[t, g * G + kk] * T.Cast("float32", W[nb, g * G + kk, j])
                        for j in T.vectorized(TJ):
                            acc[j] = acc[j] + part[j] * S[nb, g, j] + M[nb, g, j] * xs[0]
                    for j in T.vectorized(TJ):
                        Y[t, nb * TJ + j] = acc[j]

        return matmul_q8m
    if fmt == "q4":
        G2 = G // 2
        L = 16  # lanes per nibble load

        @T.prim_func
        def matmul_q4(x_h: T.handle, w_h: T.handle, d_h: T.handle, m_h: T.handle, y_h: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            n = T.int64()
            X = T.match_buffer(x_h, (n, K), "float32")
            W = T.match_buffer(w_h, (NB, K // 2, TJ), "uint8")
            D = T.match_buffer(d_h, (NB, KG, TJ), "float32")
            M = T.match_buffer(m_h, (NB, KG, TJ), "float32")
            Y = T.match_buffer(y_h, (n, N), "float32")
            # The group sums of x (for the mins) are shared by every strip: summed once per call.
            XS = T.alloc_buffer((n, KG), "float32")
            for t in range(n):
                for g in range(KG):
                    XS[t, g] = T.float32(0)
                    for kk in range(G):
                        XS[t, g] = XS[t, g] + X[t, g * G + kk]
            for nb in T.parallel(NB):
                acc = T.alloc_buffer((TJ,), "float32")
                part = T.alloc_buffer((TJ,), "float32")
                for t in range(n):
                    for j in T.vectorized(TJ):
                        acc[j] = T.float32(0)
                    for g in range(KG):
                        for j in T.vectorized(TJ):
                            part[j] = T.float32(0)
                        for kk in T.unroll(G2):
                            # L lanes at a time: one zero-extending load of L bytes into int32 lanes,
                            # then the low and high nibbles (8 lanes were 1.6x faster here than masking
                            # 32 bytes first, which LLVM lowered to cross-lane shuffles; 16 lanes faster
                            # again on this AVX-512 machine, split in two where vectors are narrower).
                            for jo in T.unroll(TJ // L):
                                for j in T.vectorized(L):
                                    part[jo * L + j] = (
                                        part[jo * L + j]
                                        + X[t, g * G + 2 * kk]
                                        * T.Cast("float32", T.Cast("int32", W[nb, g * G2 + kk, jo * L + j]) & 15)
                                        + X[t, g * G + 2 * kk + 1]
                                        * T.Cast("float32", T.Cast("int32", W[nb, g * G2 + kk, jo * L + j]) >> 4))
                        for j in T.vectorized(TJ):
                            acc[j] = acc[j] + part[j] * D[nb, g, j] + M[nb, g, j] * XS[t, g]
                    for j in T.vectorized(TJ):
                        Y[t, nb * TJ + j] = acc[j]

        return matmul_q4
    if fmt == "q4s":
        G2 = G // 2
        L = 16  # lanes per nibble load

        @T.prim_func
        def matmul_q4s(x_h: T.handle, w_h: T.handle, d_h: T.handle, y_h: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            n = T.int64()
            X = T.match_buffer(x_h, (n, K), "float32")
            W = T.match_buffer(w_h, (NB, K // 2, TJ), "uint8")
            D = T.match_buffer(d_h, (NB, KG, TJ), "float32")
            Y = T.match_buffer(y_h, (n, N), "float32")
            # The offset 8 costs one term per group, d * (sum(x q) - 8 sum(x)), not a subtraction per
            # weight; the group sums of x are shared by every strip, so they are summed once per call.
            XS = T.alloc_buffer((n, KG), "float32")
            for t in range(n):
                for g in range(KG):
                    XS[t, g] = T.float32(0)
                    for kk in range(G):
                        XS[t, g] = XS[t, g] + X[t, g * G + kk]
            for nb in T.parallel(NB):
                acc = T.alloc_buffer((TJ,), "float32")
                part = T.alloc_buffer((TJ,), "float32")
                for t in range(n):
                    for j in T.vectorized(TJ):
                        acc[j] = T.float32(0)
                    for g in range(KG):
                        for j in T.vectorized(TJ):
                            part[j] = T.float32(0)
                        # q4's zero-extending nibble loads, 16 lanes at a time: 1.2x faster than 8 on
                        # this machine (AVX-512; 2 x 8 lanes where vectors are narrower).
                        for kk in T.unroll(G2):
                            for jo in T.unroll(TJ // L):
                                for j in T.vectorized(L):
                                    part[jo * L + j] = (
                                        part[jo * L + j]
                                        + X[t, g * G + 2 * kk]
                                        * T.Cast("float32", T.Cast("int32", W[nb, g * G2 + kk, jo * L + j]) & 15)
                                        + X[t, g * G + 2 * kk + 1]
                                        * T.Cast("float32", T.Cast("int32", W[nb, g * G2 + kk, jo * L + j]) >> 4))
                        for j in T.vectorized(TJ):
                            acc[j] = acc[j] + (part[j] - T.float32(8) * XS[t, g]) * D[nb, g, j]
                    for j in T.vectorized(TJ):
                        Y[t, nb * TJ + j] = acc[j]

        return matmul_q4s
    if fmt == "q5":
        G2 = G // 2
        L = 16

        @T.prim_func
        def matmul_q5(x_h: T.handle, w_h: T.handle, h_h: T.handle, d_h: T.handle, m_h: T.handle, y_h: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            n = T.int64()
            X = T.match_buffer(x_h, (n, K), "float32")
            W = T.match_buffer(w_h, (NB, K // 2, TJ), "uint8")
            HB = T.match_buffer(h_h, (NB, K // 8, TJ), "uint8")
            D = T.match_buffer(d_h, (NB, KG, TJ), "float32")
            M = T.match_buffer(m_h, (NB, KG, TJ), "float32")
            Y = T.match_buffer(y_h, (n, N), "float32")
            XS = T.alloc_buffer((n, KG), "float32")
            for t in range(n):
                for g in range(KG):
                    XS[t, g] = T.float32(0)
                    for kk in range(G):
                        XS[t, g] = XS[t, g] + X[t, g * G + kk]
            for nb in T.parallel(NB):
                acc = T.alloc_buffer((TJ,), "float32")
                part = T.alloc_buffer((TJ,), "float32")
                for t in range(n):
                    for j in T.vectorized(TJ):
                        acc[j] = T.float32(0)
                    for g in range(KG):
                        for j in T.vectorized(TJ):
                            part[j] = T.float32(0)
                        # q4's nibble loads; each pair's two high bits come from the byte of bits that
                        # holds elements 8 (kk // 4) .. +7, at constant shifts once kk is unrolled
                        for kk in T.unroll(G2):
                            for jo in T.unroll(TJ // L):
                                for j in T.vectorized(L):
                                    part[jo * L + j] = (
                                        part[jo * L + j]
                                        + X[t, g * G + 2 * kk]
                                        * T.Cast("float32", (T.Cast("int32", W[nb, g * G2 + kk, jo * L + j]) & 15)
                                                 | _bit4(T.Cast("int32", HB[nb, g * 4 + kk // 4, jo * L + j]),
                                                         2 * (kk % 4)))
                                        + X[t, g * G + 2 * kk + 1]
                                        * T.Cast("float32", (T.Cast("int32", W[nb, g * G2 + kk, jo * L + j]) >> 4)
                                                 | _bit4(T.Cast("int32", HB[nb, g * 4 + kk // 4, jo * L + j]),
                                                         2 * (kk % 4) + 1)))
                        for j in T.vectorized(TJ):
                            acc[j] = acc[j] + part[j] * D[nb, g, j] + M[nb, g, j] * XS[t, g]
                    for j in T.vectorized(TJ):
                        Y[t, nb * TJ + j] = acc[j]

        return matmul_q5
    raise ValueError(f"unknown weight format {fmt!r}; use one of {', '.join(FORMATS)}")


def pack(w: np.ndarray, fmt: str) -> tuple[np.ndarray, ...]:
    """fp32 W [N, K] -> the arrays `make_matmul(K, N, fmt)` takes after x."""
    if fmt in ("q8", "q8_16"):
        return quantize_q8(w, group_of(fmt))
    if fmt == "q8m_16":
        q, s = quantize_q8(w, 16)
        return q, s, np.zeros_like(s)
    if fmt == "q4":
        return quantize_q4(w)
    if fmt == "q4s":
        return quantize_q4s(w)
    if fmt == "q5":
        return quantize_q5(w)
    if fmt == "fp32":
        return (np.ascontiguousarray(w.T, dtype=np.float32),)
    raise ValueError(fmt)


def unpack(arrays, fmt: str) -> np.ndarray:
    """W [N, K] fp32 from a kernel format's arrays."""
    if fmt == "fp32":
        return np.ascontiguousarray(arrays[0].T)
    if fmt == "q8m_16":
        q, s, m = arrays
        NB, K, _ = q.shape
        KG = s.shape[1]
        return _unstrips(q.astype(np.float32).reshape(NB, KG, K // KG, TJ) * s[:, :, None, :] + m[:, :, None, :])
    if fmt == "q4s":
        return dequantize_q4s(*arrays)
    if fmt == "q5":
        return dequantize_q5(*arrays)
    return dequantize_q8(*arrays) if fmt in ("q8", "q8_16") else dequantize_q4(*arrays)
