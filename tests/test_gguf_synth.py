"""Small synthetic GGUF files for tests/test_gguf.py (and a check that they hold what was asked): random weights, any llama / qwen2 shape, any tensor
types per role (and per layer), a byte-level BPE or a SentencePiece vocabulary.

The weights are random; quantized types are written with `gguf.quants.quantize` (Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0) or as random blocks with sane fp16 scales (Q2_K..Q6_K, IQ4_NL, IQ4_XS: the gguf package has no
quantizer for them, and every bit pattern of their quants is a valid block)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

BPE_TEXT = ("the quick brown fox jumps over the lazy dog. edge devices run small language models offline; "
            "the capital of France is Paris. 12345 67890 2024 numbers and words, words and numbers. ") * 20


def bpe_vocab(size: int = 320):
    """(tokens, merges) of a byte-level BPE trained on a small text with the `tokenizers` package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=size - 3, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             show_progress=False)
    tok.train_from_iterator([BPE_TEXT], tr)
    import json

    m = json.loads(tok.to_str())["model"]
    vocab = sorted(m["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = [" ".join(x) if isinstance(x, list) else x for x in m["merges"]]
    return tokens, merges, tok


SPM_PIECES = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "\u2581h", "\u2581he", "llo", "\u2581hello", "or",
              "\u2581w", "\u2581wor", "ld", "\u2581world", "a", "b", "\u2581a", "ab", "\u2581ab"]


def spm_vocab(size: int = 288):
    """(tokens, scores, types) of a SentencePiece (llama) vocabulary: <unk> <s> </s>, 256 byte tokens,
    pieces scored so that longer pieces merge later, padded with unused pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for i, p in enumerate(SPM_PIECES):
        tokens.append(p)
        types.append(1)
        scores.append(-float(i))
    while len(tokens) < size:
        tokens.append(f"\u2581pad{len(tokens)}")
        types.append(1)
        scores.append(-1000.0 - len(tokens))
    return tokens, scores, types


def _scales(rng, n: int, around: float) -> np.ndarray:
    """n fp16 scales (as [n, 2] bytes) that differ block to block, so a misplaced block's scale shows."""
    return (around * rng.uniform(0.5, 1.5, n)).astype(np.float16).view(np.uint8).reshape(n, 2)


def _quant(a: np.ndarray, ty: str, rng) -> tuple[np.ndarray, object]:
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if ty == "F32":
        return a.astype(np.float32), None
    if ty == "F16":
        return a.astype(np.float16), None
    q = getattr(Q, ty)
    if ty in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        return quantize(a.astype(np.float32), q), q
    N, K = a.shape
    nb = N * K // 256
    if ty == "Q4_K":  # d, dmin fp16, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
        b = rng.integers(0, 256, (nb, 144), dtype=np.uint8)
        b[:, 0:2] = np.full(nb, 0.02 / 63 * 4, np.float16).view(np.uint8).reshape(nb, 2)
        b[:, 2:4] = np.full(nb, 0.01 / 63 * 4, np.float16).view(np.uint8).reshape(nb, 2)
    elif ty == "Q6_K":  # 128 + 64 bytes of quants, 16 int8 scales, fp16 d
        b = rng.integers(0, 256, (nb, 210), dtype=np.uint8)
        b[:, 192:208] = rng.integers(-127, 128, (nb, 16)).astype(np.int8).view(np.uint8)
        b[:, 208:210] = np.full(nb, 0.06 / 32 / 127, np.float16).view(np.uint8).reshape(nb, 2)
    elif ty == "Q5_K":  # d, dmin fp16, 12 bytes of 6-bit scales/mins, 32 bytes of high bits, 128 of nibbles
        b = rng.integers(0, 256, (nb, 176), dtype=np.uint8)
        b[:, 0:2] = _scales(rng, nb, 0.02 / 63 * 2)
        b[:, 2:4] = _scales(rng, nb, 0.01 / 63 * 2)
    elif ty == "Q2_K":  # 16 bytes of scale/min nibbles, 64 bytes of 2-bit quants, fp16 d, dmin
        b = rng.integers(0, 256, (nb, 84), dtype=np.uint8)
        b[:, 80:82] = _scales(rng, nb, 0.1 / 15)
        b[:, 82:84] = _scales(rng, nb, 0.05 / 15)
    elif ty == "Q3_K":  # 32 bytes of high-bit masks, 64 of 2-bit quants, 12 of 6-bit scales, fp16 d
        b = rng.integers(0, 256, (nb, 110), dtype=np.uint8)
        b[:, 108:110] = _scales(rng, nb, 0.1 / 32 / 4)
    elif ty == "IQ4_NL":  # fp16 d, 16 bytes of table indices
        b = rng.integers(0, 256, (N * K // 32, 18), dtype=np.uint8)
        b[:, 0:2] = _scales(rng, len(b), 0.1 / 127)
    elif ty == "IQ4_XS":  # fp16 d, 2 + 4 bytes of 6-bit scales, 128 bytes of table indices
        b = rng.integers(0, 256, (nb, 136), dtype=np.uint8)
        b[:, 0:2] = _scales(rng, nb, 0.1 / 127 / 32)
    else:
        raise ValueError(ty)
    return b.reshape(N, -1), q


def write(path: Path, arch: str = "llama", n_layers: int = 2, d: int = 64, heads: int = 4, kv_heads: int = 2,
          head_dim: int | None = None, d_ff: int = 96, tokenizer: str = "gpt2", pre: str | None = None,
          types: dict | None = None, layer_types: dict | None = None, tied: bool = True, bias: bool | None = None,
          vocab: int | None = None, seed: int = 0, rope_base: float = 10000.0, eps: float = 1e-5,
          ctx: int = 256, extra_kv: dict | None = None, rope_freqs=None) -> Path:
    """A GGUF file. types: {role: GGUF type} for qkv, o, gu, down, head, embed (default F32);
    layer_types: {(layer, role): type} overrides."""
    import gguf

    rng = np.random.default_rng(seed)
    types = {"qkv": "F32", "o": "F32", "gu": "F32", "down": "F32", "head": "F32", "embed": "F32", **(types or {})}
    layer_types = layer_types or {}
    bias = (arch == "qwen2") if bias is None else bias
    D = head_dim or d // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_embedding_length(d)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    if head_dim is not None:
        w.add_key_length(D)
        w.add_value_length(D)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(eps)
    w.add_context_length(ctx)
    if tokenizer == "gpt2":
        tokens, merges, _ = bpe_vocab(vocab or 320)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre or "default")
        w.add_token_list(tokens)
        w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(len(tokens) - 3)
        w.add_eos_token_id(len(tokens) - 3)
    else:
        tokens, scores, ttypes = spm_vocab(vocab or 288)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(ttypes)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    for k, v in (extra_kv or {}).items():
        w.add_string(k, v) if isinstance(v, str) else w.add_float32(k, v) if isinstance(v, float) else \
            w.add_uint32(k, v)
    V = len(tokens)

    def t(name, shape, ty, scale):
        a = (rng.standard_normal(shape) * scale).astype(np.float32)
        if name.endswith("norm.weight"):
            a += 1.0
        data, raw = _quant(a, ty, rng) if len(shape) == 2 else (a, None)
        w.add_tensor(name, data, raw_dtype=raw)

    t("token_embd.weight", (V, d), types["embed" if not tied else "head"], 0.5)
    t("output_norm.weight", (d,), "F32", 0.2)
    if rope_freqs is not None:   # Llama 3's scaling, as its converter writes it
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    if not tied:
        t("output.weight", (V, d), types["head"], 0.2)
    for l in range(n_layers):
        p = f"blk.{l}."
        ty = lambda role: layer_types.get((l, role), types[role])
        t(p + "attn_norm.weight", (d,), "F32", 0.2)
        t(p + "ffn_norm.weight", (d,), "F32", 0.2)
        t(p + "attn_q.weight", (heads * D, d), ty("qkv"), 0.3)
        t(p + "attn_k.weight", (kv_heads * D, d), ty("qkv"), 0.3)
        t(p + "attn_v.weight", (kv_heads * D, d), ty("qkv"), 0.3)
        if bias:
            for x, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                t(p + f"attn_{x}.bias", (n * D,), "F32", 0.5)
        t(p + "attn_output.weight", (d, heads * D), ty("o"), 0.2)
        t(p + "ffn_gate.weight", (d_ff, d), ty("gu"), 0.2)
        t(p + "ffn_up.weight", (d_ff, d), ty("gu"), 0.2)
        t(p + "ffn_down.weight", (d, d_ff), ty("down"), 0.2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_synthetic_file_holds_the_requested_shapes_types_and_metadata(tmp_path):
    import gguf

    p = write(tmp_path / "s.gguf", arch="qwen2", n_layers=3, d=256, heads=8, kv_heads=2, head_dim=48, d_ff=512,
              tied=False, types={"qkv": "Q4_K", "down": "Q6_K", "head": "Q8_0", "embed": "Q4_0"},
              layer_types={(2, "down"): "Q4_K"})
    r = gguf.GGUFReader(str(p))
    t = {x.name: (x.tensor_type.name, tuple(int(s) for s in reversed(x.shape.tolist()))) for x in r.tensors}
    assert t["blk.0.attn_q.weight"] == ("Q4_K", (8 * 48, 256)) and t["blk.0.attn_k.weight"] == ("Q4_K", (2 * 48, 256))
    assert t["blk.1.ffn_down.weight"] == ("Q6_K", (256, 512)) and t["blk.2.ffn_down.weight"][0] == "Q4_K"
    assert t["output.weight"][0] == "Q8_0" and t["token_embd.weight"][0] == "Q4_0" and "blk.2.attn_v.bias" in t
    assert int(r.fields["qwen2.attention.key_length"].contents()) == 48
