"""The KV cache policies of `kvcache.py` as TIR kernels, so that their state lives where the cache
does: on the board, updated by the board, with no round trip to the host per layer.

Each layer's state is its slots' original positions `pos` [cap] (int32, -1 free), their scores
`score` [cap] (float64: H2O's accumulated attention, TOVA's latest) and the RoPE positions `kpos`
[cap] the attention kernel rotates keys with. One `ctl` [8] (int32) is shared by all layers:
the position of the next token, the number of valid slots, the policy, its sinks and recent
window, the capacity. The policy is a run-time value, so one compiled library serves all five.

`kv_insert` places a chunk of n tokens (consecutive free slots while there is room, else one
token into the victim's slot) and returns each query's RoPE position and `meta` = [start,
n_valid], which the attention kernel reads; `kv_observe` scores the slots with the attention
weights; the step's last kernel (`greedy_tail`, `nll_tail`, `logits_tail`) advances `ctl`.
Ties and sums follow the numpy policies term by term (first index wins an argmin; H2O adds the
float32 sum over queries and heads to a float64 score; TOVA's mean is a float32 sum over heads
divided by their number), so both pick the same victims from the same weights: tested.

StreamingLLM's positions are the slots' ranks by original position. They are kept incrementally
(an eviction lowers the rank of every later token by one; a new token ranks last) instead of a
sort per step. H2O protects the `recent` latest tokens; because they are never evicted, they are
exactly positions p - recent .. p - 1 when the token at p arrives, which is the numpy policy's
sorted cutoff without the sort.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

POLICY_IDS = {"full": 0, "window": 1, "streaming": 2, "h2o": 3, "tova": 4}
# ctl fields
POS, NV, POLICY, SINKS, RECENT, CAP = range(6)
CTL_LEN = 8
# numpy's np.inf in the policies: a key that never wins an argmin (T.float64(x) would parse x as float32)
INF = tvm.tirx.const(1.0e308, "float64")

_FULL, _WINDOW, _STREAMING, _H2O, _TOVA = (POLICY_IDS[k] for k in ("full", "window", "streaming", "h2o", "tova"))


def _attrs():
    return {"tir.noalias": True, "tir.is_scheduled": True}


@T.prim_func
def kv_config(cfg_h: T.handle, ctl_h: T.handle):
    # cfg = [policy, sinks, recent, cap] (int64, from the alloc_state shape)
    T.func_attr(_attrs())
    CFG = T.match_buffer(cfg_h, (4,), "int64")
    CTL = T.match_buffer(ctl_h, (CTL_LEN,), "int32")
    for i in range(CTL_LEN):
        CTL[i] = 0
    CTL[POLICY] = T.Cast("int32", CFG[0])
    CTL[SINKS] = T.Cast("int32", CFG[1])
    CTL[RECENT] = T.Cast("int32", CFG[2])
    CTL[CAP] = T.Cast("int32", CFG[3])


@T.prim_func
def kv_insert(ctl_h: T.handle, pos_h: T.handle, score_h: T.handle, kpos_h: T.handle, qpos_h: T.handle,
              meta_h: T.handle):
    T.func_attr(_attrs())
    cap = T.int64()
    n = T.int64()
    CTL = T.match_buffer(ctl_h, (CTL_LEN,), "int32")
    POSS = T.match_buffer(pos_h, (cap,), "int32")
    SCORE = T.match_buffer(score_h, (cap,), "float64")
    KPOS = T.match_buffer(kpos_h, (cap,), "int32")
    QPOS = T.match_buffer(qpos_h, (n,), "int32")
    META = T.match_buffer(meta_h, (2,), "int32")
    best = T.alloc_buffer((1,), "float64")
    arg = T.alloc_buffer((1,), "int32")
    p = T.bind(CTL[POS])
    nv = T.bind(CTL[NV])
    pol = T.bind(CTL[POLICY])
    sinks = T.bind(CTL[SINKS])
    recent = T.bind(CTL[RECENT])
    n32 = T.bind(T.Cast("int32", n))
    cap32 = T.bind(T.Cast("int32", cap))
    if nv + n32 <= cap32:
        # room: consecutive free slots; a token that never saw an eviction ranks by its slot
        for t in range(n):
            slot = T.bind(nv + T.Cast("int32", t))
            POSS[slot] = p + T.Cast("int32", t)
            SCORE[slot] = T.if_then_else(pol == _TOVA, INF, T.float64(0))
            KPOS[slot] = T.if_then_else(pol == _STREAMING, slot, p + T.Cast("int32", t))
        META[0] = nv
        META[1] = nv + n32
    else:
        # full (n == 1: the host feeds one token at a time once the cache is full): evict
        best[0] = INF
        arg[0] = 0
        for j in range(cap):
            pj = T.bind(POSS[j])
            key = T.bind(T.if_then_else(
                pol == _STREAMING, T.if_then_else(pj >= sinks, T.Cast("float64", pj), INF),
                T.if_then_else(pol == _H2O, T.if_then_else(pj >= p - recent, INF, SCORE[j]),
                               T.if_then_else(pol == _TOVA, SCORE[j], T.Cast("float64", pj)))))
            if key < best[0]:
                best[0] = key
                arg[0] = T.Cast("int32", j)
        v = T.bind(arg[0])
        vpos = T.bind(POSS[v])
        if pol == _STREAMING:
            for j in range(cap):
                if POSS[j] > vpos:
                    KPOS[j] = KPOS[j] - 1
        POSS[v] = p
        SCORE[v] = T.if_then_else(pol == _TOVA, INF, T.float64(0))
        KPOS[v] = T.if_then_else(pol == _STREAMING, cap32 - 1, p)
        META[0] = v
        META[1] = cap32
    for t in range(n):
        QPOS[t] = KPOS[META[0] + T.Cast("int32", t)]


def make_kv_observe(n_heads: int):
    H = n_heads

    @T.prim_func
    def kv_observe(ctl_h: T.handle, meta_h: T.handle, p_h: T.handle, score_h: T.handle):
        T.func_attr(_attrs())
        cap = T.int64()
        capp = T.int64()
        n = T.int64()
        CTL = T.match_buffer(ctl_h, (CTL_LEN,), "int32")
        META = T.match_buffer(meta_h, (2,), "int32")
        P = T.match_buffer(p_h, (n, H, capp), "float32")
        SCORE = T.match_buffer(score_h, (cap,), "float64")
        acc = T.alloc_buffer((1,), "float32")
        pol = T.bind(CTL[POLICY])
        if pol == _H2O:
            for j in range(cap):
                acc[0] = T.float32(0)
                for t in range(n):
                    for h in range(H):
                        acc[0] = acc[0] + P[t, h, j]
                SCORE[j] = SCORE[j] + T.Cast("float64", acc[0])
        if pol == _TOVA:
            for j in range(cap):
                if T.Cast("int32", j) < META[1]:
                    acc[0] = T.float32(0)
                    for h in range(H):
                        acc[0] = acc[0] + P[n - 1, h, j]
                    SCORE[j] = T.Cast("float64", acc[0] / T.float32(H))
                else:
                    SCORE[j] = INF

    return kv_observe


def make_tails(d_model: int, vocab: int):
    """The step's last kernels: they advance `ctl` by the step's n tokens (in place) and produce what
    the host asked for, so a step is one call and its result is small."""
    d, V = d_model, vocab

    @T.prim_func
    def greedy_tail(ctl_h: T.handle, x_h: T.handle, lg_h: T.handle, tok_h: T.handle):
        # x only carries the step's token count; the token is the argmax of the last row (first wins)
        T.func_attr(_attrs())
        n = T.int64()
        m = T.int64()
        CTL = T.match_buffer(ctl_h, (CTL_LEN,), "int32")
        X = T.match_buffer(x_h, (n, d), "float32")
        LG = T.match_buffer(lg_h, (m, V), "float32")
        TOK = T.match_buffer(tok_h, (1,), "int32")
        best = T.alloc_buffer((1,), "float32")
        best[0] = LG[m - 1, 0]
        TOK[0] = 0
        for j in range(1, V):
            if LG[m - 1, j] > best[0]:
                best[0] = LG[m - 1, j]
                TOK[0] = T.Cast("int32", j)
        CTL[POS] = CTL[POS] + T.Cast("int32", n)
        CTL[NV] = T.min(CTL[NV] + T.Cast("int32", n), CTL[CAP])

    @T.prim_func
    def nll_tail(ctl_h: T.handle, ids_h: T.handle, lg_h: T.handle, out_h: T.handle):
        # -log softmax(logits[t])[ids[t + 1]] in float64, as the host computes perplexity
        T.func_attr(_attrs())
        n = T.int64()
        n1 = T.int64()
        CTL = T.match_buffer(ctl_h, (CTL_LEN,), "int32")
        IDS = T.match_buffer(ids_h, (n1,), "int32")
        LG = T.match_buffer(lg_h, (n, V), "float32")
        OUT = T.match_buffer(out_h, (n,), "float64")
        for t in T.parallel(n):
            red = T.alloc_buffer((2,), "float64")  # per row: the rows run on several threads
            red[0] = T.Cast("float64", LG[t, 0])
            for j in range(1, V):
                red[0] = T.max(red[0], T.Cast("float64", LG[t, j]))
            red[1] = T.float64(0)
            for j in range(V):
                red[1] = red[1] + T.exp(T.Cast("float64", LG[t, j]) - red[0])
            OUT[t] = red[0] + T.log(red[1]) - T.Cast("float64", LG[t, IDS[t + 1]])
        CTL[POS] = CTL[POS] + T.Cast("int32", n)
        CTL[NV] = T.min(CTL[NV] + T.Cast("int32", n), CTL[CAP])

    @T.prim_func
    def logits_tail(ctl_h: T.handle, lg_h: T.handle, out_h: T.handle):
        T.func_attr(_attrs())
        n = T.int64()
        CTL = T.match_buffer(ctl_h, (CTL_LEN,), "int32")
        LG = T.match_buffer(lg_h, (n, V), "float32")
        OUT = T.match_buffer(out_h, (n, V), "float32")
        for t, j in T.grid(n, V):
            OUT[t, j] = LG[t, j]
        CTL[POS] = CTL[POS] + T.Cast("int32", n)
        CTL[NV] = T.min(CTL[NV] + T.Cast("int32", n), CTL[CAP])

    return greedy_tail, nll_tail, logits_tail


def make_embed(d_model: int, vocab: int, fmt: str):
    """Rows of the token embedding for the first n of m ids (nll feeds n tokens and scores the next), read from the tied head's weights (its transpose): no separate
    table on the board. fp32: embt [d, V]; q8: the head's strips, q [V/32, d, 32] int8 with scales
    [V/32, d/32, 32] (the GGUF's Q8_0 values: the same fp32 products as its dequantized table);
    q8_16: scales per 16 (Q6_K); q4: nibbles [V/32, d/2, 32] with d, m [V/32, d/32, 32] (w = d q + m);
    q4s: the same nibbles with d alone (w = d (q - 8)).
    An untied model passes its token embedding in the same layout."""
    d, V, TJ, G = d_model, vocab, 32, 32
    if fmt == "fp32":
        @T.prim_func
        def embed(ids_h: T.handle, w_h: T.handle, x_h: T.handle):
            T.func_attr(_attrs())
            n = T.int64()
            m = T.int64()
            IDS = T.match_buffer(ids_h, (m,), "int32")
            W = T.match_buffer(w_h, (d, V), "float32")
            X = T.match_buffer(x_h, (n, d), "float32")
            for t, i in T.grid(n, d):
                X[t, i] = W[i, IDS[t]]

        return embed

    if fmt == "q8m_16":
        @T.prim_func
        def embed_q8m(ids_h: T.handle, q_h: T.handle, s_h: T.handle, m_h: T.handle, x_h: T.handle):
            T.func_attr(_attrs())
            n = T.int64()
            m = T.int64()
            IDS = T.match_buffer(ids_h, (m,), "int32")
            Q = T.match_buffer(q_h, (V // TJ, d, TJ), "int8")
            S = T.match_buffer(s_h, (V // TJ, d // 16, TJ), "float32")
            M = T.match_buffer(m_h, (V // TJ, d // 16, TJ), "float32")
            X = T.match_buffer(x_h, (n, d), "float32")
            for t, i in T.grid(n, d):
                X[t, i] = (T.Cast("float32", Q[IDS[t] // TJ, i, IDS[t] % TJ]) * S[IDS[t] // TJ, i // 16, IDS[t] % TJ]
                           + M[IDS[t] // TJ, i // 16, IDS[t] % TJ])

        return embed_q8m
    if fmt == "q4":
        @T.prim_func
        def embed_q4(ids_h: T.handle, q_h: T.handle, d_h: T.handle, m_h: T.handle, x_h: T.handle):
            T.func_attr(_attrs())
            n = T.int64()
            m = T.int64()
            IDS = T.match_buffer(ids_h, (m,), "int32")
            Q = T.match_buffer(q_h, (V // TJ, d // 2, TJ), "uint8")
            DD = T.match_buffer(d_h, (V // TJ, d // G, TJ), "float32")
            M = T.match_buffer(m_h, (V // TJ, d // G, TJ), "float32")
            X = T.match_buffer(x_h, (n, d), "float32")
            for t, i in T.grid(n, d):
                X[t, i] = T.Cast("float32", (T.Cast("int32", Q[IDS[t] // TJ, i // 2, IDS[t] % TJ]) >> T.Cast(
                    "int32", (i % 2) * 4)) & 15) * DD[IDS[t] // TJ, i // G, IDS[t] % TJ] + M[IDS[t] // TJ, i // G,
                                                                                           IDS[t] % TJ]

        return embed_q4
    if fmt == "q4s":
        @T.prim_func
        def embed_q4s(ids_h: T.handle, q_h: T.handle, d_h: T.handle, x_h: T.handle):
            T.func_attr(_attrs())
            n = T.int64()
            m = T.int64()
            IDS = T.match_buffer(ids_h, (m,), "int32")
            Q = T.match_buffer(q_h, (V // TJ, d // 2, TJ), "uint8")
            DD = T.match_buffer(d_h, (V // TJ, d // G, TJ), "float32")
            X = T.match_buffer(x_h, (n, d), "float32")
            for t, i in T.grid(n, d):
                X[t, i] = T.Cast("float32", ((T.Cast("int32", Q[IDS[t] // TJ, i // 2, IDS[t] % TJ]) >> T.Cast(
                    "int32", (i % 2) * 4)) & 15) - 8) * DD[IDS[t] // TJ, i // G, IDS[t] % TJ]

        return embed_q4s
    if fmt not in ("q8", "q8_16"):   # q5 has no row reader: plan_formats never gives it to the head or embedding
        raise ValueError(f"no embedding-row reader for weight format {fmt!r}")
    G = 16 if fmt == "q8_16" else 32

    @T.prim_func
    def embed_q8(ids_h: T.handle, q_h: T.handle, s_h: T.handle, x_h: T.handle):
        T.func_attr(_attrs())
        n = T.int64()
        m = T.int64()
        IDS = T.match_buffer(ids_h, (m,), "int32")
        Q = T.match_buffer(q_h, (V // TJ, d, TJ), "int8")
        S = T.match_buffer(s_h, (V // TJ, d // G, TJ), "float32")
        X = T.match_buffer(x_h, (n, d), "float32")
        for t, i in T.grid(n, d):
            X[t, i] = T.Cast("float32", Q[IDS[t] // TJ, i, IDS[t] % TJ]) * S[IDS[t] // TJ, i // G, IDS[t] % TJ]

    return embed_q8


def make_last_row(d_model: int):
    d = d_model

    @T.prim_func
    def last_row(x_h: T.handle, y_h: T.handle):
        T.func_attr(_attrs())
        n = T.int64()
        X = T.match_buffer(x_h, (n, d), "float32")
        Y = T.match_buffer(y_h, (1, d), "float32")
        for i in range(d):
            Y[0, i] = X[n - 1, i]

    return last_row
