"""SwapNet: swapped / in-memory latency and peak memory under a budget, measured side by side in one run.

    python bench/swap.py [--models dense_stack,vgg,ocr_cls] [--ratios 2,4,6] [--rounds 5] [--repeat 8] [--quick]

For every model: one in-memory build and one swapping build per oversubscription k, where
budget = (total weight bytes) / k. Every configuration is timed in every round, rounds alternate
between them so that drift (other load, frequency) hits all alike. Times are medians over all
calls; each swapped configuration's calls follow a group of in-memory calls of their own, and its
ratio is the median over rounds of (its median / that group's median): this host's speed drifts
by +-25% over seconds, and a ratio of whole-run medians carries that drift between configurations
timed seconds apart. The warm rounds all run before the cold ones.

  in-memory   Runner, weights mapped zero-copy and resident (the page cache is warm).
  warm        SwapRunner(drop_cache=False): swapped-out weights stay in the OS page cache, as the
              runner's own first call after a drop filled it.
  cold        SwapRunner(drop_cache=True), time(cold=True): the weight file is evicted before each
              call and every block's pages after use (a strict budget, as on a small board). Its
              ratio is against the in-memory build run cold: the same Runner, its weights mapped
              privately by this script so that before each call they can be unmapped (MADV_DONTNEED)
              and evicted (POSIX_FADV_DONTNEED), exactly as SwapRunner.drop_page_cache does. Cold
              runs read a copy of each artifact, so evicting it leaves the warm runs' cache warm.
  naive       the swapping build run the simple way: each block's weights read (pread) from the
              file into freshly allocated TVM tensors, the block called, the tensors freed; no
              prefetch. Page cache warm; its ratio is against in-memory warm.
  RSS         peak resident memory of a fresh process running the strict (cold) swapped build,
              minus the peak of a process that imports everything and loads the library but runs
              nothing; against the budget. With cgroup v1 and root, `cgroup` is the peak memory
              charged to the child's cgroup (page cache included) above the same baseline.

Where weights / k cannot even hold the activations (ocr_cls: 0.5 MiB of weights, ~0.8 MiB of live
activations), the budget is the activation working set + weights / k instead, marked `*`.
Builds use the fusing pipeline with the default CPU schedule (no tuning database); --workdir keeps
them for the next run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tvm

from edgetvm import zoo
from edgetvm.compiler import compile_model, random_inputs
from edgetvm.errors import UserError
from edgetvm.runtime import cgroup
from edgetvm.runtime.artifact import open_artifact, sha256_file
from edgetvm.runtime.session import Runner
from edgetvm.runtime.swap import SwapRunner, vm_hwm_bytes
from edgetvm.targets import load_board

MIB = 1 << 20

# name -> zoo keywords; --quick uses the small ones.
MODELS = {
    "dense_stack": {},                           # 8 x 3072x3072 fp32: 288 MiB
    "vgg": {"width": 0.5, "image": 64},          # VGG-11 layout, half width: 33 MiB
    "ocr_cls": {},                               # real pretrained MobileNetV3: 0.5 MiB
}
QUICK = {
    "dense_stack": {"n": 4, "d": 512},
    "vgg": {"width": 0.125, "image": 32},
    "ocr_cls": {},
}


# ------------------------------------------------------------------------------------ page cache

_libc = ctypes.CDLL(None, use_errno=True)


def cached_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore on a fresh mapping, which touches nothing)."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        try:
            addr = np.frombuffer(mm, dtype=np.uint8).ctypes.data
            pages = -(-size // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                return float("nan")
            return sum(v & 1 for v in vec) / pages
        finally:
            mm.close()


def pmd_mapped(runner: SwapRunner) -> float | None:
    """Share of a (warm) runner's weight bytes that its blocks map in 2 MiB pages (smaps FilePmdMapped /
    Rss, block by block): where the page cache holds some of the file in small folios (memory too
    fragmented when it was read), mapping those blocks costs page-table work per 4 KiB page."""
    if not runner.huge:
        return None
    rss = pmd = 0
    for b in runner.plan["blocks"]:
        runner._touch(b)
        inside = False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    inside = line.rstrip().endswith(str(runner.art.weights_path))
                elif inside and head == "Rss:":
                    rss += int(line.split()[1])
                elif inside and head == "FilePmdMapped:":
                    pmd += int(line.split()[1])
        runner._release(b)
    return pmd / rss if rss else None


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def settle(path: Path) -> None:
    """Write the (freshly compiled) file back: dirty pages cannot be evicted, so cold runs would not be cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ runners

class InMemory:
    """The in-memory build: a Runner whose weights are views of a private mapping we can drop."""

    def __init__(self, art):
        self.art = art
        self.runner = Runner(art)
        self.fd = os.open(art.weights_path, os.O_RDONLY)
        self.mm = mmap.mmap(self.fd, os.fstat(self.fd).st_size, flags=mmap.MAP_PRIVATE,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        raw = np.frombuffer(self.mm, dtype=np.uint8)
        self.runner.weights = [
            tvm.runtime.from_dlpack(raw[w["offset"]:w["offset"] + w["nbytes"]].view(w["dtype"]).reshape(w["shape"]))
            for w in art.manifest["weights"]]

    def drop_page_cache(self) -> None:
        self.mm.madvise(mmap.MADV_DONTNEED, 0, len(self.mm))
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def warm(self, x, repeat: int) -> list[float]:
        return self.runner.time(x, repeat=repeat).seconds

    def cold(self, x, repeat: int) -> list[float]:
        args = self.runner.args(x)
        main = self.runner.vm["main"]
        main(*args)
        seconds = []
        for _ in range(repeat):
            self.drop_page_cache()
            t = time.perf_counter()
            main(*args)
            seconds.append(time.perf_counter() - t)
        return seconds

    def run(self, x):
        return self.runner.run(x)

    def close(self) -> None:
        self.runner.weights = []
        gc.collect()
        self.mm.close()
        os.close(self.fd)


class NaiveSwap:
    """A swapping build run without SwapRunner's weight handling: read each block into fresh memory, call, free."""

    def __init__(self, sr: SwapRunner):
        self.sr = sr
        self.fd = os.open(sr.art.weights_path, os.O_RDONLY)

    def _read(self, w: dict):
        t = tvm.runtime.empty(w["shape"], w["dtype"], self.sr.dev)  # fresh (64-byte aligned) memory
        buf = memoryview(np.from_dlpack(t).reshape(-1).view(np.uint8))
        done = 0
        while done < w["nbytes"]:
            n = os.preadv(self.fd, [buf[done:]], w["offset"] + done)
            if n <= 0:
                raise OSError(f"short read from {self.sr.art.weights_path}")
            done += n
        return t

    def forward(self, values: dict) -> dict:
        # The same functions and value bookkeeping as SwapRunner: only how weights come in differs.
        for b, step in zip(self.sr.plan["blocks"], self.sr.steps):
            weights = [self._read(self.sr.index[w]) for w in b["weights"]]
            out = step.fn(*[values[v] for v in step.inputs], *weights)
            for name, val in zip(step.outputs, out):
                values[name] = val
            del weights, out
            for v in step.dead:
                values.pop(v, None)
        return values

    def time(self, x, repeat: int) -> list[float]:
        values = self.sr._values(x)
        self.forward(dict(values))  # warm-up
        seconds = []
        for _ in range(repeat):
            t = time.perf_counter()
            self.forward(dict(values))
            seconds.append(time.perf_counter() - t)
        return seconds

    def run(self, x) -> list[np.ndarray]:
        values = self.forward(self.sr._values(x))
        outs = []
        for name in self.sr.plan["outputs"]:
            v = values[name]
            outs += [v] if isinstance(v, tvm.runtime.Tensor) else list(v)
        return [o.numpy() for o in outs]

    def close(self) -> None:
        os.close(self.fd)


# ------------------------------------------------------------------------------------ children

def child(spec: dict) -> dict:
    """Runs in a fresh process: load the artifact, run it twice from a cold page cache (mode "run") or
    not at all (mode "none", the baseline), report peak RSS."""
    art = open_artifact(spec["art"], verify=False)
    x = random_inputs(art.inputs, seed=0)
    if "swap" not in art.manifest:
        r = Runner(art)
    else:
        r = SwapRunner(art, prefetch=art.manifest["swap"]["prefetch"], drop_cache=True)
    evict(art.weights_path)
    if spec["mode"] == "run":
        for _ in range(2):
            r.run(x)
    return {"hwm": vm_hwm_bytes()}


def run_child(spec: dict) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    cg = None
    if cgroup.unavailable_reason() is None:
        try:
            cg = cgroup.Cgroup()
        except OSError:
            cg = None
    try:
        if cg is not None:
            p = cg.run(argv, capture_output=True, text=True)
        else:
            p = subprocess.run(argv, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"child {spec} failed ({p.returncode}):\n{p.stderr[-3000:]}")
        out = json.loads(p.stdout.strip().splitlines()[-1])
        out["cgroup"] = cg.max_usage if cg is not None else None
        return out
    finally:
        if cg is not None:
            cg.close()


def peak_above_baseline(art_path: Path) -> tuple[float, float | None]:
    """(peak RSS, peak cgroup charge) of a child running the artifact (a swapping one strictly: page cache
    dropped per block) minus those of a child that loads it but runs nothing; bytes."""
    base = run_child({"art": str(art_path), "mode": "none"})
    got = run_child({"art": str(art_path), "mode": "run"})
    cg = got["cgroup"] - base["cgroup"] if got["cgroup"] is not None else None
    return got["hwm"] - base["hwm"], cg


# ------------------------------------------------------------------------------------ builds

def build(src: Path, shapes, board, out: Path, budget: int | None) -> Path:
    """Compile, or reuse `out` when it already holds this model built with this budget."""
    mf = out / "manifest.json"
    if mf.is_file():
        m = json.loads(mf.read_text())
        if m["model"]["sha256"] == sha256_file(src) and m.get("swap", {}).get("budget") == budget \
                and m["inputs"][0]["shape"] == list(next(iter(shapes.values()))):
            return out
    compile_model(src, board, out, shapes, memory_budget=budget)
    return out


def activation_floor(src: Path, shapes, board) -> int:
    """Peak live activations + scratch of any kernel, as the swap planner counts them, + the runtime's reserve."""
    from edgetvm.passes import model_import, pipeline, swap

    model, inputs = model_import.prepare(src, shapes)
    mod, _ = model_import.import_model(model, inputs)
    _, deploy = pipeline.lift_weight_transforms(mod)
    main = deploy["main"]
    nw = len(main.params) - int(main.attrs["num_input"])
    ops, _, _ = swap.op_memory(pipeline.fuse(deploy, board.target()), nw)
    return max(op.live + op.scratch for op in ops) + swap.RUNTIME_RESERVE


def cold_copy(art):
    """A copy of an artifact for the cold runs: evicting its file leaves the warm runs' page cache alone
    (one shared file was evicted every round and read back from disk just before the warm calls)."""
    dst = art.path.with_name(art.path.name + "-cold")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(art.path, dst)
    settle(dst / art.manifest["weights_file"])
    return open_artifact(dst, verify=False)


def check_cold(name: str, mem: "InMemory", rows: list[dict], log) -> None:
    """Warn when a drop leaves much of a weight file in the page cache (dirty or still mapped pages)."""
    mem.drop_page_cache()
    left = {"in-memory": cached_fraction(mem.art.weights_path)}
    for r in rows:
        r["cold_runner"].drop_page_cache()
        left[f"x{r['k']}"] = cached_fraction(r["cold_runner"].art.weights_path)
    for what, frac in left.items():
        if not frac < 0.02:
            log(f"  warning: {name} {what}: {frac:.0%} of the weight file still cached after a drop; "
                f"cold figures are not cold")


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).max()) for p, q in zip(a, b))


def measure(name: str, kw: dict, ratios: list[int], workdir: Path, rounds: int, repeat: int, log) -> list[dict]:
    board = load_board("host")
    src = zoo.path(name, **kw)
    shapes = zoo.default_input_shapes(name, **kw)
    tag = name + "".join(f"-{k}={v}" for k, v in sorted(kw.items()))
    t = time.perf_counter()
    mem_art = open_artifact(build(src, shapes, board, workdir / f"{tag}-mem", None), verify=False)
    weight_bytes = mem_art.manifest["weight_bytes"]
    rows, floor = [], None
    for k in ratios:
        budget, note, art_path = weight_bytes // k, "", None
        if floor is None or budget >= floor:
            try:
                art_path = build(src, shapes, board, workdir / f"{tag}-x{k}", budget)
            except UserError:
                pass
        if art_path is None:
            # weights / k cannot even hold the activations (a small model): oversubscribe the weights
            # on top of the activation working set instead.
            if floor is None:
                floor = activation_floor(src, shapes, board)
            budget, note = floor + weight_bytes // k, "*"
            try:
                art_path = build(src, shapes, board, workdir / f"{tag}-x{k}", budget)
            except UserError as e:
                rows.append({"model": name, "k": k, "budget": budget, "note": note, "error": str(e)})
                continue
        rows.append({"model": name, "k": k, "budget": budget, "note": note,
                     "art": open_artifact(art_path, verify=False)})
    compile_s = time.perf_counter() - t
    log(f"  {name}: built in {compile_s:.0f} s; weights {weight_bytes / MIB:.1f} MiB")
    ok = [r for r in rows if "art" in r]
    for art in [mem_art] + [r["art"] for r in ok]:
        settle(art.weights_path)

    x = random_inputs(mem_art.inputs, seed=0)
    mem, mem_c = InMemory(mem_art), InMemory(cold_copy(mem_art))
    ref = list(mem.run(x).values())
    for r in ok:
        prefetch = r["art"].manifest["swap"]["prefetch"]
        r["warm_runner"] = SwapRunner(r["art"], prefetch=prefetch, drop_cache=False)
        r["cold_runner"] = SwapRunner(cold_copy(r["art"]), prefetch=prefetch, drop_cache=True)
        r["naive_runner"] = NaiveSwap(r["warm_runner"])
        r["diff"] = max(max_diff(ref, list(r["warm_runner"].run(x).values())),
                        max_diff(ref, list(r["cold_runner"].run(x).values())),
                        max_diff(ref, r["naive_runner"].run(x)))
        r["blocks"] = len(r["art"].manifest["swap"]["blocks"])
        r["prefetch"] = prefetch

    # Every list holds one list of call times per round. Each swapped configuration is timed right
    # after a group of in-memory calls of its own (its base), so a ratio compares calls a second apart.
    mem_warm, mem_cold = [], []
    for r in ok:
        r["warm"], r["cold"], r["naive"], r["warm_base"], r["cold_base"] = [], [], [], [], []
    # Warm means: the page cache as the runner's own first call left it after a drop. Which folios
    # hold a file (4 KiB from a write or a scattered read, 2 MiB from a huge-page fault) decides what
    # mapping it costs, and depends on what last read it (a compile, an earlier run) otherwise.
    mem.drop_page_cache()
    mem.run(x)
    for r in ok:
        r["warm_runner"].drop_page_cache()
        r["warm_runner"].run(x)
        r["pmd"] = pmd_mapped(r["warm_runner"])
    # All warm rounds, then all cold ones: the cold calls' disk reads and evictions leave the kernel
    # work to do (writeback, reclaim) that would land in the next round's warm calls.
    for rnd in range(rounds):
        for r in ok:
            r["warm_base"].append(mem.warm(x, repeat))
            r["warm"].append(r["warm_runner"].time(x, repeat=repeat).seconds)
            r["naive"].append(r["naive_runner"].time(x, repeat))
            mem_warm.append(r["warm_base"][-1])
        log(f"  {name}: warm round {rnd + 1}/{rounds}")
    check_cold(name, mem_c, ok, log)
    for rnd in range(rounds):
        for r in ok:
            r["cold_base"].append(mem_c.cold(x, repeat))
            r["cold"].append(r["cold_runner"].time(x, repeat=repeat, cold=True).seconds)
            mem_cold.append(r["cold_base"][-1])
        log(f"  {name}: cold round {rnd + 1}/{rounds}")
    for runner in [mem, mem_c] + [r[k] for r in ok for k in ("warm_runner", "cold_runner", "naive_runner")]:
        runner.close()
    for art in [mem_c.art] + [r["cold_runner"].art for r in ok]:
        shutil.rmtree(art.path, ignore_errors=True)
    for r in ok:
        del r["warm_runner"], r["cold_runner"], r["naive_runner"]

    med = lambda rounds: statistics.median([t for rnd in rounds for t in rnd]) * 1e3  # noqa: E731

    def paired(rounds, base):
        """Median over rounds of (this round's median / its in-memory base's median)."""
        return statistics.median(statistics.median(a) / statistics.median(b) for a, b in zip(rounds, base))

    mem_rss, mem_cg = peak_above_baseline(mem_art.path)
    summary = {"model": name, "weights": weight_bytes, "mem_rss": mem_rss, "mem_cg": mem_cg,
               "compile_s": compile_s}
    for r in rows:
        r.update(mem_ms=med(mem_warm), mem_cold_ms=med(mem_cold))
        if "art" not in r:
            continue
        r["rss"], r["cg"] = peak_above_baseline(r["art"].path)
        for key, base in (("warm", "warm_base"), ("cold", "cold_base"), ("naive", "warm_base")):
            r[f"{key}_ms"] = med(r[key])
            r[f"{key}_x"] = paired(r[key], r[base])
        for key in ("art", "warm", "cold", "naive", "warm_base", "cold_base"):
            del r[key]
    return [summary] + rows


def print_table(results: list[list[dict]], floor_note: bool) -> None:
    head = (f"{'model':<12} {'k':>3} {'budget':>7} {'blocks':>6} {'in-mem ms':>9} {'warm ms (x)':>16} "
            f"{'cold ms (x cold)':>18} {'in-mem cold':>11} {'naive ms (x)':>16} {'RSS/budget MiB':>15} "
            f"{'cgroup':>7} {'max|diff|':>9}")
    print(head)
    for summary, *rows in results:
        for r in rows:
            label = f"{r['model']:<12} {r['k']:>2}x {r['budget'] / MIB:>6.2f}{r['note'] or ' '}"
            if "error" in r:
                print(f"{label} does not fit: {r['error']}")
                continue
            cg = f"{r['cg'] / MIB:>7.1f}" if r["cg"] is not None else f"{'-':>7}"
            print(f"{label}{r['blocks']:>6}{' ' if r['prefetch'] else 'n'}{r['mem_ms']:>9.2f} "
                  f"{r['warm_ms']:>8.2f} ({r['warm_x']:>5.2f}x) "
                  f"{r['cold_ms']:>9.2f} ({r['cold_x']:>5.2f}x) {r['mem_cold_ms']:>11.2f} "
                  f"{r['naive_ms']:>8.2f} ({r['naive_x']:>5.2f}x) "
                  f"{r['rss'] / MIB:>7.1f}/{r['budget'] / MIB:<7.1f} {cg} {r['diff']:>9.1e}")
    print("in-memory builds, peak RSS above baseline (cgroup charge): " + "; ".join(
        f"{s['model']} {s['mem_rss'] / MIB:.1f} MiB"
        + (f" ({s['mem_cg'] / MIB:.1f})" if s["mem_cg"] is not None else "")
        + f" for {s['weights'] / MIB:.1f} MiB of weights" for s, *_ in results))
    pmd = [f"{r['model']} {r['k']}x {r['pmd']:.0%}" for _, *rows in results for r in rows if r.get("pmd") is not None]
    if pmd:
        print("warm runs, weights mapped in 2 MiB pages (the rest costs page-table work per 4 KiB): " + ", ".join(pmd))
    print("k: budget = weights / k. warm: page cache kept; cold: page cache dropped before each call and per "
          "block, ratio vs in-memory cold; naive: read each block into fresh memory, no prefetch, ratio vs "
          "in-memory warm. ms: median of all calls; (x): median over rounds of its median over the median of the in-memory calls timed just before it "
          "(this host's speed drifts). blocks marked n: planned without prefetch.")
    if floor_note:
        print("*: weights / k cannot hold the activations; budget = activation working set + weights / k.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="dense_stack,vgg,ocr_cls",
                   help="comma-separated: dense_stack (8 x 3072^2), vgg (width 0.5, 64x64), ocr_cls (pretrained)")
    p.add_argument("--ratios", default="2,4,6", help="oversubscription factors k: budget = weight bytes / k")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=8, help="calls per configuration per round")
    p.add_argument("--quick", action="store_true", help="small models, one round of 2 calls (for a test)")
    p.add_argument("--workdir", help="keep the builds here and reuse them on the next run (default: a temp dir)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    sizes = QUICK if args.quick else MODELS
    names = args.models.split(",")
    unknown = [n for n in names if n not in sizes]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(sizes)}")
    ratios = [int(k) for k in args.ratios.split(",")]
    rounds, repeat = (1, 2) if args.quick else (args.rounds, args.repeat)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    why = cgroup.unavailable_reason()
    print(f"SwapNet on {os.cpu_count()} cores, TVM {tvm.__version__} (fusing pipeline, default schedule, untuned); "
          f"{rounds} rounds x {repeat} calls per configuration, alternating; cgroup: {why or 'v1'}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for n in names:
        print(f"  {n}: {', '.join(f'{k}={v}' for k, v in sizes[n].items()) or 'defaults'}")
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for n in names:
            results.append(measure(n, sizes[n], ratios, workdir, rounds, repeat, log))
    print_table(results, any(r.get("note") for _, *rows in results for r in rows))
    print(f"total {time.perf_counter() - t0:.0f} s; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} "
          f"(other work on this machine shares its {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    from edgetvm.runtime.signals import exit_code, sigterm_raises

    try:
        with sigterm_raises():   # SIGTERM unwinds, so its cgroups, namespaces and links are removed
            sys.exit(main())
    except KeyboardInterrupt as e:
        sys.exit(exit_code(e))
