"""The swap runtime: run a model block by block with each block's weights mapped in, prefetched and dropped.

Weights are read zero-copy from a private (copy-on-write) mapping of the weight file; a thread
faults the next block's pages in while the current block computes; a finished block's pages
are unmapped (madvise DONTNEED) and, with `drop_cache`, evicted from the page cache too
(posix_fadvise DONTNEED), because a cgroup's memory limit counts the page cache of files its
processes read.

Where the plan leaves room for it, the mapping asks for huge pages (MADV_HUGEPAGE) and the thread
maps each block with MADV_POPULATE_READ: a fault then reads the aligned 2 MiB around it into one
folio and maps it at once. In 4 KiB folios (what POSIX_FADV_WILLNEED and random-access faults
create) mapping 288 MiB took 37 ms and unmapping 12 ms, as long as the dense stack's compute;
in 2 MiB folios about 1 ms each.

A model whose blocks are all small (below COPY_BELOW) is not mapped at all: each block is read
(pread) into one resident staging buffer that its weights' views point into. Mapping costs page-table
work per 4 KiB page (a fault maps 16 at a time, ~0.6 us a page, and unmapping shoots down the other
core's TLB), which for a 120 KiB block is 3x a copy of it: a MobileNet's four 0.12 MiB blocks
cost 165 us per 2.5 ms inference mapped, ~50 us copied.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import tvm
from tvm import relax

from edgetvm.errors import UserError
from edgetvm.runtime.artifact import Artifact
from edgetvm.runtime.session import Timing
from edgetvm.runtime.tensors import checked_inputs, to_tvm

PAGE = mmap.PAGESIZE
READ_PIECE = 2 << 20
HUGE = 2 << 20            # a PMD folio: the most the page cache may hold beyond each end of a range
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
THREAD_MIN = 1 << 20      # bytes of weights worth prefetching from the thread
COPY_BELOW = 1 << 20      # a model whose blocks are all smaller is copied in, not mapped
READERS = 4               # disk reads in flight at once for a block read from disk in 2 MiB folios
MADV_POPULATE_READ = 22   # Linux >= 5.14; Python's mmap has no name for it

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
M_MMAP_THRESHOLD = -3     # mallopt: allocations from this size on are mapped, and unmapped when freed
MMAP_THRESHOLD = 64 << 10


def _page_range(offset: int, nbytes: int) -> tuple[int, int]:
    lo = offset // PAGE * PAGE
    hi = -(-(offset + nbytes) // PAGE) * PAGE
    return lo, hi - lo


class Step(NamedTuple):
    """One block of a run, resolved once: its function, the values it reads and writes, those it is the
    last to read, and whether the prefetch thread maps it."""
    fn: object
    inputs: list
    outputs: list
    dead: list
    threaded: bool


def vm_hwm_bytes() -> int:
    """Peak resident set of this process (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class SwapRunner:
    """Runs a swapping artifact: `block_0 .. block_{k-1}` in order, weights swapped per block."""

    def __init__(self, art: Artifact, prefetch: bool | None = None, drop_cache: bool = True):
        if "swap" not in art.manifest:
            raise UserError(f"{art.path} is not a swapping build; compile with --memory-budget")
        self.plan = art.manifest["swap"]
        # A plan made without prefetch only fits the budget with one block resident at a time.
        prefetch = self.plan["prefetch"] if prefetch is None else prefetch and self.plan["prefetch"]
        self.art, self.prefetch, self.drop_cache = art, prefetch, drop_cache
        self.index = art.manifest["weights"]
        self.dev = tvm.cpu()
        # The pooled allocator keeps every storage a block ever allocated for the next call, so the
        # activations of all blocks stay resident together (the MobileNet at 4x: 1.5 MiB kept for
        # 0.9 planned). The naive one frees each block's storage when the block returns, and a fixed
        # mmap threshold makes glibc hand those buffers back to the kernel (its moving threshold
        # would move freed sizes onto the heap, which it keeps).
        _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(art.library)), self.dev, memory_cfg="naive")
        self.fd = os.open(art.weights_path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # No readahead on this mapping: it pulls neighbouring blocks' pages in (this machine reads
        # ahead 8 MiB), which a budget cannot afford. Prefetch reads exactly.
        self.mm.madvise(mmap.MADV_RANDOM)
        self.bytes = np.frombuffer(self.mm, dtype=np.uint8)  # writable: DLPack refuses read-only memory
        # With huge pages a fault reads (only) the aligned 2 MiB around it, even under MADV_RANDOM.
        # Blocks k and k+1 resident together then hold up to 2 MiB more page cache at each end of
        # their span: where the page cache counts (drop_cache), only if the plan has that to spare.
        # The resident set is unchanged: only the block's own pages are mapped. (VGG at 4x with its
        # 0.1 MiB of slack, page cache kept: 1.07x in-memory latency in 2 MiB folios, 1.16x in 4 KiB.)
        # Blocks smaller than a folio gain nothing from it: mapping them by touch, 16 pages a fault,
        # is cheaper (a MobileNet's 0.1 MiB blocks: 1.49x vs 1.35x).
        slack = self.plan["budget"] - self.plan["predicted_peak"]
        largest = max((b["range"][1] for b in self.plan["blocks"]), default=0)
        self.huge = (slack >= 2 * HUGE or not drop_cache) and largest >= HUGE and self._madvise(
            MADV_HUGEPAGE, 0, size) and self._madvise(MADV_POPULATE_READ, 0, 0)
        # Copying needs the staging buffer besides the page cache a cold read fills (dropped right
        # after): with drop_cache, only where the plan has a block's worth to spare.
        self.copy = largest < COPY_BELOW and (not drop_cache or slack >= largest)
        if self.copy:
            raw = np.empty(largest + PAGE, dtype=np.uint8)
            start = -raw.ctypes.data % PAGE  # page-aligned, so every weight keeps the file's 64-byte alignment
            self.staging = raw[start:start + largest]
            # Reads get no readahead either: it would leave the next blocks' pages in the page cache.
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
            prefetch = False  # every block is below THREAD_MIN: none would be handed to the thread
        self.prefetch = prefetch
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="swap-prefetch") if prefetch else None
        # A populate reads one 2 MiB folio after another, each a synchronous disk read: with the page
        # cache dropped per block, a block's pieces are read by several threads at once (32 MiB from
        # this VM's disk: 12-40 ms from one thread, 8-15 ms from four). Cached pages need no disk, and
        # mapping them is CPU work that would only compete with the kernels.
        self.readers = (ThreadPoolExecutor(READERS, thread_name_prefix="swap-read")
                        if self.huge and drop_cache and not self.copy else None)
        # Views of the mapping (or of the staging buffer) stay valid while pages come and go: make them
        # once (a MobileNet has ~100 weights; wrapping them per call cost 0.9 ms of a 3 ms inference).
        self.block_weights = [[tvm.runtime.from_dlpack(self._view(self.index[w], b)) for w in b["weights"]]
                              for b in self.plan["blocks"]]
        self.names = [i.name for i in art.inputs]
        self.block_seconds: list[float] = [0.0] * len(self.plan["blocks"])
        self.steps = self._schedule()

    def close(self) -> None:
        for pool in (self.pool, self.readers):
            if pool:
                pool.shutdown()
        # The views export the mapping's buffer, which must be released to close it.
        self.block_weights, self.staging, self.steps = [], None, []
        del self.bytes
        self.mm.close()
        os.close(self.fd)

    def _view(self, w: dict, block: dict) -> np.ndarray:
        buf, off = (self.staging, w["offset"] - block["range"][0]) if self.copy else (self.bytes, w["offset"])
        return buf[off:off + w["nbytes"]].view(w["dtype"]).reshape(w["shape"])

    def _madvise(self, advice: int, lo: int, ln: int) -> bool:
        """madvise through ctypes, which lets go of the GIL while a populate waits for the disk."""
        return _libc.madvise(ctypes.c_void_p(self.bytes.ctypes.data + lo), ln, advice) == 0

    def _touch(self, block: dict) -> None:
        """Read the block's pages and map them, from the prefetch thread."""
        off, n = block["range"]
        if not n:
            return
        if self.copy:
            self._read(off, n)
            return
        lo, ln = _page_range(off, n)
        if self.huge:
            # Not WILLNEED first: it would fill the page cache with 4 KiB folios.
            if self.readers is not None and ln > HUGE:
                piece = -(-ln // READERS // HUGE) * HUGE
                list(self.readers.map(lambda a: self._populate(a, min(piece, lo + ln - a)), range(lo, lo + ln, piece)))
            else:
                self._populate(lo, ln)
            return
        # The kernel caps one WILLNEED at a readahead window: ask piece by piece.
        for start in range(lo, lo + ln, READ_PIECE):
            os.posix_fadvise(self.fd, start, min(READ_PIECE, lo + ln - start), os.POSIX_FADV_WILLNEED)
        # One read per page maps them all; numpy's loop releases the GIL. (MADV_POPULATE_READ was
        # slower here: 3.1x vs 2.3x in-memory latency, interleaved in one process, /tmp/probe/ab.py.)
        int(self.bytes[lo:lo + ln:PAGE].sum(dtype=np.uint64))

    def _populate(self, lo: int, ln: int) -> None:
        if not self._madvise(MADV_POPULATE_READ, lo, ln):
            raise OSError(ctypes.get_errno(), f"madvise(MADV_POPULATE_READ) on {self.art.weights_path}")

    def _read(self, off: int, n: int) -> None:
        view, done = memoryview(self.staging[:n]), 0
        while done < n:
            got = os.preadv(self.fd, [view[done:]], off + done)
            if got <= 0:
                raise UserError(f"{self.art.weights_path} ends before its block at {off + done}; recompile the "
                                f"artifact")
            done += got
        if self.drop_cache:
            lo, ln = _page_range(off, n)
            os.posix_fadvise(self.fd, lo, ln, os.POSIX_FADV_DONTNEED)

    def _swap(self, done: dict | None, nxt: dict) -> None:
        """Unmap a finished block, then map the next one."""
        if done is not None:
            self._release(done)
        self._touch(nxt)

    def _release(self, block: dict) -> None:
        off, n = block["range"]
        if not n or self.copy:  # the next block's read overwrites the staging buffer
            return
        lo, ln = _page_range(off, n)
        self.mm.madvise(mmap.MADV_DONTNEED, lo, ln)
        if self.drop_cache:
            if self.huge:
                # The kernel evicts no folio that reaches outside the range: take in the 2 MiB folios
                # this block shares with its neighbours. The next block's is still mapped, so it stays.
                lo, ln = lo // HUGE * HUGE, -(-(lo + ln) // HUGE) * HUGE - lo // HUGE * HUGE
            os.posix_fadvise(self.fd, lo, ln, os.POSIX_FADV_DONTNEED)

    def drop_page_cache(self) -> None:
        """Evict the whole weight file from the page cache (a cold start)."""
        self.mm.madvise(mmap.MADV_DONTNEED, 0, len(self.mm))
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _values(self, inputs: dict[str, np.ndarray]) -> dict:
        return {name: to_tvm(x, self.dev)
                for name, x in zip(self.plan["data_inputs"], checked_inputs(self.art.inputs, inputs))}

    def _schedule(self) -> list[Step]:
        blocks = self.plan["blocks"]
        last_use = {}
        for k, b in enumerate(blocks):
            for v in b["inputs"]:
                last_use[v] = k
        # A block below THREAD_MIN is mapped just before it runs: handing it to the thread and back
        # costs more than mapping it (a MobileNet's blocks: 1.38x vs 1.58x in-memory latency).
        return [Step(self.vm[b["function"]], b["inputs"], b["outputs"],
                     [v for v in b["inputs"] if last_use[v] == k and v not in self.plan["outputs"]],
                     self.prefetch and b["range"][1] >= THREAD_MIN) for k, b in enumerate(blocks)]

    def _forward(self, values: dict):
        blocks = self.plan["blocks"]
        steps = self.steps
        pending = self.pool.submit(self._swap, None, blocks[0]) if steps[0].threaded else None
        stale = None  # the block that finished last, still mapped
        for k, (fn, ins, outs, dead, _) in enumerate(steps):
            b = blocks[k]
            if pending is not None:
                pending.result()
            else:
                self._touch(b)  # one sweep rather than a synchronous 4 KiB read per fault
            # The thread unmaps the finished block and then maps the next, in that order, so two
            # blocks are resident at most; unmapping there keeps its TLB shootdown off this thread
            # (dense stack at 4x under the old strip GEMV schedule: 1.16x -> 1.13x in-memory latency;
            # under the current one the two orders measured alike).
            if k + 1 < len(blocks) and steps[k + 1].threaded:
                pending, stale = self.pool.submit(self._swap, stale, blocks[k + 1]), None
            else:
                pending = None
                if stale is not None:
                    self._release(stale)
                    stale = None
            t = time.perf_counter()
            out = fn(*[values[v] for v in ins], *self.block_weights[k])
            self.block_seconds[k] += time.perf_counter() - t
            for name, val in zip(outs, out):
                values[name] = val
            del out
            for v in dead:  # each value is dropped after the last block that reads it
                values.pop(v, None)
            if self.prefetch:
                stale = b
            else:
                self._release(b)  # a plan without prefetch holds one block at a time
        if pending is not None:
            pending.result()
        if stale is not None:
            self._release(stale)
        if self.drop_cache:
            # Pages still in flight or in a per-CPU LRU batch at their block's release escaped it.
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return values

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._forward(self._values(inputs))
        outs = []
        for name in self.plan["outputs"]:
            v = values[name]
            outs += [t for t in v] if not isinstance(v, tvm.runtime.Tensor) else [v]
        return {info.name: o.numpy() for info, o in zip(self.art.outputs, outs)}

    def time(self, inputs: dict[str, np.ndarray], repeat: int = 10, cold: bool = False) -> Timing:
        values = self._values(inputs)
        self._forward(dict(values))  # warm-up
        seconds = []
        for _ in range(repeat):
            if cold:
                self.drop_page_cache()
            t = time.perf_counter()
            self._forward(dict(values))
            seconds.append(time.perf_counter() - t)
        return Timing(seconds)

    def describe(self) -> str:
        """How this runner brings weights in, in words (for `edgetvm run --report`)."""
        if self.copy:
            return f"read (pread) into one {self.staging.nbytes / 2**20:.2f} MiB staging buffer, block by block"
        how = "mapped in 2 MiB pages" if self.huge else "mapped in 4 KiB pages"
        if self.prefetch:
            how += f", the next block (from {THREAD_MIN >> 20} MiB) by a thread while one computes"
        if self.readers is not None:
            how += f", read from disk by {READERS} threads"
        return how + (", page cache dropped per block" if self.drop_cache else ", page cache kept")

    def report(self) -> list[dict]:
        return [{"function": b["function"], "weights": b["weight_bytes"], "activations": b["act_bytes"],
                 "planned": b["planned_bytes"]} for b in self.plan["blocks"]]
