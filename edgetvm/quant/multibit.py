"""Multi-bit weights: each group of a weight row stored as a sum of binary bases, w_g = sum_i alpha_i * b_i.

A quantised weight is viewed as rows (one per output: a linear layer's column, a conv's filter flattened
as (C, KH, KW)), each cut into groups of `group` consecutive weights along the reduction axis (the last
group of a row may be shorter). A group holds up to `max_bases` bases b_i in {-1, +1}^group with
coefficients alpha_i >= 0; `active` says which exist, so a group can have none at all (its weights are
0, it costs no bits). ALQ, BWN (one basis) and uniform 2-bit (two bases, alphas s/2 and s) are all this
form, and all compile into the same bit-packed kernels (passes/alq.py).

Packed form (what an artifact stores, `pack` / `unpack`):
  nbases  uint8   (rows, groups)          bases per group, 0 = an empty group
  words   uint32  (n_bases, group / 32)   bit j of a basis is 1 where b_j = +1, in (row, group, basis) order
  alpha   float16 (n_bases,)              the coefficients, same order
so a weight costs (bases of its group) bits plus, per group, 8 bits and 16 per basis: with groups of 64
at 0.4 average bits, 0.4 + 0.125 + 0.1 bits, 1/51 of float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgetvm.errors import UserError

WORD = 32


def rows_of(name: str, w: np.ndarray) -> np.ndarray:
    """The weight as (outputs, reduction) rows: train.py's linear weights are (in, out), convs OIHW."""
    if w.ndim == 2:
        return np.ascontiguousarray(w.T)
    if w.ndim == 4:
        return w.reshape(w.shape[0], -1)
    raise ValueError(f"{name}: a {w.ndim}-d weight is neither a linear layer's nor a conv's")


def from_rows(shape: tuple[int, ...], rows: np.ndarray) -> np.ndarray:
    if len(shape) == 2:
        return np.ascontiguousarray(rows.T)
    return rows.reshape(shape)


@dataclass
class MultiBit:
    """One weight tensor in multi-bit form."""
    name: str
    shape: tuple[int, ...]      # as the model holds it
    group: int                  # weights per group (a multiple of 32 for the packed words)
    bases: np.ndarray           # int8 (rows, groups, max_bases, group), +-1; padding positions are +1
    alpha: np.ndarray           # float32 (rows, groups, max_bases), >= 0, 0 where not active
    active: np.ndarray          # bool (rows, groups, max_bases)

    @property
    def rows(self) -> int:
        return self.bases.shape[0]

    @property
    def k(self) -> int:
        return int(np.prod(self.shape)) // self.rows

    @property
    def n_groups(self) -> int:
        return self.bases.shape[1]

    @property
    def max_bases(self) -> int:
        return self.bases.shape[2]

    def valid(self) -> np.ndarray:
        """float32 (groups, group): 1 at real weights, 0 at the last group's padding."""
        return valid_mask(self.k, self.group)

    def group_sizes(self) -> np.ndarray:
        return self.valid().sum(axis=1)

    def reconstruct_rows(self) -> np.ndarray:
        """(rows, groups, group) float32: sum of the active bases times their alphas (0 at padding)."""
        a = (self.alpha * self.active)[..., None]
        return (a * self.bases).sum(axis=2, dtype=np.float32) * self.valid()

    def weight(self) -> np.ndarray:
        r = self.reconstruct_rows().reshape(self.rows, -1)[:, :self.k]
        return from_rows(self.shape, np.ascontiguousarray(r, dtype=np.float32))

    def bits(self) -> int:
        """One bit per weight per basis of its group (padding is not counted)."""
        return int((self.active.sum(axis=2) * self.group_sizes()[None, :]).sum())

    def n_weights(self) -> int:
        return int(np.prod(self.shape))

    def normalise(self) -> None:
        """Coefficients non-negative (a negative one flips its basis); inactive ones zero."""
        neg = self.alpha < 0
        self.alpha = np.where(neg, -self.alpha, self.alpha).astype(np.float32)
        self.bases = np.where(neg[..., None], -self.bases, self.bases).astype(np.int8)
        self.alpha *= self.active


def valid_mask(k: int, group: int) -> np.ndarray:
    n_groups = -(-k // group)
    return (np.arange(n_groups * group).reshape(n_groups, group) < k).astype(np.float32)


def grouped(rows: np.ndarray, group: int) -> np.ndarray:
    """(rows, k) -> (rows, groups, group), zero-padded."""
    n, k = rows.shape
    n_groups = -(-k // group)
    out = np.zeros((n, n_groups * group), rows.dtype)
    out[:, :k] = rows
    return out.reshape(n, n_groups, group)


def check_group(group: int) -> int:
    if group <= 0 or group % WORD:
        raise UserError(f"group size {group} is not a positive multiple of {WORD}; use 32, 64 or 128")
    return group


def sketch(name: str, w: np.ndarray, group: int, max_bases: int, rel_tol: float = 1e-6) -> MultiBit:
    """Structured sketching (ALQ's initialisation): per group, greedily binarise the residual and refit
    all coefficients so far by least squares, up to `max_bases` bases or until the residual vanishes."""
    check_group(group)
    target = grouped(rows_of(name, w).astype(np.float64), group)            # (R, G, n)
    valid = valid_mask(rows_of(name, w).shape[1], group).astype(np.float64)  # (G, n)
    R, G, n = target.shape
    bases = np.ones((R, G, max_bases, n), np.int8)
    alpha = np.zeros((R, G, max_bases))
    active = np.zeros((R, G, max_bases), bool)
    norm0 = (target ** 2).sum(axis=2)
    res = target.copy()
    for i in range(max_bases):
        going = (res ** 2).sum(axis=2) > rel_tol * norm0                  # (R, G)
        if not going.any():
            break
        bases[:, :, i] = np.where(res >= 0, 1, -1)
        active[:, :, i] = going
        B = bases[:, :, :i + 1].astype(np.float64) * valid[None, :, None, :]     # (R, G, i+1, n)
        on = active[:, :, :i + 1]
        gram = B @ B.transpose(0, 1, 3, 2)
        gram += np.eye(i + 1) * (~on)[..., None] + np.eye(i + 1) * 1e-9   # inactive ones: alpha 0
        rhs = (B @ target[..., None])[..., 0] * on
        alpha[:, :, :i + 1] = np.linalg.solve(gram, rhs[..., None])[..., 0] * on
        res = target - (alpha[:, :, :i + 1, None] * B).sum(axis=2)
    mb = MultiBit(name, tuple(w.shape), group, bases, alpha.astype(np.float32), active)
    mb.normalise()
    return mb


def from_levels(name: str, w: np.ndarray, group: int, alphas: np.ndarray, bases: np.ndarray) -> MultiBit:
    """A MultiBit from explicit per-group coefficients (R, G, M) and bases (R, G, M, n): the baselines."""
    active = np.ones(alphas.shape, bool)
    mb = MultiBit(name, tuple(w.shape), group, bases.astype(np.int8), alphas.astype(np.float32), active)
    mb.normalise()
    return mb


# ---- packing ---------------------------------------------------------------------------------------------


def pack(mb: MultiBit) -> dict[str, np.ndarray]:
    """The bit-packed form of the module docstring (the artifact's storage)."""
    nbases = mb.active.sum(axis=2).astype(np.uint8)
    sel = mb.active                                                   # (R, G, M), row-major = (r, g, i) order
    signs = mb.bases[sel]                                             # (n_bases, group)
    # the word count from the group, not from the data: a layer whose bases were all pruned has none
    bits = (signs > 0).astype(np.uint64).reshape(len(signs), mb.group // WORD, WORD)
    words = (bits << np.arange(WORD, dtype=np.uint64)).sum(axis=2).astype(np.uint32)
    return {"nbases": nbases, "words": np.ascontiguousarray(words),
            "alpha": mb.alpha[sel].astype(np.float16), "shape": np.array(mb.shape, np.int64),
            "group": np.array(mb.group, np.int64)}


def unpack(packed: dict[str, np.ndarray]) -> np.ndarray:
    """The float32 weight a packed tensor stands for (alphas as stored, float16): the numpy reference."""
    shape = tuple(int(s) for s in packed["shape"])
    group = int(packed["group"])
    nbases = packed["nbases"]
    R, G = nbases.shape
    k = int(np.prod(shape)) // R
    words = packed["words"].astype(np.uint64)
    bits = (words[:, :, None] >> np.arange(WORD, dtype=np.uint64)) & 1
    signs = np.where(bits.reshape(len(words), group) == 1, 1.0, -1.0).astype(np.float32)
    terms = signs * packed["alpha"].astype(np.float32)[:, None]
    # the terms in (row, group, basis) order: add each group's consecutive bases
    owner = np.repeat(np.arange(R * G), nbases.reshape(-1).astype(np.int64))
    out = np.zeros((R * G, group), np.float32)
    np.add.at(out, owner, terms)
    rows = out.reshape(R, G * group)[:, :k]
    return from_rows(shape, np.ascontiguousarray(rows))


def packed_bytes(packed: dict[str, np.ndarray]) -> int:
    return sum(packed[k].nbytes for k in ("nbases", "words", "alpha"))


# ---- in an ONNX file -------------------------------------------------------------------------------------

METADATA_KEY = "edgetvm.multibit"


def to_metadata(packed: dict[str, dict[str, np.ndarray]]) -> str:
    """The packed weights of a model as one JSON string (an ONNX metadata_props value), by weight name."""
    import base64
    import json

    return json.dumps({name: {f: {"dtype": str(a.dtype), "shape": list(a.shape),
                                  "data": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()}
                              for f, a in p.items()} for name, p in packed.items()})


def from_metadata(text: str) -> dict[str, dict[str, np.ndarray]]:
    import base64
    import json

    out = {}
    for name, fields in json.loads(text).items():
        out[name] = {f: np.frombuffer(base64.b64decode(d["data"]), dtype=d["dtype"]).reshape(d["shape"]).copy()
                     for f, d in fields.items()}
    return out
