"""numpy arrays as TVM takes them: one place that keeps their shape, dtype and bytes exact.

`np.ascontiguousarray` returns a 0-d array as 1-d, and TVM refuses big-endian dtypes and copies a
non-contiguous array's raw buffer: every tensor that enters TVM or a weight file passes through here.
"""

from __future__ import annotations

import numpy as np

from edgetvm.errors import UserError

# What TVM's runtime and the compiled kernels take; numpy's other kinds (objects, strings,
# complex, datetimes) have no TVM dtype.
_KINDS = "biuf"


def native(a) -> np.ndarray:
    """`a` as a C-contiguous array in this machine's byte order, with its shape (0-d included) and values."""
    a = np.asarray(a)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return np.require(a, requirements="C")


def to_tvm(a, dev=None):
    """A TVM tensor holding a copy of `a` on `dev` (this machine's CPU by default)."""
    import tvm

    return tvm.runtime.tensor(native(a), dev if dev is not None else tvm.cpu())


def checked_inputs(infos, inputs: dict) -> list[np.ndarray]:
    """The model's inputs in its order, each checked against the shape and dtype it was compiled for."""
    unknown = set(inputs) - {i.name for i in infos}
    if unknown:
        raise UserError(f"the model has no input named {', '.join(sorted(unknown))}; its inputs are "
                        f"{', '.join(i.name for i in infos)}")
    out = []
    for info in infos:
        if info.name not in inputs:
            raise UserError(f"input '{info.name}' is missing; pass it with --input {info.name}=FILE.npy "
                            f"({_describe(info.dtype, info.shape)})")
        x = np.asarray(inputs[info.name])
        if x.dtype.kind not in _KINDS or tuple(x.shape) != tuple(info.shape) or x.dtype.name != info.dtype:
            raise UserError(f"input '{info.name}' is {_describe(x.dtype.name, x.shape)} but the model was "
                            f"compiled for {_describe(info.dtype, info.shape)}; pass an array of that shape and "
                            f"dtype or recompile with --input-shape")
        out.append(native(x))
    return out


def _describe(dtype: str, shape) -> str:
    return f"{dtype}[{','.join(map(str, shape))}]" + (" (a scalar)" if len(shape) == 0 else "")
