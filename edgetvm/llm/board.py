"""The decoder on a board: `edgetvm compile-llm` artifacts, and a host that drives them over TVM RPC.

An LLM artifact is an edgetvm artifact (runtime/artifact.py: library, weight file, manifest
with sha256 of every file, written to a temporary directory and renamed) whose library is
`library.build`'s and which also carries the tokenizer (tokenizer.json), so that the board gets
what it runs and the host needs neither the GGUF package nor a compiler to drive it.

`BoardModel` loads an artifact on a device: this machine's CPU, or a board's over RPC. On a
board, the weights are copied once into tensors that the board allocated (a plain RPC server can
only be handed tensors, not keep them in a tuple), and the KV cache and the policies' state are
made there by `alloc_state`; a step sends its token ids and receives one token or n numbers.
`BoardSession` offers the steps `runtime.generate` and `runtime.perplexity` drive.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import time
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

import edgetvm
from edgetvm.errors import UserError
from edgetvm.llm import kernels, kvdevice, library
from edgetvm.llm.gguf_model import Config
from edgetvm.llm.kvcache import Full, make_policy
from edgetvm.runtime import artifact as art_mod
from edgetvm.runtime.leftovers import cache_root
from edgetvm.runtime.tensors import to_numpy

LIBRARY = "model.so"
WEIGHTS = "weights.bin"
TOKENIZER = "tokenizer.json"
KIND = "llm"
PREFILL_CHUNK = 64


# ------------------------------------------------------------------ artifacts
def compile_llm(name: str, fmt: str, board, out, kv_dtype: str = library.DEFAULT_KV_DTYPE,
                log=lambda *a: None) -> Path:
    """Build the library for `board`, write library + weights + tokenizer + manifest to `out`.
    fmt: a --weights mode; `native` picks each role's exact format from the file (runtime.plan_formats)."""
    from edgetvm.llm.gguf_model import chat_template, load_tokenizer, load_weights, model_path, tensor_types
    from edgetvm.llm.quant import FORMATS
    from edgetvm.llm.runtime import pack_weights, plan_formats
    from edgetvm.passes import pipeline

    if fmt not in FORMATS:
        raise UserError(f"unknown --weights '{fmt}'; use one of: {', '.join(FORMATS)}")
    if kv_dtype not in library.KV_DTYPES:
        raise UserError(f"unknown --kv-dtype '{kv_dtype}'; use one of: {', '.join(library.KV_DTYPES)}")
    gguf = model_path(name)
    out = Path(out)
    t0 = time.perf_counter()
    with art_mod.staging_dir(out) as stage:
        cfg, w = load_weights(name)
        formats, notes = plan_formats(cfg, tensor_types(name), fmt)
        packed = pack_weights(name, formats, w, cfg)
        named = library.flat_weights(packed, cfg)
        del w
        ex = library.build(cfg, formats, board.target(), kv_dtype)
        pipeline.export(ex, str(stage / LIBRARY), board.cross_compiler)
        index = art_mod.write_weights(stage / WEIGHTS, named)
        load_tokenizer(name).save(str(stage / TOKENIZER))
        n_head, n_layer = library.groups(cfg, formats)
        manifest = {
            "kind": KIND,
            "model": {"source": gguf.name, "sha256": art_mod.sha256_file(gguf)},
            "board": {"name": board.name, "arch": board.arch, "target": board.tvm_target},
            "tvm_version": tvm.__version__, "edgetvm_version": edgetvm.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "entry": "decode", "library": LIBRARY, "weights_file": WEIGHTS,
            "inputs": [], "outputs": [], "weights": index,
            "weight_bytes": int(sum(x["nbytes"] for x in index)),
            "llm": {"model": name, "weights": fmt, "formats": formats, "notes": notes + packed.notes,
                    "kv_dtype": kv_dtype, "tokenizer": TOKENIZER, "chat_template": chat_template(name),
                    "config": dataclasses.asdict(cfg), "head_tensors": n_head, "layer_tensors": n_layer},
        }
        art_mod.write_manifest(stage, manifest)
        open_llm_artifact(stage, verify=False)  # never publish one that generate would refuse
    log(f"compiled {name} ({fmt}) for {board.name} in {time.perf_counter() - t0:.1f} s -> {out}")
    return out


def open_llm_artifact(path, verify: bool = True, keep_page_cache: bool = False):
    a = art_mod.open_artifact(path, verify=verify, keep_page_cache=keep_page_cache)
    m = a.manifest
    if m.get("kind") != KIND:
        raise UserError(f"{a.path} is a compiled model, not a compiled LLM; make one with `edgetvm compile-llm`")
    llm = m.get("llm")
    from edgetvm.llm import quant

    ok = (isinstance(llm, dict) and isinstance(llm.get("config"), dict) and llm.get("weights") in quant.FORMATS
          and llm.get("kv_dtype") in library.KV_DTYPES
          and art_mod._is_file_name(llm.get("tokenizer")) and llm["tokenizer"] in m["files"])
    if ok:  # the per-role formats (older artifacts: the uniform mode's)
        f = llm.get("formats", None if llm["weights"] == "native" else llm["weights"])
        ok = (isinstance(f, dict) and set(f) == set(quant.ROLES) and all(v in quant.KERNEL_FORMATS for v in f.values())
              and "q5" not in (f["head"], f["embed"]) or isinstance(f, str))
    if ok:
        try:
            cfg = Config(**llm["config"])
            ok = library.groups(cfg, f) == (llm.get("head_tensors"), llm.get("layer_tensors")) and \
                len(m["weights"]) == llm["head_tensors"] + cfg.n_layers * llm["layer_tensors"]
        except (TypeError, ValueError):   # a key it does not know, a value of the wrong kind
            ok = False
    if not ok:
        raise UserError(f"{a.path}/{art_mod.MANIFEST}: its 'llm' section does not describe its weights; the "
                        f"artifact is damaged or was edited: recompile it with `edgetvm compile-llm`")
    return a


def source_key() -> str:
    """Changes whenever the code that builds the library does: a cached build of older code is never used."""
    import edgetvm.passes

    h = hashlib.sha256(f"{tvm.__version__} {edgetvm.__version__}".encode())
    here = Path(__file__).parent
    for f in ("library.py", "kvdevice.py", "kernels.py", "quant.py", "runtime.py", "reference.py", "gguf_model.py"):
        h.update((here / f).read_bytes())
    for f in ("pipeline.py", "schedule.py"):
        h.update((Path(edgetvm.passes.__file__).parent / f).read_bytes())
    return h.hexdigest()[:16]


def cached_artifact(name: str, fmt: str, board, kv_dtype: str = library.DEFAULT_KV_DTYPE, log=print) -> Path:
    """The artifact `compile-llm` would write for (model, weights, board), built once under $EDGETVM_CACHE."""
    from edgetvm.llm.gguf_model import model_id

    path = cache_root() / "llm" / "artifacts" / f"{model_id(name)}-{fmt}-{kv_dtype}-{board.name}-{source_key()}"
    if (path / art_mod.MANIFEST).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"compiling {name} ({fmt}) for {board.name}; cached in {path}")
    return compile_llm(name, fmt, board, path, kv_dtype)


# ------------------------------------------------------------------ running it
def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("  File")]
    return (lines[-1] if lines else type(e).__name__)[:200]


class BoardModel:
    """An LLM artifact loaded on a device; `session(policy, budget)` makes a KV cache there."""

    def __init__(self, art, remote=None, where: str = "this machine", weights=None):
        m = art.manifest
        llm = m["llm"]
        self.art, self.remote, self.where = art, remote, where
        self.cfg = Config(**llm["config"])
        self.weights = llm["weights"]
        self.formats = llm.get("formats") or llm["weights"]
        self.kv_dtype = llm["kv_dtype"]
        self.layout = library.Layout(llm["head_tensors"], llm["layer_tensors"], self.cfg.n_layers)
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(art.path / llm["tokenizer"]))
        self.chat_template = llm.get("chat_template")
        self.weight_bytes = m["weight_bytes"]
        board = m["board"]
        if remote is None:
            if board["arch"] != platform.machine():
                raise UserError(f"{art.path} was compiled for board '{board['name']}' ({board['arch']}) and cannot "
                                f"run on this {platform.machine()} machine; run it on the board with "
                                f"--rpc HOST:PORT or --tracker HOST:PORT --key KEY")
            self.dev = tvm.cpu()
            from edgetvm.runtime.session import _load_library

            lib = _load_library(art.library)
        else:
            self.dev = remote.cpu()
            try:
                remote.upload(str(art.library))
                lib = remote.load_module(art.library.name)
            except (RuntimeError, ValueError) as e:
                raise UserError(f"the board at {where} cannot load {art.library} (compiled for board "
                                f"'{board['name']}', {board['arch']}): {_first_line(e)}; compile for that board with "
                                f"`edgetvm compile-llm --target BOARD`") from None
        self.vm = relax.VirtualMachine(lib, self.dev)
        self.bytes_sent = 0
        if weights is not None:  # the caller places the weights (memory-budgeted runs stream them)
            self.W = weights
        elif remote is None:
            # zero-copy: the kernels read the mapped weight file
            self.W = tvm.runtime.convert([[tvm.runtime.from_dlpack(a) for a in g]
                                          for g in self.layout.nest(art.weights())])
        else:
            self.W = self._upload(art.weights())

    def _upload(self, flat):
        """Copy the weights into tensors the board allocated, once."""
        W = self.vm["alloc_weights"]()
        get = self.remote.get_function("ffi.ArrayGetItem")
        for g, group in enumerate(self.layout.nest(flat)):
            gh = get(W, g)
            for i, a in enumerate(group):
                get(gh, i).copyfrom(np.ascontiguousarray(a))
                self.bytes_sent += a.nbytes
        return W

    def shape(self, values):
        if self.remote is None:
            return tvm.runtime.ShapeTuple([int(v) for v in values])
        return self.remote.get_function("ffi.Shape")(*[int(v) for v in values])

    def tensor(self, a):
        self.bytes_sent += a.nbytes
        return tvm.runtime.tensor(a, self.dev)

    def session(self, policy: str = "full", budget: int = 256, sinks: int = 4, recent: int | None = None,
                **_) -> "BoardSession":
        return BoardSession(self, policy, budget, sinks, recent)


class BoardSession:
    """One sequence on the device. The host mirrors only the counts (the slots each policy picks
    stay on the device), which tell it when the cache is full."""

    def __init__(self, model: BoardModel, policy: str, budget: int, sinks: int = 4, recent: int | None = None):
        cfg = model.cfg
        if budget > cfg.max_pos:
            raise UserError(f"--kv-budget {budget} exceeds the model's context {cfg.max_pos}; lower it")
        pol = make_policy(policy, budget, sinks, recent)  # validates; H2O's default recent window
        self.model, self.policy, self.capacity = model, policy, budget
        self.full = isinstance(pol, Full)
        self.kv_dtype = model.kv_dtype
        shape = [budget, kernels.padded(budget) // kernels.JB, kvdevice.POLICY_IDS[policy],
                 sinks, getattr(pol, "recent", 0)]
        self.S = model.vm["alloc_state"](model.shape(shape))
        self.position = 0
        self.n_valid = 0
        self.chunk = PREFILL_CHUNK
        self._last = None  # (token, its tensor on the device)

    @property
    def kv_bytes(self) -> int:
        cfg = self.model.cfg
        return 2 * cfg.n_layers * cfg.n_kv_heads * self.capacity * cfg.head_dim * np.dtype(self.kv_dtype).itemsize

    @property
    def state_bytes(self) -> int:
        return library.state_bytes(self.model.cfg, self.kv_dtype, self.capacity)

    def _advance(self, n: int) -> None:
        if self.full and self.n_valid + n > self.capacity:
            raise UserError(f"the full KV cache holds {self.capacity} tokens and the text is longer; "
                            "raise --kv-budget or pick an evicting --kv-policy")
        # positions index the RoPE tables; StreamingLLM rotates by ranks within the cache instead
        if self.policy != "streaming" and self.position + n > self.model.cfg.max_pos:
            raise UserError(f"position {self.position + n} is beyond the model's context of {self.model.cfg.max_pos} "
                            f"tokens; use --kv-policy streaming for longer texts")
        self.position += n
        self.n_valid = min(self.n_valid + n, self.capacity)

    def _chunks(self, total: int, chunk: int):
        i = 0
        while i < total:
            room = self.capacity - self.n_valid
            step = min(chunk, room, total - i) if room > 0 else 1
            yield i, step
            i += step

    def _ids(self, ids):
        if isinstance(ids, tvm.runtime.Tensor):
            return ids
        return self.model.tensor(np.asarray(ids, dtype=np.int32))

    def _call(self, kind: str, ids):
        """One step on the device: "prefill"/"decode" -> greedy token, "nll" -> -log p, "logits"."""
        return self.model.vm[kind](self._ids(ids), self.model.W, self.S)

    def greedy_prefill(self, ids, chunk: int | None = None) -> int:
        ids = list(ids)
        out = None
        for i, step in self._chunks(len(ids), chunk or self.chunk):
            self._advance(step)
            out = self._call("decode" if step == 1 else "prefill", ids[i:i + step])
        return self._took(out)

    def greedy_next(self, token: int) -> int:
        self._advance(1)
        # greedy decoding feeds back the token the board just made: it is still there
        t = self._last[1] if self._last is not None and self._last[0] == token else [token]
        return self._took(self._call("decode", t))

    def _took(self, out) -> int:
        tok = int(to_numpy(out)[0])
        self._last = (tok, out)
        return tok

    def nll(self, ids) -> np.ndarray:
        self._advance(len(ids) - 1)
        self._last = None
        return to_numpy(self._call("nll", ids))

    def forward(self, ids) -> np.ndarray:
        """Logits [n, vocab] of the tokens fed (for tests: n * vocab floats cross the link)."""
        self._advance(len(ids))
        self._last = None
        return to_numpy(self._call("logits", ids))

    def prefill(self, ids, chunk: int | None = None) -> np.ndarray:
        ids = list(ids)
        return np.concatenate([self.forward(ids[i:i + s]) for i, s in self._chunks(len(ids), chunk or self.chunk)], 0)
