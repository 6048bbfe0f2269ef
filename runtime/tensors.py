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


RPC_SESS_MASK = 128   # TVM marks a device on the far end of an RPC session by adding this to its type


def to_numpy(t) -> np.ndarray:
    """A TVM tensor's values as a numpy array here. One on a board is copied into a tensor on this machine
    first: `numpy()` of a remote tensor adds a stream sync, a third round trip over the link where the
    copy takes two (3 -> 2 TCP segments each way, 2.9 ms -> 1.9 ms for 8 bytes at 1 Mbit/s)."""
    import tvm

    if int(t.device.dlpack_device_type()) < RPC_SESS_MASK:
        return t.numpy()
    host = tvm.runtime.empty(tuple(t.shape), t.dtype, tvm.cpu())
    t.copyto(host)
    return host.numpy()


# An array of at least this many elements whose zero elements would shrink it by at least 1/8 travels
# as a bitmap of its nonzero elements and their values: TVM 0.27's RPC moves a bytes argument one byte
# at a time (support::Stream::WriteArray/ReadArray, a ring-buffer call per byte: about 13 ns of CPU per
# byte on each end, docs/pipeline.md), so every zero byte not sent is CPU a quota-bound device keeps.
# ReLU activations and their gradients are 30-60% zeros.
SPARSE_MIN_ELEMENTS = 256


def _sparse_bits(a: np.ndarray):
    """(bitmap of a's nonzero elements, its nonzero elements) when they are smaller than a by 1/8, else None."""
    if a.size < SPARSE_MIN_ELEMENTS or a.dtype.kind not in _KINDS or a.dtype.itemsize not in (1, 2, 4, 8):
        return None
    flat = a.reshape(-1)
    # the bits, not the values: -0.0 and NaN payloads must survive exactly
    nz = flat.view(f"u{a.itemsize}") != 0
    kept = int(np.count_nonzero(nz))
    if (a.size + 7) // 8 + kept * a.itemsize > a.nbytes * 7 // 8:
        return None
    return np.packbits(nz), flat[nz]


def pack(arrays) -> bytes:
    """Arrays as one bytes value, for an RPC call's single argument: u32 header length, the JSON header
    [[shape, dtype, nonzero count or -1], ...], then each array's bytes, or, for an array with enough
    zeros, the bitmap of its nonzero elements and their values. (A TVM tensor made on the receiving
    session costs two round trips, allocate and copy, before the call's own; one bytes argument travels
    in the call.)"""
    import json

    arrays = [native(a) for a in arrays]
    head, body = [], []
    for a in arrays:
        sparse = _sparse_bits(a)
        if sparse is None:
            head.append([list(a.shape), a.dtype.str, -1])
            body.append(memoryview(a.reshape(-1)).cast("B"))
        else:
            head.append([list(a.shape), a.dtype.str, int(sparse[1].size)])
            body += [memoryview(sparse[0]), memoryview(sparse[1]).cast("B")]
    head = json.dumps(head).encode()
    return b"".join([len(head).to_bytes(4, "little"), head, *body])


def unpack(blob, own: bool = False) -> list[np.ndarray]:
    """The arrays of a `pack`ed blob: dense ones as read-only views of it (no copy) unless `own`; sparse
    ones are always new arrays."""
    import json

    blob = memoryview(blob)
    n = int.from_bytes(blob[:4], "little")
    off, out = 4 + n, []
    for shape, dtype, kept in json.loads(bytes(blob[4:off])):
        size = int(np.prod(shape, dtype=np.int64))
        if kept < 0:
            a = np.frombuffer(blob, dtype, size, off).reshape(shape)
            off += a.nbytes
            if own:
                a = a.copy()
        else:
            nbits = (size + 7) // 8
            nz = np.unpackbits(np.frombuffer(blob, np.uint8, nbits, off), count=size).view(bool)
            off += nbits
            a = np.zeros(size, dtype)
            vals = np.frombuffer(blob, dtype, kept, off)
            a[nz] = vals
            off += vals.nbytes
            a = a.reshape(shape)
        out.append(a)
    return out


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


def load_npy(path) -> np.ndarray:
    """The array in a .npy file, or a UserError naming what is wrong with the file.

    The header is checked against the file's size first: numpy allocates what a header declares
    before it reads, so a damaged header asking for terabytes would end in a MemoryError.
    """
    import os

    from numpy.lib import format as npy

    what = f"cannot read {path} as a .npy array"
    fix = "save it with numpy.save (allow_pickle=False)"
    try:
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise UserError(f"{path} is an .npz archive, not a .npy array; save each input with numpy.save")
            f.seek(0)
            version = npy.read_magic(f)
            if version in ((1, 0), (2, 0)):
                read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                shape, _, dtype = read(f)
                need = dtype.itemsize * int(np.prod(shape, dtype=object)) if dtype.itemsize else 0
                have = os.fstat(f.fileno()).st_size - f.tell()
                if dtype.kind != "O" and need > have:
                    raise UserError(f"{what}: its header declares {dtype}[{','.join(map(str, shape))}] "
                                    f"({need} bytes) but {have} bytes follow; the file is truncated or damaged: {fix}")
        return np.load(path, allow_pickle=False)
    except UserError:
        raise
    except (OSError, ValueError, EOFError, MemoryError) as e:  # EOFError: an empty file
        raise UserError(f"{what} ({_first_line(e)}); {fix}") from None


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def _describe(dtype: str, shape) -> str:
    return f"{dtype}[{','.join(map(str, shape))}]" + (" (a scalar)" if len(shape) == 0 else "")
