"""Weight patches: a small update of a deployed artifact's weight file, and its atomic application.

This module runs on the board too (registered by runtime/device_server.py and by an emulated board
started with functions=True), so it imports only the standard library and numpy, never edgetvm.

Patch format, version 1 (all integers little-endian):

    b"EDGETVMPATCH" (12 bytes)  u16 version  u32 header length  header (UTF-8 JSON)  body  sha256 (32 bytes)

The header names the base: the sha256 of the weight file the patch was made for (`base`), and of the
file it produces (`result`); then, per changed tensor, its index in the manifest's weights, its name,
how many elements change, and how its values are coded ("f32": raw float32; "q8": one uint8 per value
on a per-tensor affine grid, `lo + q * scale`). The body holds, per tensor in header order, the
positions as LEB128 varints of the gaps between sorted flat indices (the first gap from -1; gaps of a
few hundred take 2 bytes instead of 4), then the values. The trailing sha256 covers everything
before it, so a truncated or damaged patch is refused before anything is touched.

Application (`apply_patch`): the artifact's manifest must name `base` for its weight file and the file
must hash to it; the new weights are written to a new file beside the old (its name carries the new
hash), checked against `result`, and the manifest (new file name, new hash) is written to a temporary
file and renamed over manifest.json: that rename is the one commit point. Before it the artifact is
exactly the old one; after it, the new one; the old weight file is removed last.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"EDGETVMPATCH"
VERSION = 1
MANIFEST = "manifest.json"
_HEAD = struct.Struct("<HI")
CODINGS = ("f32", "q8")


class PatchError(ValueError):
    """A patch that cannot be applied to this artifact; the message is one line naming why."""


@dataclass
class TensorUpdate:
    index: int               # position in the manifest's "weights"
    name: str
    positions: np.ndarray    # int64 flat indices, strictly increasing
    values: np.ndarray       # float32, as they will be written
    coding: str = "f32"


@dataclass
class Patch:
    base: str                # sha256 of the weight file the patch applies to
    result: str              # sha256 of the weight file it produces
    tensors: list[TensorUpdate] = field(default_factory=list)
    meta: dict = field(default_factory=dict)   # free-form: k, method, round... (not interpreted)

    @property
    def n_changed(self) -> int:
        return sum(len(t.positions) for t in self.tensors)


# ---- varints -------------------------------------------------------------------------------------


def _varints(gaps: np.ndarray) -> bytes:
    """LEB128 of non-negative integers, vectorised: 7 bits a byte, the high bit set on all but the last."""
    gaps = np.asarray(gaps, dtype=np.uint64)
    if len(gaps) == 0:
        return b""
    n_bytes = np.ones(len(gaps), np.int64)
    for k in range(1, 10):
        n_bytes += gaps >= np.uint64(1 << (7 * k))
    out = np.zeros(int(n_bytes.sum()), np.uint8)
    starts = np.concatenate([[0], np.cumsum(n_bytes)[:-1]])
    for k in range(int(n_bytes.max())):
        live = n_bytes > k
        chunk = ((gaps[live] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        more = (n_bytes[live] > k + 1).astype(np.uint8) << 7
        out[starts[live] + k] = chunk | more
    return out.tobytes()


def _read_varints(buf: memoryview, pos: int, count: int) -> tuple[np.ndarray, int]:
    out = np.empty(count, np.int64)
    data = buf
    for i in range(count):
        value, shift = 0, 0
        while True:
            if pos >= len(data):
                raise PatchError("the patch ends inside its positions (truncated)")
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 63:
                raise PatchError("the patch has an overlong position code (damaged)")
        out[i] = value
    return out, pos


# ---- encode / decode --------------------------------------------------------------------------------


def quantise_q8(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """uint8 codes on the affine grid lo + q * scale spanning the values (what "q8" sends)."""
    values = np.asarray(values, np.float32)
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    q = np.clip(np.rint((values - np.float32(lo)) / np.float32(scale)), 0, 255).astype(np.uint8)
    return q, np.float32(lo).item(), np.float32(scale).item()


def dequantise_q8(q: np.ndarray, lo: float, scale: float) -> np.ndarray:
    return (np.float32(lo) + q.astype(np.float32) * np.float32(scale)).astype(np.float32)


def encode(patch: Patch) -> bytes:
    body, entries = [], []
    for t in patch.tensors:
        pos = np.asarray(t.positions, np.int64)
        if len(pos) and (pos[0] < 0 or np.any(np.diff(pos) <= 0)):
            raise ValueError(f"{t.name}: positions must be non-negative and strictly increasing")
        entry = {"index": t.index, "name": t.name, "count": int(len(pos)), "coding": t.coding}
        body.append(_varints(np.diff(pos, prepend=-1) - 1))
        if t.coding == "f32":
            body.append(np.asarray(t.values, "<f4").tobytes())
        elif t.coding == "q8":
            q, lo, scale = quantise_q8(t.values)
            entry |= {"lo": lo, "scale": scale}
            body.append(q.tobytes())
        else:
            raise ValueError(f"unknown value coding {t.coding!r}; use one of {CODINGS}")
        entries.append(entry)
    header = json.dumps({"base": patch.base, "result": patch.result, "tensors": entries, "meta": patch.meta},
                        separators=(",", ":")).encode()
    blob = MAGIC + _HEAD.pack(VERSION, len(header)) + header + b"".join(body)
    return blob + hashlib.sha256(blob).digest()


def decode(blob: bytes) -> Patch:
    """The patch in `blob`, or PatchError naming what is wrong with it (nothing is trusted unchecked)."""
    buf = memoryview(bytes(blob))
    if len(buf) < len(MAGIC) + _HEAD.size + 32 or bytes(buf[:len(MAGIC)]) != MAGIC:
        raise PatchError("not an edgetvm weight patch (no EDGETVMPATCH header); make one with `edgetvm update diff`")
    if hashlib.sha256(buf[:-32]).digest() != bytes(buf[-32:]):
        raise PatchError("the patch is truncated or damaged (its checksum does not match); send it again")
    version, n_header = _HEAD.unpack_from(buf, len(MAGIC))
    if version != VERSION:
        raise PatchError(f"patch format version {version}, this edgetvm reads version {VERSION}")
    pos = len(MAGIC) + _HEAD.size
    try:
        header = json.loads(bytes(buf[pos:pos + n_header]))
        entries = header["tensors"]
        base, result = str(header["base"]), str(header["result"])
    except (ValueError, KeyError, TypeError) as e:
        raise PatchError(f"the patch header is unreadable ({e})") from None
    pos += n_header
    end = len(buf) - 32
    patch = Patch(base, result, meta=header.get("meta", {}))
    for e in entries:
        try:
            count, coding, index, name = int(e["count"]), e["coding"], int(e["index"]), str(e["name"])
        except (KeyError, TypeError, ValueError):
            raise PatchError("a tensor entry of the patch header is incomplete") from None
        gaps, pos = _read_varints(buf[:end], pos, count)
        positions = np.cumsum(gaps + 1) - 1
        width = {"f32": 4, "q8": 1}.get(coding)
        if width is None:
            raise PatchError(f"unknown value coding {coding!r} in the patch")
        if pos + width * count > end:
            raise PatchError("the patch ends inside its values (truncated)")
        raw = bytes(buf[pos:pos + width * count])
        pos += width * count
        if coding == "f32":
            values = np.frombuffer(raw, "<f4").astype(np.float32)
        else:
            values = dequantise_q8(np.frombuffer(raw, np.uint8), float(e["lo"]), float(e["scale"]))
        patch.tensors.append(TensorUpdate(index, name, positions, values, coding))
    if pos != end:
        raise PatchError(f"the patch has {end - pos} bytes after its last tensor (damaged)")
    return patch


# ---- applying ---------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_updated(src: Path, dst: Path, weights: list[dict], patch: Patch) -> None:
    """Copy `src` to `dst` with the patch's values written in (dst is fsynced)."""
    with open(src, "rb") as f:
        data = bytearray(f.read())
    for t in patch.tensors:
        if not 0 <= t.index < len(weights):
            raise PatchError(f"the patch changes weight #{t.index}, the artifact has {len(weights)}")
        w = weights[t.index]
        if w["name"] != t.name or w["dtype"] != "float32":
            raise PatchError(f"the patch's weight #{t.index} is '{t.name}' (float32), the artifact's is "
                             f"'{w['name']}' ({w['dtype']}): it was made for another model")
        n = w["nbytes"] // 4
        if len(t.positions) and (t.positions[0] < 0 or t.positions[-1] >= n):
            raise PatchError(f"the patch writes past the {n} values of '{t.name}' (damaged or for another model)")
        view = np.frombuffer(memoryview(data)[w["offset"]:w["offset"] + w["nbytes"]], "<f4")
        view[t.positions] = t.values  # a writable view into `data`
    with open(dst, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def apply_patch(artifact_dir: str | os.PathLike, blob: bytes) -> dict:
    """Apply an encoded patch to the artifact in `artifact_dir` atomically (see the module's docstring).

    Returns {"weights_file", "sha256", "changed", "seconds"}; raises PatchError (artifact untouched)."""
    import time

    t0 = time.perf_counter()
    d = Path(artifact_dir)
    patch = decode(blob)
    mf = d / MANIFEST
    try:
        manifest = json.loads(mf.read_text())
        old_name, weights = manifest["weights_file"], manifest["weights"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PatchError(f"{d} is not a readable edgetvm artifact ({e})") from None
    old = d / old_name
    if manifest.get("files", {}).get(old_name) != patch.base:
        raise PatchError(f"the patch was made for weights {patch.base[:12]}, but {d} has "
                         f"{str(manifest.get('files', {}).get(old_name))[:12]}: it is for another base artifact")
    if _sha256(old) != patch.base:
        raise PatchError(f"{old} does not match the sha256 in its manifest: the artifact is damaged; redeploy it")
    new_name = f"weights-{patch.result[:16]}.bin"
    if new_name == old_name:
        raise PatchError("the patch changes nothing (its result is the deployed weights)")
    new = d / new_name
    fd, tmp_weights = tempfile.mkstemp(prefix=f".{new_name}.", dir=d)
    os.close(fd)
    tmp_manifest = None
    try:
        write_updated(old, Path(tmp_weights), weights, patch)
        if _sha256(Path(tmp_weights)) != patch.result:
            raise PatchError("the patched weights do not hash to the patch's result: it was made for "
                             "another artifact or is damaged")
        os.chmod(tmp_weights, 0o644)
        os.replace(tmp_weights, new)
        files = {k: v for k, v in manifest["files"].items() if k != old_name}
        files[new_name] = patch.result
        manifest["files"] = dict(sorted(files.items()))
        manifest["weights_file"] = new_name
        history = manifest.setdefault("patches", [])
        history.append({"base": patch.base, "result": patch.result, "changed": patch.n_changed,
                        "bytes": len(blob)})
        fd, tmp_manifest = tempfile.mkstemp(prefix=".manifest.", dir=d)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_manifest, 0o644)
        os.replace(tmp_manifest, mf)   # the commit point
        tmp_manifest = None
    except BaseException:
        Path(tmp_weights).unlink(missing_ok=True)
        if tmp_manifest is not None:
            Path(tmp_manifest).unlink(missing_ok=True)
            new.unlink(missing_ok=True)
        elif json.loads(mf.read_text()).get("weights_file") != new_name:
            new.unlink(missing_ok=True)
        raise
    dir_fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dir_fd)   # the renames survive a power cut
    finally:
        os.close(dir_fd)
    old.unlink(missing_ok=True)
    return {"weights_file": new_name, "sha256": patch.result, "changed": patch.n_changed,
            "seconds": time.perf_counter() - t0}


# ---- the board side -----------------------------------------------------------------------------------


DEPLOY_DIR = os.environ.get("EDGETVM_DEPLOY_DIR", "/tmp/edgetvm-deployed")


def _on_board(path: str) -> Path:
    """A relative path is taken in DEPLOY_DIR: TVM's RPC workspace is a new temporary directory per session,
    and a deployed artifact must outlive the session that deployed it."""
    return Path(path) if os.path.isabs(path) else Path(DEPLOY_DIR) / path


def _board_apply(artifact_dir: str, blob) -> str:
    """`edgetvm.update.apply(artifact_dir, patch_bytes)` on a device: a JSON report, {"error": ...} if refused.
    Errors come back as JSON rather than exceptions, so the host shows the board's one-line reason instead
    of a remote backtrace."""
    try:
        return json.dumps(apply_patch(_on_board(artifact_dir), bytes(blob)))
    except PatchError as e:
        return json.dumps({"error": str(e)})


def _board_put(path: str, blob) -> int:
    """`edgetvm.update.put(path, bytes)`: write a file (atomically, directories made) to deploy an artifact."""
    p = _on_board(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}")
    tmp.write_bytes(bytes(blob))
    os.replace(tmp, p)
    return len(blob)


def _board_sha256(path: str) -> str:
    """`edgetvm.update.sha256(path)`: a deployed file's sha256, to check it against the host's."""
    return _sha256(_on_board(path))


def _board_read(path: str) -> bytearray:
    """`edgetvm.update.read(path)`: a deployed file's bytes (a test reads the patched manifest back)."""
    return bytearray(_on_board(path).read_bytes())


def register(tvm) -> None:
    tvm.register_global_func("edgetvm.update.apply", _board_apply, override=True)
    tvm.register_global_func("edgetvm.update.put", _board_put, override=True)
    tvm.register_global_func("edgetvm.update.sha256", _board_sha256, override=True)
    tvm.register_global_func("edgetvm.update.read", _board_read, override=True)


def serve(argv: list[str] | None = None) -> None:
    """A TVM RPC server with the functions above registered: what an emulated board runs with
    functions=True (inside the rootfs this file is all of edgetvm it has). As runtime/device_server.py
    does, the listening loop runs in this process, so the registrations are the sessions' too."""
    import argparse

    import tvm
    from tvm.rpc.server import PopenRPCServerState

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tracker")
    parser.add_argument("--key", default="")
    parser.add_argument("--load-library")
    args = parser.parse_args(argv)
    register(tvm)
    tracker = None
    if args.tracker:
        host, port = args.tracker.rsplit(":", 1)
        tracker = (host, int(port))
    state = PopenRPCServerState(args.host, args.port, args.port + 1, tracker_addr=tracker, key=args.key,
                                load_library=args.load_library)
    state.thread.join()


if __name__ == "__main__":
    serve()
