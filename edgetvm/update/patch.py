"""Host side of weight patches: make one (from two artifacts, or from new parameters), read and write patch
files, apply one to an artifact here or on a board over TVM RPC (the format and the atomic application
are runtime/patch.py's, which the board runs too).

    blob = diff(open_artifact(old), open_artifact(new), k=0.01)
    report = apply_local("deployed/", blob)
    report = apply_rpc("deployed", blob, rpc="127.0.0.1:9090")   # bytes on the wire measured by a proxy
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError
from edgetvm.runtime import patch as rpatch
from edgetvm.runtime.artifact import Artifact, open_artifact
from edgetvm.runtime.wire import CountingProxy


def check_k(k: float, flag: str = "-k") -> float:
    if not (isinstance(k, (int, float)) and 0 < k <= 1):
        raise UserError(f"{flag} {k:g} is outside (0, 1]; pass the share of weights to send, e.g. {flag} 0.01")
    return float(k)


def float_weights(art: Artifact) -> dict[str, np.ndarray]:
    """The artifact's float32 weights by name (copies)."""
    return {w["name"]: np.array(a) for w, a in zip(art.manifest["weights"], art.weights()) if w["dtype"] == "float32"}


class WeightMap:
    """Where every value of a compiled artifact's weights comes from among the model's parameters.

    The compiler packs and transposes weights before they are stored (passes/pipeline.py,
    `main_transform_params`), so a conv's filters are stored as, say, `lv3` [2, 288, 16]. Those transforms
    only move values, so each stored value is one parameter value: a partial update of the parameters is a
    partial update of the stored weights at the mapped positions, and the stored weights give back the
    parameters the device holds. Found by running the model's own transform on coded values."""

    def __init__(self, model_path: str | Path, target=None):
        from edgetvm.passes import model_import, pipeline

        model, inputs = model_import.prepare(Path(model_path), None)
        mod, weights = model_import.import_model(model, inputs)
        self.params = {n: w.shape for n, w in zip(pipeline.weight_names(mod), weights)}
        transform, deploy = pipeline.lift_weight_transforms(mod, target=target)  # as compiled for `target`
        self.names = pipeline.weight_names(deploy)
        big = [n for n, w in zip(self.params, weights) if w.size >= 2**24]
        if big:
            raise UserError(f"'{big[0]}' has 2^24 values or more: float32 cannot code its positions; "
                            f"diff two compiled artifacts instead (edgetvm update diff OLD NEW)")
        # Stored value -> (parameter, flat position): two passes of exactly representable codes, 0 for a
        # value no parameter gave (padding).
        run = lambda fill: pipeline.transform_weights(transform, [fill(i, w) for i, w in enumerate(weights)])
        which = run(lambda i, w: np.full(w.shape, i + 1, np.float32))
        where = run(lambda i, w: np.arange(1, w.size + 1, dtype=np.float32).reshape(w.shape))
        self.source = {n: (np.rint(a).astype(np.int64).reshape(-1) - 1, np.rint(b).astype(np.int64).reshape(-1) - 1)
                       for n, a, b in zip(self.names, which, where)}
        rng = np.random.default_rng(0)
        probe = [rng.standard_normal(w.shape).astype(np.float32) for w in weights]
        got = pipeline.transform_weights(transform, probe)
        for n, g in zip(self.names, got):
            if not np.array_equal(g.reshape(-1), self._gather(n, [p.reshape(-1) for p in probe])):
                raise UserError(f"the compiler computes the stored weight '{n}' from the parameters (a folded "
                                f"batch norm?), it does not only move them: diff two compiled artifacts instead "
                                f"(edgetvm update diff OLD NEW)")

    def _gather(self, name: str, flat: list[np.ndarray], fill=0) -> np.ndarray:
        t, pos = self.source[name]
        out = np.full(t.shape, fill, dtype=flat[0].dtype)
        ok = t >= 0
        for i in np.unique(t[ok]):
            sel = t == i
            out[sel] = flat[i][pos[sel]]
        return out

    def stored(self, params: dict[str, np.ndarray], fill=0) -> dict[str, np.ndarray]:
        """The stored weights for these parameters (by the artifact's weight names, flat)."""
        flat = [np.asarray(params[n]).reshape(-1) for n in self.params]
        return {n: self._gather(n, flat, fill) for n in self.names}

    def params_of(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The parameters an artifact holds, from its stored weights (the inverse of `stored`)."""
        order = list(self.params)
        out = {n: np.zeros(int(np.prod(s)), np.float32) for n, s in self.params.items()}
        for n in self.names:
            t, pos = self.source[n]
            v = np.asarray(stored[n]).reshape(-1)
            ok = t >= 0
            for i in np.unique(t[ok]):
                sel = t == i
                out[order[i]][pos[sel]] = v[sel]
        return {n: out[n].reshape(s) for n, s in self.params.items()}


def make_patch(base: Artifact, new: dict[str, np.ndarray], masks: dict[str, np.ndarray] | None = None,
               coding: str = "f32", meta: dict | None = None) -> bytes:
    """A patch that writes `new[name]` into `base`'s weight file where masks[name] is true (everywhere the
    value differs when `masks` is None). The result hash is computed by applying the patch to the base
    bytes here, so 8-bit values are hashed as the device will write them."""
    index = {w["name"]: i for i, w in enumerate(base.manifest["weights"])}
    old = float_weights(base)
    tensors = []
    for name, value in new.items():
        if name not in index or name not in old:
            raise UserError(f"the new weights have '{name}', which {base.path} has no float32 weight of; "
                            f"a patch only updates the same model")
        value = np.asarray(value, np.float32).reshape(-1)
        if value.size != old[name].size:
            raise UserError(f"'{name}' has {value.size} values, {base.path}'s has {old[name].size}: another model")
        sel = value != old[name].reshape(-1) if masks is None else np.asarray(masks[name]).reshape(-1).astype(bool)
        pos = np.flatnonzero(sel)
        if len(pos):
            tensors.append(rpatch.TensorUpdate(index[name], name, pos, value[pos], coding))
    tensors.sort(key=lambda t: t.index)
    base_hash = base.manifest["files"][base.manifest["weights_file"]]
    p = rpatch.Patch(base_hash, "", tensors, meta or {})
    # The values as the device will decode them (q8 rounds), then the file they make.
    decoded = rpatch.decode(rpatch.encode(p))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "w"
        rpatch.write_updated(base.weights_path, out, base.manifest["weights"], decoded)
        p.result = rpatch._sha256(out)
    return rpatch.encode(p)


def select_top(scores: dict[str, np.ndarray], k: float) -> dict[str, np.ndarray]:
    """Masks of the k share of all values with the largest scores (ties broken by position, so the count is
    exactly round(k * n), at least 1)."""
    names = list(scores)
    flat = np.concatenate([np.asarray(scores[n], np.float64).reshape(-1) for n in names])
    n_keep = max(1, int(round(k * flat.size)))
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:n_keep]] = True
    out, start = {}, 0
    for n in names:
        size = np.asarray(scores[n]).size
        out[n] = keep[start:start + size].reshape(np.shape(scores[n]))
        start += size
    return out


def diff(old: Artifact, new: Artifact, k: float, coding: str = "f32") -> bytes:
    """A patch from `old` toward `new` with the k share of all float32 weights that changed most (squared
    change: DPU's global contribution; a model that came out of DPU differs in at most k of its weights, so
    this sends exactly its update). Both artifacts must hold the same model."""
    check_k(k)
    a, b = old.manifest["weights"], new.manifest["weights"]
    if [(w["name"], w["dtype"], w["shape"]) for w in a] != [(w["name"], w["dtype"], w["shape"]) for w in b]:
        raise UserError(f"{old.path} and {new.path} hold different weights (names, types or shapes); a patch "
                        f"updates the same model")
    for w, x, y in zip(a, old.weights(), new.weights()):
        if w["dtype"] != "float32" and not np.array_equal(x, y):
            raise UserError(f"'{w['name']}' ({w['dtype']}) differs; patches carry float32 weights only")
    ow, nw = float_weights(old), float_weights(new)
    masks = select_top({n: (nw[n] - ow[n]) ** 2 for n in ow}, k)
    masks = {n: m & (nw[n] != ow[n]) for n, m in masks.items()}   # unchanged values need not travel
    if not any(m.any() for m in masks.values()):
        raise UserError(f"{new.path} has the same weights as {old.path}; there is nothing to patch")
    return make_patch(old, nw, masks, coding, {"k": k, "from": str(old.path.name), "to": str(new.path.name)})


def read_patch(path: str | Path) -> bytes:
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read patch {path} ({e.strerror}); pass a file made by `edgetvm update diff`") from None
    try:
        rpatch.decode(blob)
    except rpatch.PatchError as e:
        raise UserError(f"{path}: {e}") from None
    return blob


def write_patch(path: str | Path, blob: bytes) -> None:
    path = Path(path)
    if not path.resolve().parent.is_dir():
        raise UserError(f"directory {path.resolve().parent} does not exist; create it or choose another -o")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def apply_local(artifact: str | Path, blob: bytes) -> dict:
    """Apply here; the artifact is checked in full (open_artifact) before and after."""
    art = open_artifact(artifact)
    try:
        report = rpatch.apply_patch(art.path, blob)
    except rpatch.PatchError as e:
        raise UserError(f"patch refused, {artifact} unchanged: {e}") from None
    open_artifact(artifact)
    return report


def remote_functions(session):
    try:
        return {n: session.get_function(f"edgetvm.update.{n}") for n in ("apply", "put", "sha256", "read")}
    except (AttributeError, RuntimeError, ValueError):
        raise UserError("the board's RPC server has no edgetvm.update.apply; start it with "
                        "`python runtime/patch.py --host 0.0.0.0 --port PORT` (or an edgetvm device server)") from None


def apply_rpc(artifact: str, blob: bytes, rpc: str | None = None, tracker: str | None = None,
              key: str | None = None) -> dict:
    """Send the patch to a board and apply it there (edgetvm.update.apply). `artifact` is the deployed
    artifact's directory on the board (relative: under its EDGETVM_DEPLOY_DIR). The session goes through a
    CountingProxy (also for the board a tracker hands out), so the report's `wire_bytes` are measured."""
    from edgetvm.runtime.session import _reachable, connect, parse_address

    proxy = None

    def relay(host: str, port: int) -> tuple[str, int]:
        nonlocal proxy
        proxy = CountingProxy(host, port)
        return "127.0.0.1", proxy.port

    if rpc:
        host, port = parse_address(rpc, "--rpc")
        # The proxy would accept and then fail: check the board itself first, with the usual one-line error.
        _reachable(host, port, "RPC server", "start one on the board with `python runtime/patch.py --host "
                   "0.0.0.0 --port PORT` (or `edgetvm board emulate`)")
    try:
        session = connect(rpc, tracker, key, relay=relay)
        if session is None:
            raise UserError("apply over RPC needs --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
        fns = remote_functions(session)
        before = proxy.counts() if proxy else None
        report = json.loads(fns["apply"](artifact, bytearray(blob)))
        if "error" in report:
            raise UserError(f"the board refused the patch, its artifact unchanged: {report['error']}")
        if proxy:
            after = proxy.counts()
            report["wire_bytes"] = {"sent": after[0] - before[0], "received": after[1] - before[1]}
        report["patch_bytes"] = len(blob)
        return report
    finally:
        if proxy:
            proxy.close()


def deploy_rpc(session, artifact: str | Path, name: str) -> None:
    """Copy an artifact's files to the board, into `name` (relative: under the board's EDGETVM_DEPLOY_DIR,
    default /tmp/edgetvm-deployed), the manifest last."""
    art = open_artifact(artifact)
    put = remote_functions(session)["put"]
    for f in sorted(art.manifest["files"]) + ["manifest.json"]:
        put(f"{name}/{f}", bytearray((art.path / f).read_bytes()))
