"""Nested row-based sparsity (DRESS): one weight store, K subnets that each keep a prefix of every row.

A weight is viewed as rows (edgetvm/quant/multibit.py's `rows_of`: one per output, over its reduction
axis). Each row's entries are ranked by importance (magnitude); subnet k keeps the first n_k ranks of
every row, n_k = round((1 - s_k) * K) for its sparsity s_k. Because all subnets read one ranking, a
sparser subnet's weights are a subset of a denser one's (nested), and every row of a subnet has the same
number of nonzeros (row-balanced: the kernels' work is even across rows and falls with n_k).

Stored form (what the compiler turns into kernel arguments, passes/sparse.py), rows in blocks of LANES:
  idx    int16 or int32  (Rp / LANES, n_0, LANES)   idx[b, j, l]: column of row b*LANES+l's rank-j entry
  val    float32         (Rp / LANES, n_0, LANES)   its value
  counts int32           (K,)                        n_k per subnet
Within a block the ranks are contiguous (rank j of the block's LANES rows together), so subnet k reads
the first n_k * LANES entries of every block: one contiguous prefix per block, n_k / n_0 of the store,
and a kernel walks memory forwards. Rows are padded to Rp (a multiple of LANES) with zero values;
indices are int16 when every row is shorter than 32768 (6 bytes per kept weight instead of 8).
"""

from __future__ import annotations

import numpy as np

from edgetvm.errors import UserError
from edgetvm.quant.multibit import from_rows, rows_of

LANES = 16      # rows per vector in the kernels; the store pads rows to a multiple of it


def check_levels(levels) -> tuple[float, ...]:
    """Sparsity levels as given on the command line: each in [0, 1), strictly increasing."""
    try:
        levels = tuple(float(s) for s in levels)
    except (TypeError, ValueError):
        raise UserError(f"sparsity levels {levels!r} are not numbers; pass e.g. 0,0.5,0.7,0.9") from None
    if not levels:
        raise UserError("no sparsity levels given; pass e.g. --levels 0,0.5,0.7,0.9")
    bad = [s for s in levels if not 0 <= s < 1]
    if bad:
        raise UserError(f"sparsity level {bad[0]:g} is outside [0, 1); pass fractions of zeros such as 0,0.5,0.9")
    if any(b <= a for a, b in zip(levels, levels[1:])):
        raise UserError(f"sparsity levels {','.join(f'{s:g}' for s in levels)} are not increasing; list them "
                        "densest first, e.g. 0,0.5,0.7,0.9")
    return levels


def keep_counts(k: int, levels) -> np.ndarray:
    """n_s per level for rows of k entries: at least one entry per row, never more than k."""
    return np.array([min(k, max(1, int(round((1 - s) * k)))) for s in levels], np.int32)


def ranking(name: str, w: np.ndarray) -> np.ndarray:
    """int32 (rows, k): each row's columns, most important (largest magnitude) first; ties by column."""
    r = np.abs(rows_of(name, w))
    return np.argsort(-r, axis=1, kind="stable").astype(np.int32)


def masks(name: str, w: np.ndarray, levels, order: np.ndarray | None = None) -> list[np.ndarray]:
    """One float32 0/1 mask per level, shaped as w: subnet k keeps the first n_k ranks of every row."""
    order = ranking(name, w) if order is None else order
    rows, k = order.shape
    out = []
    for n in keep_counts(k, levels):
        m = np.zeros((rows, k), np.float32)
        np.put_along_axis(m, order[:, :n], 1.0, axis=1)
        out.append(from_rows(tuple(w.shape), m))
    return out


def store(name: str, w: np.ndarray, levels, order: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The blocked rank-major store of the module docstring for weight w (its values as w holds them)."""
    order = ranking(name, w) if order is None else order
    rows = rows_of(name, w).astype(np.float32)
    R, k = order.shape
    counts = keep_counts(k, levels)
    n0 = int(counts[0])
    Rp = -(-R // LANES) * LANES
    idx = np.zeros((Rp, n0), np.int16 if k < 2**15 else np.int32)
    val = np.zeros((Rp, n0), np.float32)
    idx[:R] = order[:, :n0]
    val[:R] = np.take_along_axis(rows, order[:, :n0], axis=1)
    blocked = lambda a: np.ascontiguousarray(a.reshape(Rp // LANES, LANES, n0).transpose(0, 2, 1))  # noqa: E731
    return {"idx": blocked(idx), "val": blocked(val), "counts": counts, "shape": np.array(w.shape, np.int64)}


def _by_row(a: np.ndarray) -> np.ndarray:
    """(Rp / LANES, n_0, LANES) -> (Rp, n_0)."""
    B, n0, lanes = a.shape
    return a.transpose(0, 2, 1).reshape(B * lanes, n0)


def from_store(s: dict[str, np.ndarray], level: int) -> np.ndarray:
    """The dense weight subnet `level` computes with (zeros where it keeps nothing): the numpy reference."""
    shape = tuple(int(d) for d in s["shape"])
    R = shape[0] if len(shape) == 4 else shape[1]
    k = int(np.prod(shape)) // R
    n = int(s["counts"][level])
    rows = np.zeros((R, k), np.float32)
    np.put_along_axis(rows, _by_row(s["idx"])[:R, :n].astype(np.int64), _by_row(s["val"])[:R, :n], axis=1)
    return from_rows(shape, rows)


def store_bytes(s: dict[str, np.ndarray], level: int | None = None) -> int:
    """Bytes of the store subnet `level` reads (its prefix), or of the whole store."""
    B, n0, lanes = s["idx"].shape
    n = n0 if level is None else int(s["counts"][level])
    return n * B * lanes * (s["idx"].itemsize + s["val"].itemsize) + s["counts"].nbytes


# ---- in an ONNX file -------------------------------------------------------------------------------------

METADATA_KEY = "edgetvm.dress"


def to_metadata(levels, orders: dict[str, np.ndarray], accuracy: list[float] | None = None) -> str:
    """The subnets of a model as one JSON string (an ONNX metadata_props value): levels, per-subnet test
    accuracy, and per sparse weight its ranking (the values stay the model's own weights)."""
    import json

    from edgetvm.quant import multibit

    return json.dumps({"levels": list(levels), "accuracy": list(accuracy or []),
                       "orders": json.loads(multibit.to_metadata({n: {"order": o} for n, o in orders.items()}))})


def from_metadata(text: str) -> tuple[tuple[float, ...], list[float], dict[str, np.ndarray]]:
    import json

    from edgetvm.quant import multibit

    d = json.loads(text)
    orders = {n: f["order"] for n, f in multibit.from_metadata(json.dumps(d["orders"])).items()}
    return check_levels(d["levels"]), [float(a) for a in d.get("accuracy", [])], orders
