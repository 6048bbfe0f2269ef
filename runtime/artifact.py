"""A compiled model on disk: a library, one weight file, and manifest.json with shapes and sha256 of every file.

Weights are stored back to back, each at a 64-byte aligned offset, so the runtime can map the file and
hand TVM zero-copy views (DLPack refuses misaligned data).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError
from edgetvm.runtime.tensors import native

FORMAT = "edgetvm-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ALIGN = 64


def sha256_file(path: Path, drop_cache: bool = False) -> str:
    """sha256 of a file; with drop_cache, read around the page cache (O_DIRECT), which a cgroup counts."""
    h = hashlib.sha256()
    if drop_cache:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # file systems without O_DIRECT (tmpfs): it is memory anyway
            fd = None
        if fd is not None:
            try:
                buf = mmap.mmap(-1, 1 << 20)  # page-aligned, as O_DIRECT requires
                while n := os.readv(fd, [buf]):
                    h.update(memoryview(buf)[:n])
                return h.hexdigest()
            finally:
                os.close(fd)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_weights(path: Path, named: list[tuple[str, np.ndarray]]) -> list[dict]:
    """Write arrays at 64-byte aligned offsets; return their index entries for the manifest."""
    index, offset = [], 0
    with open(path, "wb") as f:
        for name, arr in named:
            arr = native(arr)
            offset = -(-offset // ALIGN) * ALIGN
            f.seek(offset)
            f.write(arr.tobytes())
            index.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape),
                          "offset": offset, "nbytes": arr.nbytes})
            offset += arr.nbytes
        # Never empty, so a model without weights maps its file like any other (mmap refuses 0 bytes).
        f.truncate(max(ALIGN, -(-offset // ALIGN) * ALIGN))
    return index


def read_weights(path: Path, index: list[dict], mode: str = "c") -> list[np.ndarray]:
    """Views into a private copy-on-write map of the weight file: nothing is read until touched."""
    if not index:
        return []
    mm = np.memmap(path, dtype=np.uint8, mode=mode)
    return [mm[w["offset"]:w["offset"] + w["nbytes"]].view(w["dtype"]).reshape(w["shape"]) for w in index]


@contextmanager
def staging_dir(out: Path):
    """A fresh directory beside `out`; on success it replaces `out` in one rename, on failure it vanishes."""
    out = Path(out)
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserError(f"output directory's parent {parent} does not exist; create it or choose another -o")
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an edgetvm artifact; refusing to overwrite it: "
                        f"choose another -o or remove it")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
    except OSError as e:
        raise UserError(f"cannot write to {parent} ({e.strerror}); choose a writable -o") from None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.rename(out, old / "a")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(dirpath: Path, manifest: dict) -> None:
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION)
    manifest["files"] = {f.name: sha256_file(f) for f in sorted(dirpath.iterdir())
                         if f.is_file() and f.name != MANIFEST}
    (dirpath / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @property
    def inputs(self):
        from edgetvm.passes.onnx_import import TensorInfo

        return [TensorInfo.from_json(d) for d in self.manifest["inputs"]]

    @property
    def outputs(self):
        from edgetvm.passes.onnx_import import TensorInfo

        return [TensorInfo.from_json(d) for d in self.manifest["outputs"]]

    @property
    def board(self) -> dict:
        return self.manifest["board"]

    @property
    def library(self) -> Path:
        return self.path / self.manifest["library"]

    @property
    def weights_path(self) -> Path:
        return self.path / self.manifest["weights_file"]

    def weights(self) -> list[np.ndarray]:
        return read_weights(self.weights_path, self.manifest["weights"])


def open_artifact(path: str | Path, verify: bool = True, keep_page_cache: bool = False) -> Artifact:
    """Load a compiled model, checking every file against the manifest's sha256 first.

    A swapping build must stay within its memory budget, so unless `keep_page_cache` its files are
    hashed without leaving them in the page cache.
    """
    p = Path(path)
    mf = p / MANIFEST
    if not p.is_dir() or not mf.is_file():
        raise UserError(f"{p} is not a compiled model (no {MANIFEST}); make one with `edgetvm compile`")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nesting too deep for json
        raise UserError(f"{mf} is unreadable ({str(e)[:200] or type(e).__name__}); recompile the model with "
                        f"`edgetvm compile`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{mf} is not an edgetvm artifact of format version {FORMAT_VERSION}; "
                        f"recompile the model with this edgetvm")
    _check_files(mf, manifest)
    if verify:
        for name, digest in manifest["files"].items():
            f = p / name
            if not f.is_file():
                raise UserError(f"{f} is missing from the artifact; recompile the model")
            # A budgeted run (a swapping build, an LLM under --memory-budget) must not fill the page cache.
            budgeted = "swap" in manifest or manifest.get("kind") == "llm"
            if sha256_file(f, drop_cache=budgeted and not keep_page_cache) != digest:
                raise UserError(f"{f} does not match the sha256 in {MANIFEST}: the artifact was modified "
                                f"or damaged; recompile the model")
    check_manifest(mf, manifest)
    return Artifact(p, manifest)


# ------------------------------------------------------------------ what a manifest must say
# The sha256 in `files` only prove the files are the ones the manifest names. What follows checks
# the manifest against itself and its files, so that a damaged or hand-edited one is refused here
# with the field it gets wrong, not by numpy or TVM mid-run (or by a crash inside dlopen).

_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64"}
_ELF_MACHINE = {"x86_64": 62, "aarch64": 183, "armv7l": 40}


# Types numpy knows through ml_dtypes (which onnx imports), and TVM may return.
_ML_DTYPES = {"bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "int4", "uint4"}


def _known_dtype(name) -> bool:
    if name in _DTYPES:
        return True
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        return False
    return name in _ML_DTYPES


def _damaged(mf: Path, what: str) -> UserError:
    return UserError(f"{mf}: {what}; the artifact is damaged or was edited: recompile the model")


def _is_file_name(x) -> bool:
    return isinstance(x, str) and x not in ("", ".", "..") and "/" not in x and "\0" not in x


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_files(mf: Path, m: dict) -> None:
    files = m.get("files")
    if not isinstance(files, dict) or not all(_is_file_name(k) and isinstance(v, str) and len(v) == 64
                                              for k, v in files.items()):
        raise _damaged(mf, "'files' must map each file name to its sha256")
    for key in ("library", "weights_file"):
        if not _is_file_name(m.get(key)) or m[key] not in files or m[key] == MANIFEST:
            raise _damaged(mf, f"'{key}' must name one of the artifact's files listed in 'files' "
                               f"(it is {json.dumps(m.get(key))[:80]})")
    if m["library"] == m["weights_file"]:
        raise _damaged(mf, "'library' and 'weights_file' name the same file")


def _nbytes(shape, dtype: str) -> int:
    n = np.dtype(dtype if dtype in _DTYPES else _ml_dtype(dtype)).itemsize
    for d in shape:
        n *= d
    return n


def _ml_dtype(name: str):
    import ml_dtypes

    return getattr(ml_dtypes, name)


def _check_tensors(mf: Path, m: dict, key: str, limit: int) -> None:
    items = m.get(key)
    if not isinstance(items, list):
        raise _damaged(mf, f"'{key}' must be a list")
    names = set()
    for i, t in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise _damaged(mf, f"{where} must have a name")
        if t["name"] in names:
            raise _damaged(mf, f"{where} repeats the name '{t['name']}'")
        names.add(t["name"])
        _check_shape_dtype(mf, where, t)
        size = _nbytes(t["shape"], t["dtype"])
        if size > limit:
            raise _damaged(mf, f"{where} '{t['name']}' would take {size / 2**30:.3g} GiB ({t['dtype']}"
                               f"{t['shape']}), more than this machine's {limit / 2**30:.3g} GiB of memory")


def _check_shape_dtype(mf: Path, where: str, t: dict) -> None:
    if not _known_dtype(t.get("dtype")):
        raise _damaged(mf, f"{where} has dtype {json.dumps(t.get('dtype'))[:40]}, not one of "
                           f"{', '.join(sorted(_DTYPES))} (or bfloat16, float8_*)")
    if not isinstance(t.get("shape"), list) or not all(_is_count(d) for d in t["shape"]):
        raise _damaged(mf, f"{where} has shape {json.dumps(t.get('shape'))[:60]}, not a list of "
                           f"non-negative integers")


def _check_weights(mf: Path, m: dict, size: int) -> None:
    ws = m.get("weights")
    if not isinstance(ws, list):
        raise _damaged(mf, "'weights' must be a list")
    for i, w in enumerate(ws):
        where = f"weights[{i}]"
        if not isinstance(w, dict) or not isinstance(w.get("name"), str):
            raise _damaged(mf, f"{where} must have a name")
        _check_shape_dtype(mf, where, w)
        off, n = w.get("offset"), w.get("nbytes")
        if not _is_count(off) or off % ALIGN:
            raise _damaged(mf, f"{where} '{w['name']}' has offset {json.dumps(off)[:30]}, not a multiple of "
                               f"{ALIGN} (weights are mapped zero-copy and must be aligned)")
        if not _is_count(n) or n != _nbytes(w["shape"], w["dtype"]):
            raise _damaged(mf, f"{where} '{w['name']}' has nbytes {json.dumps(n)[:30]}, but {w['dtype']}"
                               f"{w['shape']} takes {_nbytes(w['shape'], w['dtype'])}")
        if off + n > size:
            raise _damaged(mf, f"{where} '{w['name']}' ends at byte {off + n}, beyond the {size} bytes of "
                               f"{m['weights_file']}")
    if m.get("weight_bytes") != sum(w["nbytes"] for w in ws):
        raise _damaged(mf, f"'weight_bytes' is {json.dumps(m.get('weight_bytes'))[:30]}, not the "
                           f"{sum(w['nbytes'] for w in ws)} bytes its weights add up to")


def _check_swap(mf: Path, m: dict, size: int) -> None:
    """The fields of a swapping build's plan that the swap runtime reads."""
    sw = m["swap"]
    lists_of_names = lambda x: isinstance(x, list) and all(isinstance(s, str) for s in x)  # noqa: E731
    ok = (isinstance(sw, dict) and all(_is_count(sw.get(k)) for k in ("budget", "predicted_peak"))
          and isinstance(sw.get("prefetch"), bool) and lists_of_names(sw.get("data_inputs"))
          and lists_of_names(sw.get("outputs")) and isinstance(sw.get("blocks"), list))
    if not ok:
        raise _damaged(mf, "'swap' must hold budget, predicted_peak, prefetch, data_inputs, outputs and blocks")
    for k, b in enumerate(sw["blocks"]):
        ok = (isinstance(b, dict) and isinstance(b.get("function"), str)
              and lists_of_names(b.get("inputs")) and lists_of_names(b.get("outputs"))
              and isinstance(b.get("weights"), list)
              and all(_is_count(w) and w < len(m["weights"]) for w in b["weights"])
              and all(_is_count(b.get(x)) for x in ("weight_bytes", "act_bytes", "planned_bytes"))
              and isinstance(b.get("range"), list) and len(b["range"]) == 2 and all(map(_is_count, b["range"]))
              and sum(b["range"]) <= size)
        if not ok:
            raise _damaged(mf, f"swap block {k} must name its function, inputs, outputs, weights (indices into "
                               f"'weights') and a byte range inside {m['weights_file']}")


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_manifest(mf: Path, m: dict) -> None:
    """Refuse a manifest whose fields contradict each other or its files (see the comment above)."""
    _check_files(mf, m)
    board = m.get("board")
    if not isinstance(board, dict) or not all(isinstance(board.get(k), str) and board[k] for k in ("name", "arch")):
        raise _damaged(mf, "'board' must give the board's name and arch")
    if not isinstance(m.get("entry", "main"), str):
        raise _damaged(mf, "'entry' must name the library's function to call")
    for key in ("library", "weights_file"):
        if not (mf.parent / m[key]).is_file():
            raise UserError(f"{mf.parent / m[key]} is missing from the artifact; recompile the model")
    # inputs are made, and outputs received, in this machine's memory, even for a run on a board
    for key in ("inputs", "outputs"):
        _check_tensors(mf, m, key, _host_memory())
    size = (mf.parent / m["weights_file"]).stat().st_size
    _check_weights(mf, m, size)
    if "swap" in m:
        _check_swap(mf, m, size)
    check_library(mf.parent / m["library"], board["arch"])


def check_library(path: Path, arch: str | None = None) -> None:
    """Refuse a file that is not a whole ELF shared library for `arch`, before dlopen maps it.

    dlopen maps a library's segments as the headers say: a truncated file faults (SIGBUS) when the
    loader touches a page past its end, which kills the process instead of failing the load.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    what = f"{path} is not a shared library compiled by edgetvm"
    if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] != 1:
        raise UserError(f"{what} (no little-endian ELF header); recompile the model")
    wide = head[4] == 2
    fields = struct.unpack_from("<HHIQQQIHHHHHH" if wide else "<HHIIIIIHHHHHH", head, 16)
    e_type, machine, phoff, shoff = fields[0], fields[1], fields[4], fields[5]
    phentsize, phnum, shentsize, shnum = fields[8], fields[9], fields[10], fields[11]
    if e_type != 3:  # ET_DYN
        raise UserError(f"{what} (ELF type {e_type}, not a shared object); recompile the model")
    if arch in _ELF_MACHINE and machine != _ELF_MACHINE[arch]:
        raise UserError(f"{what} for {arch} (ELF machine {machine}); recompile the model")
    truncated = UserError(f"{path} is truncated (its ELF headers point past its {size} bytes); recompile the model")
    if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size or phentsize < (56 if wide else 32):
        raise truncated
    with open(path, "rb") as f:
        f.seek(phoff)
        table = f.read(phnum * phentsize)
    for k in range(phnum):
        ph = struct.unpack_from("<IIQQQQQQ" if wide else "<IIIIIIII", table, k * phentsize)
        p_type, p_offset, p_filesz = (ph[0], ph[2], ph[5]) if wide else (ph[0], ph[1], ph[4])
        if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD
            raise truncated
