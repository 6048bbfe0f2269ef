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
    except (OSError, ValueError) as e:
        raise UserError(f"{mf} is unreadable ({e}); recompile the model with `edgetvm compile`") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{mf} is not an edgetvm artifact of format version {FORMAT_VERSION}; "
                        f"recompile the model with this edgetvm")
    if verify:
        for name, digest in manifest["files"].items():
            f = p / name
            if not f.is_file():
                raise UserError(f"{f} is missing from the artifact; recompile the model")
            if sha256_file(f, drop_cache="swap" in manifest and not keep_page_cache) != digest:
                raise UserError(f"{f} does not match the sha256 in {MANIFEST}: the artifact was modified "
                                f"or damaged; recompile the model")
    return Artifact(p, manifest)
