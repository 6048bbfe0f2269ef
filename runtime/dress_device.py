"""A DRESS budget trace replayed on an emulated device whose CPU quota and memory limit follow the trace.

    edgetvm run ART --budget-trace TRACE --device phone-hi

The device is a device profile's cgroups (targets/devices/*.toml, latte.devices.DeviceCgroup: a CFS quota
of `cpu_quota` CPUs per 10 ms period, its first `cpus` host CPUs, a memory cgroup). A worker process
(`python -m edgetvm.runtime.dress_device`, started here) imports TVM, opens the artifact, maps its weights,
drops the weight file's pages from the page cache (so that the pages a subnet reads are charged to the
device when it reads them), then joins the cgroups: what the cgroup is charged from then on is the model's
memory (its weight pages as they are touched, its buffers), not the runtime's, as device_server.py does.
It runs inferences when told to, timing each in the cgroup.

Per trace line this process, playing the device's operating system, sets

* the CPU quota: cpu.cfs_quota_us = CPU_SHARE x the profile's cpu_quota x the period (at least 1 ms, the
  least CFS takes), so the worker's kernels really get that share of the CPU time;
* the memory limit: memory.limit_in_bytes = MEMORY_MIB (capped by the profile's memory); what the cgroup
  holds is the model's weight pages and buffers and the worker loop's own new pages. The weights are file pages: under a limit below a subnet's prefix of
  the store the kernel evicts them and the subnet reads them again from the file on its next call (slow,
  never an out-of-memory kill). The limit is never set below the worker's anonymous memory (which the
  kernel cannot evict: no swap) plus HEADROOM_BYTES (for separately stored models, plus what loading one
  holds in anonymous memory, measured at calibration): a budget below that is raised to it, and the run
  counts those lines ("limit raised").

The runner in the worker reads its cgroup's quota before every inference and predicts each subnet's
latency as its calibration at the full quota (median of 15 calls, made when it starts) times
full quota / current quota. Scaling rather than re-calibrating: a re-calibration costs K x 16 calls at
every quota change (more than a trace phase of a few inferences), and with CFS's 10 ms period a median
of five short calls mostly lands inside one period's quota and measures full speed, hiding the
throttling; the scaled figure is the mean latency under the quota (checked against the measured mean per
share in the summary). Per-call latencies under a quota are bursty: a call that meets the end of its
period's quota waits for the next period (up to 10 ms x (1 - share)), which is where misses at a low
share come from. A subnet's weight pages are measured at calibration, sparsest first: the page cache
charged to the cgroup after its first call (memory.stat; nested prefixes: every sparser subnet's is
inside it); its memory, at every choice, is that plus the anonymous memory the worker holds then (it
grows during a run). After every inference what the cgroup holds is measured again and compared with
the line's budget.

That scaled mean is the "mean" policy (as before). The default policy, "per-call", predicts each call from
what the device's runtime can see at that moment, for the two causes of the misses the mean policy had:

* CFS stalls: a call that fits in the quota left in the current period runs at full speed (its calibration);
  one that does not waits for the next period (up to period - quota) per period it crosses. The quota left
  is a lower bound the worker keeps from its own CPU time (CLOCK_PROCESS_CPUTIME_ID: it is alone in its
  cgroup) and the cgroup's nr_throttled: the quota is refilled when this side writes it (each trace
  line), after every throttling (the worker runs again, so the period ended), and at least once in any
  period of wall time; the CPU used since the latest such point it can prove is an upper bound on what
  the period has used. An error only ever understates the quota left (a sparser subnet, or "none
  fits"), never overstates it. When the quota left fits no subnet, no subnet can meet the budget at that
  call: it counts where none fit (and the summary says how many such calls the mean rule had thought fit).
* Cold caches: calls after the worker was off the CPU (waiting for the next line, or throttled) are
  slower (the first 2-3x the hot median here); each is predicted on the subnet's warm-up curve,
  measured at calibration, and no faster than measured just after the subnet that ran last.
* The calibration's drift (`Correction`, with `adapt`, the default): calls run slower in a trace than
  at calibration, cold ones more; every full-speed latency above is multiplied by the 97th percentile
  of measured / predicted over the device's own last 64 such calls (first calls after a wait and the
  others apart). The 90th percentile left 14 misses where a subnet fit in the bench's trace and the 97th 6,
  with fewer misses in all (54 and 44) at the same accuracy delivered (one idle run each).
* Kernel memory: the limit counts the kernel's memory for the worker (memory.kmem.usage_in_bytes) too,
  so a subnet's memory includes it (without it the sparsest subnet, at its own budget, thrashed).
* Evicted weight pages: a subnet's pages are measured at calibration (mincore after its first call,
  sparsest first), and so is the cost of reading one back (its first call's extra time over its major
  faults). A call predicts each subnet with its non-resident pages (mincore, now) at that cost, so a
  subnet whose pages a lower memory limit evicted is not chosen where reading them back breaks the
  budget. And at a budget change the runtime pages in, before the line's first inference, the prefix of
  the subnet the new budget chooses (madvise WILLNEED, then POPULATE_READ to map it), as a device
  runtime does when the OS raises its memory allowance (Android's onTrimMemory levels, a memory
  cgroup's limit): this assumes the budget change is announced before the next request, and the time
  it takes is reported apart from the inference calls, never hidden in them. It runs before this side
  writes the line's quota (the line's quota is its calls'), and releases first (MADV_PAGEOUT) the pages
  of subnets the new memory budget does not fit: left to the kernel, the reclaim under the limit took
  the pages just read in (new pages count as less used than old ones). Within a line nothing is
  prefetched between calls (requests come back to back): a page evicted there costs what it predicts.

Every cgroup and the worker are removed on exit, on errors and on Ctrl-C / SIGTERM (signals.deferred
around making and removing them; the cgroups carry the owner pid for runtime/leftovers.py).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError
from edgetvm.runtime.signals import deferred

MODES = ("dress", "dense", "separate")
POLICIES = ("per-call", "mean")   # per-call: quota left + residency, prefetch at budget changes; mean: as before
PAGE = os.sysconf("SC_PAGE_SIZE")
CPU_MARGIN = 1.25   # a call needs its calibration x this of the quota left (the calibration is a median)
GLUE_MS = 0.05      # CPU the worker spends between choosing and the call
HEADROOM_BYTES = 256 << 10   # a limit is never set below the worker's anonymous memory plus this
CHUNK = 25                   # inferences per message: the worker's records are its own memory, charged to the
                             # device (200 records held before a reply left a 1.5 MiB budget no room to run in)
CALIBRATION_CALLS = 15       # timed calls per subnet at the start (their median): this machine is loaded
COLD_CALLS = 5               # waits per subnet, then WARMUP_CALLS calls each (their medians): calls after a wait
WARMUP_CALLS = 4
ADAPT_CALLS = 64             # the per-call rule learns from its last this many full-speed calls...
ADAPT_QUANTILE = 0.97        # ...this quantile of their measured / predicted time
ADAPT_LEAST = 8              # (and predicts as calibrated until it has this many)


class DeviceWorker:
    """A worker running artifacts in the cgroups of device profile `profile`; this side sets its quota and
    memory limit. mode "dress": one DRESS artifact, choosing per inference; "dense": one artifact run
    whatever the budget; "separate": one artifact per subnet (pruned models stored separately), chosen by
    the rule and predictions of `plan` (a DRESS calibration), the chosen one loaded when the choice changes."""

    def __init__(self, profile, mode: str, arts: list, inputs: dict[str, np.ndarray], plan: dict | None = None,
                 policy: str = "per-call", prefetch: bool = True, adapt: bool = True):
        from edgetvm.latte.devices import DeviceCgroup, cgroups_unavailable, load_profile

        if mode not in MODES or policy not in POLICIES:
            raise ValueError((mode, policy))
        if reason := cgroups_unavailable():
            raise UserError(f"--device needs cgroups to emulate the device, and they are not available here: {reason}")
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        self.mode, self.policy, self.prefetch = mode, policy, prefetch
        self.adapt = adapt and policy == "per-call"
        self.device = self.proc = self.tmp = None
        self.limit_raised = 0
        self.headroom = HEADROOM_BYTES
        with deferred():   # a signal between making a resource and recording it would leak it
            try:
                self.device = DeviceCgroup(self.profile)
                self.cpu_dir, self.mem_dir = self.device.cg.cpu, self.device.cg.mem
                self.period_us = int((self.cpu_dir / "cpu.cfs_period_us").read_text())
                self.full_quota_us = int((self.cpu_dir / "cpu.cfs_quota_us").read_text())
                self.tmp = Path(tempfile.mkdtemp(prefix="edgetvm-dress-"))
                np.savez(self.tmp / "inputs.npz", **inputs)
                if plan is not None:
                    (self.tmp / "plan.json").write_text(json.dumps(plan))
                argv = [sys.executable, "-m", "edgetvm.runtime.dress_device", "--mode", mode, "--policy", policy,
                        "--inputs", str(self.tmp / "inputs.npz"), *map(str, arts)]
                argv += [a for path in self.device.paths.values() for a in ("--cgroup", path)]
                if plan is not None:
                    argv += ["--plan", str(self.tmp / "plan.json")]
                if self.adapt:
                    argv += ["--adapt"]
                from edgetvm.runtime.leftovers import owner_env

                env = {**os.environ, **owner_env(), "TVM_NUM_THREADS": str(len(self.device.cpus))}
                self.err = open(self.tmp / "worker.err", "w+")
                # Its own session: a Ctrl-C at the terminal reaches this process, which then removes it.
                self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                             env=env, text=True, start_new_session=True)
            except BaseException:
                self.close()
                raise
        self.ready = self._reply()

    # ------------------------------------------------------------------ the device's operating system

    def quota_us(self, share: float) -> int:
        return max(1000, round(share * self.full_quota_us))

    def set_share(self, share: float) -> None:
        (self.cpu_dir / "cpu.cfs_quota_us").write_text(str(self.quota_us(share)))

    def set_memory(self, budget_bytes: int | None) -> tuple[int, bool]:
        """Sets the memory limit for a budget (None: the profile's memory). Returns the limit and whether it
        had to be raised above the budget: never below the worker's anonymous memory + HEADROOM_BYTES,
        which the kernel cannot evict (below it the worker would be killed for memory at its next
        allocation, not slowed down)."""
        cap = self.profile.memory_bytes
        page = os.sysconf("SC_PAGE_SIZE")   # the kernel keeps limits in whole pages, rounded down
        want = cap if budget_bytes is None else min(cap, int(budget_bytes))
        stat = dict(line.split() for line in (self.mem_dir / "memory.stat").read_text().splitlines())
        floor = int(stat["rss"]) + self.headroom
        limit = max(want, floor) // page * page
        try:
            (self.mem_dir / "memory.limit_in_bytes").write_text(str(limit))
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            limit = int((self.mem_dir / "memory.limit_in_bytes").read_text())
        raised = limit > want // page * page
        self.limit_raised += raised
        return limit, raised

    def throttled_periods(self) -> int:
        for line in (self.cpu_dir / "cpu.stat").read_text().splitlines():
            if line.startswith("nr_throttled "):
                return int(line.split()[1])
        return 0

    # ------------------------------------------------------------------ talking to the worker

    def _send(self, msg: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass   # _reply reports why
        return self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.err.seek(0)
            lines = [x for x in self.err.read().splitlines() if x.strip()]
            oom = self.device.cg.oom_kills if self.device else 0
            why = f"killed by the memory limit ({oom} OOM kills)" if oom else (lines[-1] if lines else "no message")
            raise RuntimeError(f"the worker on emulated device {self.profile.name} exited "
                               f"({self.proc.returncode}): {why}")
        return json.loads(line)

    def calibrate(self) -> dict:
        """At the full quota and the profile's memory: per subnet (dress) or for the model (dense) the median
        latency and the memory measured; for separate models the anonymous memory loading one takes, which
        then joins the headroom (a load under a tighter limit kills the worker)."""
        self.set_share(1.0)
        self.set_memory(None)
        out = self._send({"op": "calibrate"})
        self.headroom = HEADROOM_BYTES + out.get("load_anon_bytes", 0)
        return out

    def switch_cost(self) -> dict:
        return self._send({"op": "switch"})

    def use_latencies(self, predicted_ms: list[float]) -> None:
        """Predict from these calibrated latencies (another worker's over the same artifact) instead of its own:
        two rules compared on one trace then agree on which calls a subnet fits, whatever the calibration noise."""
        self._send({"op": "latencies", "predicted_ms": predicted_ms})

    def replay(self, trace: list) -> dict:
        """Each trace line (a run of equal budgets) in turn: quota and memory limit set, then its inferences
        run in the worker. Returns the records (one per inference) and per line what was set."""
        records, lines = [], []
        i = 0
        while i < len(trace):
            b = trace[i]
            n = 1
            while i + n < len(trace) and trace[i + n] == b:
                n += 1
            limit, raised = self.set_memory(b.memory_bytes)
            prefetch = None
            if self.prefetch and self.policy == "per-call" and self.mode == "dress":
                # the budget change announced to the runtime, which pages in what it will run; before the
                # quota is written, so the line's quota is its calls' (the page-in is charged to the device)
                prefetch = self._send({"op": "prefetch", "time_ms": b.time_ms, "memory_bytes": b.memory_bytes,
                                       "share": b.cpu_share})
            self.set_share(b.cpu_share)
            th = self.throttled_periods()
            for start in range(0, n, CHUNK):
                # line_start: the quota was just written (CFS refilled it) and the budget is new
                out = self._send({"op": "run", "time_ms": b.time_ms, "memory_bytes": b.memory_bytes,
                                  "count": min(CHUNK, n - start), "line_start": start == 0})
                for r in out["records"]:
                    r["line"] = len(lines)
                records += out["records"]
            lines.append({"share": b.cpu_share, "quota_us": self.quota_us(b.cpu_share), "count": n,
                          "memory_limit": limit, "limit_raised": raised,
                          "throttled_periods": self.throttled_periods() - th, "prefetch": prefetch})
            i += n
        self.set_share(1.0)
        self.set_memory(None)
        return {"records": records, "lines": lines, "limit_raised": self.limit_raised,
                "oom_kills": self.device.cg.oom_kills, "policy": self.policy, "adapt": self.adapt}

    def close(self) -> None:
        """Stops the worker and removes the cgroups and the temporary files; a second signal cannot cut it short."""
        with deferred():
            if self.proc is not None:
                with contextlib.suppress(OSError):
                    self.proc.kill()
                self.proc.wait()
                for f in (self.proc.stdin, self.proc.stdout):
                    with contextlib.suppress(OSError):
                        f.close()
                self.proc = None
            if self.device is not None:
                self.device.close()
                self.device = None
            if self.tmp is not None:
                with contextlib.suppress(OSError):
                    self.err.close()
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def replay_alternately(devices: list, trace: list) -> list[dict]:
    """The trace on several devices line by line in turn (every device runs a line before any runs the next):
    load on this machine that comes and goes hits each alike. One run per device, as DeviceWorker.replay's."""
    runs = [{"records": [], "lines": []} for _ in devices]
    i = 0
    while i < len(trace):
        n = 1
        while i + n < len(trace) and trace[i + n] == trace[i]:
            n += 1
        for dev, run in zip(devices, runs):
            part = dev.replay(trace[i:i + n])
            for r in part["records"]:
                r["line"] = len(run["lines"])
            run["records"] += part["records"]
            run["lines"] += part["lines"]
        i += n
    for dev, run in zip(devices, runs):
        run.update(limit_raised=dev.limit_raised, oom_kills=dev.device.cg.oom_kills, policy=dev.policy, adapt=dev.adapt)
    return runs


def summarize(run: dict, accuracy: list[float] | None = None) -> dict:
    """Accuracy delivered, budget misses where a subnet fit and where none did, memory over budget, and the
    measured mean latency per share against the mean prediction."""
    recs = run["records"]
    fitting = [r for r in recs if r["fits"]]
    per_share = {}
    for r in recs:
        per_share.setdefault(r["share"], []).append(r)
    check = {f"{s:g}": {"inferences": len(rs), "measured_mean_ms": float(np.mean([r["ms"] for r in rs])),
                        "predicted_mean_ms": float(np.mean([r["predicted_ms"] for r in rs]))}
             for s, rs in sorted(per_share.items(), reverse=True)}
    acc = [accuracy[r["level"]] for r in recs] if accuracy is not None else None
    return {"inferences": len(recs), "no_fit": len(recs) - len(fitting),
            "misses_where_fitting": sum(r["miss"] for r in fitting), "misses": sum(r["miss"] for r in recs),
            # misses in calls that read weight pages back from the file (major faults: the limit had evicted them)
            "misses_where_fitting_paging": sum(r["miss"] and r["page_ins"] > 0 for r in fitting),
            "inferences_paging": sum(r["page_ins"] > 0 for r in recs),
            "memory_over_budget": sum(r["memory_bytes"] > r["budget_memory_bytes"] for r in recs),
            "peak_memory_bytes": max(r["memory_bytes"] for r in recs),
            "accuracy": None if acc is None or None in acc else float(np.mean(acc)),
            "used": [sum(r["level"] == k for r in recs) for k in range(1 + max(r["level"] for r in recs))],
            "loads": sum(r.get("loaded", False) for r in recs),
            "throttled_periods": sum(x["throttled_periods"] for x in run["lines"]),
            # per-call policy: calls no subnet fitted for want of quota left or of resident pages, which the
            # mean rule (scaled calibration, pages assumed resident) would have thought fitting
            "no_fit_where_mean_fit": sum(not r["fits"] and r.get("fits_on_mean", False) for r in recs),
            "misses_where_mean_fit": sum(r["miss"] for r in recs if r.get("fits_on_mean", r["fits"])),
            "prefetched_lines": sum(1 for x in run["lines"] if x.get("prefetch") and x["prefetch"]["pages"]),
            "prefetch_pages": sum(x["prefetch"]["pages"] for x in run["lines"] if x.get("prefetch")),
            "prefetch_ms": sum(x["prefetch"]["ms"] for x in run["lines"] if x.get("prefetch")),
            "policy": run.get("policy", "mean"), "adapt": run.get("adapt", False),
            "limit_raised": run["limit_raised"], "oom_kills": run["oom_kills"], "per_share": check}


# ---------------------------------------------------------------------------------------------- the worker


class _Plan:
    """The choosing rule of SubnetRunner over predictions made elsewhere (mode "separate")."""

    def __init__(self, plan: dict):   # the memory figures are DRESS's, as measured at its calibration
        self.subnets = plan["subnets"]
        self.predicted_ms = plan["predicted_ms"]
        self.cold_ms = plan.get("cold_ms", plan["predicted_ms"])
        self.after_ms = plan.get("after_ms", [plan["predicted_ms"]] * len(plan["predicted_ms"]))
        self.warmup_ms = plan.get("warmup_ms", [[p] * WARMUP_CALLS for p in self.cold_ms])
        self.memory_bytes = plan["memory_bytes"]

    def choose(self, budget, share, predicted=None):
        from edgetvm.runtime.subnets import SubnetRunner

        return SubnetRunner.choose(self, budget, share, predicted)

    def predicted(self, k, share):
        from edgetvm.runtime.subnets import SubnetRunner

        return SubnetRunner.predicted(self, k, share)

    def smallest(self):
        from edgetvm.runtime.subnets import SubnetRunner

        return SubnetRunner.smallest(self)


def _drop_page_cache(path: Path) -> None:
    """The file's clean, unmapped pages out of the page cache: whoever reads them next is charged for them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _no_readahead(path: Path) -> int:
    """madvise(MADV_RANDOM) on this process's mappings of `path`: a page fault then reads that page, not
    the readahead window around it (which for LeNet5's 2.5 MiB store read nearly all of it whichever
    subnet ran: a subnet reads a prefix of every block of 16 rows, spread over the file). Returns the
    bytes advised."""
    done = 0
    for lo, hi in _mappings(path):
        if _libc().madvise(lo, hi - lo, MADV_RANDOM) == 0:
            done += hi - lo
    return done


MADV_RANDOM, MADV_WILLNEED, MADV_PAGEOUT, MADV_POPULATE_READ = 1, 3, 21, 22


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def _mappings(path: Path) -> list[tuple[int, int]]:
    """This process's mappings of `path` (address ranges, in the order of /proc/self/maps)."""
    target, out = str(Path(path).resolve()), []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi))
    return out


class Residency:
    """Which pages of this process's mappings of a file are in memory, and paging a set of them in.

    mincore on a file mapping reports the page cache: a page the memory limit evicted is not there, and
    the next access reads it from the file (one major fault per page: readahead is off). `page_in` is
    what a runtime does when its memory allowance grows: madvise(WILLNEED) starts the reads of every
    missing run of pages at once, and POPULATE_READ (Linux 5.14) waits for them and maps them, so the
    next call takes neither a major nor a minor fault on them."""

    def __init__(self, path: Path):
        import ctypes

        self.libc = _libc()
        self.spans = _mappings(path)
        self.sizes = [(hi - lo) // PAGE for lo, hi in self.spans]
        self.pages = sum(self.sizes)
        self._vec = (ctypes.c_ubyte * max(1, max(self.sizes, default=1)))()

    def resident(self) -> np.ndarray:
        out = np.zeros(self.pages, bool)
        at = 0
        for (lo, hi), n in zip(self.spans, self.sizes):
            if self.libc.mincore(lo, hi - lo, self._vec) != 0:
                raise OSError(__import__("ctypes").get_errno(), "mincore failed")
            out[at:at + n] = np.frombuffer(self._vec, np.uint8, n) & 1
            at += n
        return out

    def missing(self, sets: list[np.ndarray]) -> list[int]:
        """For each page set (a mask over `pages`), how many of its pages are not resident now."""
        gone = ~self.resident()
        if not gone.any():
            return [0] * len(sets)
        return [int(np.count_nonzero(s & gone)) for s in sets]

    def runs(self, mask: np.ndarray):
        """(address, bytes) of every run of consecutive pages in `mask` (a mask over `pages`)."""
        at = 0
        for (lo, _), n in zip(self.spans, self.sizes):
            m = np.concatenate(([0], mask[at:at + n].astype(np.int8), [0]))
            for a, b in zip(np.flatnonzero(np.diff(m) == 1), np.flatnonzero(np.diff(m) == -1)):
                yield lo + int(a) * PAGE, int(b - a) * PAGE
            at += n

    def page_in(self, want: np.ndarray, spare: np.ndarray | None = None) -> int:
        """Pages in every page of `want` (a mask over `pages`) that is not resident; returns how many were not.
        `spare`: pages the budget no longer lets the runtime use, released first (MADV_PAGEOUT), as a runtime
        gives memory back when its allowance shrinks: left to the kernel, the reclaim that the page-in
        causes under the limit took the pages just read (new pages count as less used than the old ones),
        and the next call read them back."""
        if spare is not None:
            for addr, size in self.runs(spare & ~want):
                self.libc.madvise(addr, size, MADV_PAGEOUT)
        missing = want & ~self.resident()
        runs = list(self.runs(missing))
        for addr, size in runs:   # start every read, then wait for them
            self.libc.madvise(addr, size, MADV_WILLNEED)
        for addr, size in runs:
            if self.libc.madvise(addr, size, MADV_POPULATE_READ) != 0:
                import ctypes   # an older kernel: touch each page instead

                for q in range(0, size, PAGE):
                    ctypes.string_at(addr + q, 1)
        return int(missing.sum())


def per_call_ms(calib_ms: float, quota_left_ms: float, quota_ms: float, period_ms: float, cpus: int,
                page_in_ms: float = 0.0) -> float:
    """A call's predicted latency under a CFS quota: full speed (its calibration) if it fits in the quota
    left in this period, else a wait for the next period (at most period - quota: the quota cannot run out
    sooner than `quota` into a period) for every period it needs; plus reading back its evicted pages.
    A quota of the whole cpuset never binds."""
    if quota_ms >= period_ms * cpus:
        return calib_ms + page_in_ms
    need = calib_ms * CPU_MARGIN + GLUE_MS
    if need <= quota_left_ms:
        return calib_ms + page_in_ms
    periods = -(-(need - max(quota_left_ms, 0.0)) // quota_ms)
    return calib_ms + page_in_ms + periods * (period_ms - quota_ms)


class QuotaLeft:
    """A lower bound on the CPU time the worker's cgroup may still use in the current CFS period.

    The kernel does not say where in its period a cgroup is or what quota it has left (cgroup v1's
    cpu.stat counts periods and throttlings only), so the worker bounds the CPU its cgroup used since
    the period began from points where the quota is known to be refilled no earlier: `refilled(cpu)` (the
    quota was just written: CFS refills it), a throttling seen since the previous look (the worker runs,
    so a refill came after that look), and the start of the last `period` of wall time (some period
    boundary lies in it). The CPU used since the latest of them (the worker is alone in the cgroup: its
    process CPU time is the cgroup's) is at least what the period has used."""

    def __init__(self, quota_ms: float, period_ms: float):
        self.quota_ms, self.period_ms = quota_ms, period_ms
        self.mark = 0.0                    # CPU time (ms) at the latest known refill point
        self.seen = collections.deque()    # (wall ms, CPU ms) at each look, back to a period ago
        self.throttled = None
        self.just_throttled = False   # throttled between the previous look and this one

    def refilled(self, cpu_ms: float) -> None:
        self.mark = cpu_ms

    def look(self, wall_ms: float, cpu_ms: float, nr_throttled: int) -> float:
        """The quota left now (ms); `cpu_ms` read before `nr_throttled`."""
        self.just_throttled = self.throttled is not None and nr_throttled != self.throttled
        if self.just_throttled and self.seen:
            self.mark = max(self.mark, self.seen[-1][1])
        self.throttled = nr_throttled
        seen = self.seen
        while len(seen) > 1 and seen[1][0] <= wall_ms - self.period_ms:
            seen.popleft()
        if seen and seen[0][0] <= wall_ms - self.period_ms:   # the latest look a whole period ago
            self.mark = max(self.mark, seen[0][1])
        seen.append((wall_ms, cpu_ms))
        return self.quota_ms - (cpu_ms - self.mark)


class Correction:
    """How much slower (or faster) this device's calls run than its calibration said, learnt from its own
    calls: the ADAPT_QUANTILE of measured / predicted over its last ADAPT_CALLS calls that ran at full speed
    (not throttled, no weight page read back), kept apart for a first call after the worker was off the CPU
    and for the others. On this VM a subnet's calls during a trace ran a median 1.29x their calibration
    (the other device's calls between lines take the caches; the machine's speed moves over minutes),
    and the calls that missed their budget 2.2x, none throttled or paging: a choice by the median had
    no margin. The factor applies to every subnet's full-speed latency; the ratio is to the uncorrected
    prediction, so it does not compound."""

    def __init__(self, n: int = ADAPT_CALLS, q: float = ADAPT_QUANTILE, least: int = ADAPT_LEAST):
        self.ratios = {True: collections.deque(maxlen=n), False: collections.deque(maxlen=n)}
        self.q, self.least = q, least

    def factor(self, cold: bool) -> float:
        """The q-quantile, interpolated as numpy's default, in plain Python: np.quantile's temporaries grew the
        worker's heap by enough to push a 1.5 MiB budget's weight pages out (every call then read ~175 back)."""
        r = self.ratios[cold]
        if len(r) < self.least:
            return 1.0
        r = sorted(r)
        x = self.q * (len(r) - 1)
        i = int(x)
        return r[i] if i + 1 >= len(r) else r[i] + (x - i) * (r[i + 1] - r[i])

    def add(self, cold: bool, predicted_ms: float, ms: float) -> None:
        if predicted_ms > 0:
            self.ratios[cold].append(ms / predicted_ms)


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class _Worker:
    def __init__(self, args):
        import tvm  # noqa: F401  (loaded before joining: the import is the runtime's, not the device's)

        from edgetvm.runtime.artifact import open_artifact
        from edgetvm.runtime.session import Runner
        from edgetvm.runtime.subnets import SUBNET_INPUT, SubnetRunner

        self.mode, self.policy = args.mode, args.policy
        self.correction = Correction() if args.adapt else None
        self.last_base, self.last_cold = None, False
        self.inputs = dict(np.load(args.inputs))
        self.arts = [open_artifact(a) for a in args.artifacts]
        for a in self.arts:
            _drop_page_cache(a.weights_path)
        self.Runner, self.open_artifact = Runner, open_artifact
        self.sr = self.runner = None
        self.loaded = None
        if self.mode == "dress":
            self.sr = SubnetRunner(self.arts[0])
            self.data = {k: v for k, v in self.inputs.items() if k != SUBNET_INPUT}
            self.level_args = [self.sr.args(self.data, k) for k in range(len(self.sr.subnets))]
            self.chooser = self.sr
        elif self.mode == "dense":
            self.runner = Runner(self.arts[0])
            self.dense_args = self.runner.args(self.inputs)
        else:
            plan = json.loads(Path(args.plan).read_text())
            self.chooser, self.file_bytes = _Plan(plan), plan["file_bytes"]
        for a in self.arts:
            _no_readahead(a.weights_path)
        # dress: the pages each subnet reads (measured at calibration) and what reading one back costs
        self.residency = Residency(self.arts[0].weights_path) if self.mode == "dress" else None
        self.pages, self.page_in_ms, self.kmem, self.last_level, self.warm_calls = None, 0.0, 0, None, 0
        self._fds = {}
        cg = {Path(d).parent.name: Path(d) for d in args.cgroup}
        self.cpu, self.mem = cg["cpu"], cg["memory"]
        for d in args.cgroup:
            Path(d, "cgroup.procs").write_text(str(os.getpid()))
        self.full_quota_us = self.quota_us()
        self.period_us = int((self.cpu / "cpu.cfs_period_us").read_text())
        self.cpus = len(os.sched_getaffinity(0))      # the cpuset, joined above
        self.quota = QuotaLeft(self.full_quota_us / 1e3, self.period_us / 1e3)
        self.idle_cpu_ms = time.process_time() * 1e3  # CPU time when the worker last waited for this side
        self.rss0 = _rss_bytes()

    def _read(self, path: Path) -> str:
        """A cgroup file, through a descriptor kept open: pread regenerates it without an open and close
        per call (each costs CPU time charged to the device's quota)."""
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return os.pread(fd, 1 << 16, 0).decode()

    def quota_us(self) -> int:
        return int(self._read(self.cpu / "cpu.cfs_quota_us"))

    def nr_throttled(self) -> int:
        text = self._read(self.cpu / "cpu.stat")
        at = text.find("nr_throttled ")
        return int(text[at + 13:text.index("\n", at)]) if at >= 0 else 0

    def held_parts(self) -> tuple[int, int]:
        """What the device's cgroup holds: anonymous pages and page cache (the weight pages touched) charged
        to it since the worker joined (memory.stat, exact; memory.usage_in_bytes moves in 512 KiB steps
        on this kernel)."""
        stat = dict(line.split() for line in self._read(self.mem / "memory.stat").splitlines())
        return int(stat["rss"]), int(stat["cache"])

    def held(self) -> int:
        return sum(self.held_parts())

    def kernel_memory(self) -> int:
        """Kernel memory charged to the device (page tables, slab): it counts against the memory limit too."""
        return int(self._read(self.mem / "memory.kmem.usage_in_bytes"))

    def follow_anonymous_memory(self, anon: int | None = None) -> None:
        """A subnet's memory = its weight pages (measured at calibration) + the anonymous memory the worker
        holds now (`anon`, else read): the loop's own pages grow during a run, and a budget that a subnet
        fits only by its calibration-time figure would make the kernel evict its weights at every call."""
        self.anon = self.held_parts()[0] if anon is None else anon
        self.chooser.memory_bytes = [f + self.anon + self.kmem for f in self.file_bytes]

    def calibrate(self) -> dict:
        if self.mode == "dress":
            mem, self.file_bytes = [0] * len(self.sr.subnets), [0] * len(self.sr.subnets)

            self.pages, faults = [None] * len(self.sr.subnets), [0] * len(self.sr.subnets)
            last = [resource.getrusage(resource.RUSAGE_SELF).ru_majflt]

            def measure(k):   # sparsest first, so what is held is subnet k's prefix and buffers
                rss, self.file_bytes[k] = self.held_parts()
                # what the limit counts: with the kernel's memory for the worker (the mean policy: as before)
                mem[k] = rss + self.file_bytes[k] + (self.kernel_memory() if self.policy == "per-call" else 0)
                self.pages[k] = self.residency.resident()   # its pages: the store was read in by nothing else
                now = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
                faults[k], last[0] = now - last[0], now

            self.sr.calibrate(self.data, repeat=CALIBRATION_CALLS, after_first_call=measure)
            self.sr.memory_bytes = mem
            # Reading a page back: the first call's time beyond the calibration over its major faults; the
            # sparsest subnet's first call is the artifact's first call too (one-time set-up): only if alone.
            per = {k: (self.sr.first_call_ms[k] - self.sr.predicted_ms[k]) / faults[k]
                   for k in range(len(mem)) if faults[k] > 0}
            rest = [v for k, v in per.items() if k != len(mem) - 1] or list(per.values())
            self.page_in_ms = max(0.0, statistics.median(rest)) if rest else 0.0
            # Calls after the worker was off the CPU (waiting for the next budget, or throttled) find their
            # caches taken by whatever ran meanwhile: the first 2-3x the hot median here, the next few still
            # slower. Measured the same way: a wait as long as a CFS period, then WARMUP_CALLS calls;
            # warmup_ms[k][n] is subnet k's call n after the wait (the last one stands for every later call).
            self.sr.warmup_ms = []
            for k in range(len(mem)):
                runs = []
                for _ in range(COLD_CALLS):
                    time.sleep(self.period_us / 1e6)
                    one = []
                    for _ in range(WARMUP_CALLS):
                        t = time.perf_counter()
                        self.sr.call(self.level_args[k])
                        one.append((time.perf_counter() - t) * 1e3)
                    runs.append(one)
                self.sr.warmup_ms.append([max(statistics.median(r[n] for r in runs), self.sr.predicted_ms[k])
                                          for n in range(WARMUP_CALLS)])
            self.sr.cold_ms = [w[0] for w in self.sr.warmup_ms]
            # A denser subnet right after a sparser one: its data beyond the sparser's prefix is not in the
            # caches (1.5-2x its hot median here). after_ms[i][j]: subnet j's call just after subnet i's.
            K = len(mem)
            self.sr.after_ms = [[self.sr.predicted_ms[j] for j in range(K)] for _ in range(K)]
            for i in range(K):
                for j in range(i):
                    times = []
                    for _ in range(COLD_CALLS):
                        self.sr.call(self.level_args[i])
                        t = time.perf_counter()
                        self.sr.call(self.level_args[j])
                        times.append((time.perf_counter() - t) * 1e3)
                    self.sr.after_ms[i][j] = max(statistics.median(times), self.sr.predicted_ms[j])
            return {"predicted_ms": self.sr.predicted_ms, "memory_bytes": mem, "file_bytes": self.file_bytes,
                    "rss_bytes": _rss_bytes() - self.rss0, "subnets": self.sr.subnets,
                    "pages": [int(p.sum()) for p in self.pages], "page_in_ms": self.page_in_ms,
                    "cold_ms": self.sr.cold_ms, "warmup_ms": self.sr.warmup_ms, "after_ms": self.sr.after_ms,
                    "first_call_ms": self.sr.first_call_ms, "first_call_faults": faults}
        if self.mode == "dense":
            self.runner.call(self.dense_args)
            mem = self.held()
            times = []
            for _ in range(CALIBRATION_CALLS):
                t = time.perf_counter()
                self.runner.call(self.dense_args)
                times.append((time.perf_counter() - t) * 1e3)
            return {"predicted_ms": [statistics.median(times)], "memory_bytes": [mem],
                    "rss_bytes": _rss_bytes() - self.rss0}
        grown = 0   # separate: load each model once, as the run will, and see what loading holds in anonymous memory
        for a in self.arts:
            before = self.held_parts()[0]
            r = self.Runner(self.open_artifact(a.path))
            r.run({**self.inputs, "subnet": np.array([0], np.int32)})
            grown = max(grown, self.held_parts()[0] - before)
            del r
        return {"load_anon_bytes": grown}

    def switch(self) -> dict:
        from edgetvm.runtime.subnets import switch_cost

        return switch_cost(self.sr, self.data)

    def run(self, msg: dict) -> dict:
        from edgetvm.runtime.subnets import Budget

        budget = Budget(msg["time_ms"], msg["memory_bytes"])
        out = []
        per_call = self.policy == "per-call" and self.mode != "dense"
        # What the device grants, read from its cgroup: this side changes it only between messages. Every
        # read of a cgroup file here is CPU time charged to the device's quota (memory.stat about 40 us),
        # so a call reads what it must and no more: its own time is the budget's.
        quota_us = self.quota_us()
        share = quota_us / self.full_quota_us
        limit = int((self.mem / "memory.limit_in_bytes").read_text())
        self.quota.quota_ms = quota_us / 1e3
        # The kernel's own memory for the worker (page tables, slab) is charged against the limit too: a
        # subnet that fits by its pages and the anonymous memory alone thrashed (read pages back at every
        # call). Per message: it moves slowly. The mean policy keeps its rule as it was.
        self.kmem = self.kernel_memory() if per_call else 0
        if self.mode == "dress":
            self.follow_anonymous_memory()
        if msg.get("line_start"):
            # this side wrote the quota before sending the line (CFS refilled it then); the worker was
            # waiting, so its CPU time then is at most what it was at the refill
            self.quota.refilled(self.idle_cpu_ms)
        for _ in range(msg["count"]):
            loaded = False
            preds = left = missing = None
            if self.mode == "dense":
                level, fits, pred, args = 0, True, float("nan"), self.dense_args
                fits_on_mean = True
            else:
                mean = self.chooser.choose(budget, share)
                fits_on_mean = mean.fits
                if per_call:
                    preds, left, missing = self.predict(quota_us, first=not out and msg.get("line_start", False))
                    c = self.chooser.choose(budget, share, preds)
                    pred = preds[c.level]
                else:
                    c, pred = mean, self.chooser.predicted(mean.level, share)
                level, fits = c.level, c.fits
            anon = self.anon if self.mode == "dress" else None   # what the choice counted
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
            cpu0 = time.process_time()
            t = time.perf_counter()
            if self.mode == "dress":
                self.sr.call(self.level_args[level])
            elif self.mode == "dense":
                self.runner.call(args)
            else:
                if self.loaded != level:   # load it (open, map, first call) within this inference's time
                    self.runner = None
                    self.runner = self.Runner(self.open_artifact(self.arts[level].path))
                    _no_readahead(self.arts[level].weights_path)
                    self.loaded, loaded = level, True
                self.runner.run({**self.inputs, "subnet": np.array([0], np.int32)})
            end = time.perf_counter()
            cpu1 = time.process_time()
            self.last_level, self.warm_calls = level, self.warm_calls + 1
            ms, cpu_ms = (end - t) * 1e3, (cpu1 - cpu0) * 1e3
            if per_call:   # a throttling within the call: the refill came after its start, not after the look
                self.quota.look(end * 1e3, cpu1 * 1e3, self.nr_throttled())
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults
            if per_call and self.correction is not None and not self.quota.just_throttled and faults == 0:
                self.correction.add(self.last_cold, self.last_base[level], ms)
            rss, cache = self.held_parts()
            if self.mode == "dress":
                self.follow_anonymous_memory(rss)
            rec = {"level": level, "fits": fits, "share": round(share, 6), "quota_us": quota_us,
                   "predicted_ms": pred, "ms": ms, "cpu_ms": cpu_ms, "budget_ms": budget.time_ms,
                   "miss": ms > budget.time_ms, "memory_bytes": rss + cache,
                   "budget_memory_bytes": budget.memory_bytes, "memory_limit": limit, "loaded": loaded,
                   "page_ins": faults, "anon_bytes": anon,
                   "kernel_bytes": self.kmem,
                   "fits_on_mean": fits_on_mean, "predicted_all": preds, "quota_left_ms": left,
                   "missing_pages": missing,
                   "throttled": bool(per_call and self.quota.just_throttled)}
            if self.mode == "dense":   # it runs whatever the budget: over the memory budget is a miss too
                rec["miss"] = rec["miss"] or rec["memory_bytes"] > budget.memory_bytes
            out.append(rec)
        return {"records": out}

    def predict(self, quota_us: int, first: bool) -> tuple[list[float], float, list[int] | None]:
        """This call's latency of every subnet (per_call_ms): the quota left now, each subnet's pages not
        resident now (dress) at the calibrated cost of reading one back, and its cold latency if the worker
        was off the CPU just before (the `first` call of a message, or throttled since the last call)."""
        cpu = time.process_time() * 1e3
        left = self.quota.look(time.perf_counter() * 1e3, cpu, self.nr_throttled())
        # Calls since the worker was last off the CPU (waiting for this side, or throttled): subnet j's
        # warm-up curve at that count, and no less than measured just after the subnet that ran last (a
        # denser subnet's data beyond the sparser prefix is not in the caches).
        if first or self.quota.just_throttled or self.last_level is None:
            self.warm_calls = 0
        n = min(self.warm_calls, WARMUP_CALLS - 1)
        base = [self.chooser.warmup_ms[j][n] if self.last_level is None or n == 0 else
                max(self.chooser.warmup_ms[j][n], self.chooser.after_ms[self.last_level][j])
                for j in range(len(self.chooser.predicted_ms))]
        self.last_base, self.last_cold = base, n == 0
        if self.correction is not None:
            f = self.correction.factor(n == 0)
            base = [b * f for b in base]
        k = len(self.chooser.predicted_ms)
        missing = [0] * k
        if self.pages is not None:
            missing = self.residency.missing(self.pages)
        preds = [per_call_ms(base[j], left, quota_us / 1e3, self.period_us / 1e3, self.cpus,
                             missing[j] * self.page_in_ms) for j in range(k)]
        return preds, left, (missing if self.pages is not None else None)

    def prefetch(self, msg: dict) -> dict:
        """At a budget change: the subnet the new budget chooses with its pages resident, the quota just
        refilled and warm caches (the line's calls after its first: a cold first call may take a sparser,
        nested, so resident, one), its missing pages read in now (timed here, outside every call)."""
        from edgetvm.runtime.subnets import Budget

        budget = Budget(msg["time_ms"], msg["memory_bytes"])
        quota_us = max(1000, round(msg["share"] * self.full_quota_us))   # as this side is about to write it
        self.kmem = self.kernel_memory()
        self.follow_anonymous_memory()
        f = self.correction.factor(False) if self.correction is not None else 1.0
        c = self.chooser.choose(budget, msg["share"],
                                [per_call_ms(p * f, quota_us / 1e3, quota_us / 1e3, self.period_us / 1e3, self.cpus)
                                 for p in self.chooser.predicted_ms])
        t = time.perf_counter()
        # the pages of every subnet whose memory the budget does not fit (nested: the densest such one's)
        over = [k for k in range(len(self.pages)) if self.chooser.memory_bytes[k] > budget.memory_bytes]
        n = self.residency.page_in(self.pages[c.level], spare=self.pages[min(over)] if over else None)
        return {"level": c.level, "pages": n, "ms": (time.perf_counter() - t) * 1e3}


def worker_main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m edgetvm.runtime.dress_device")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--cgroup", action="append", default=[])
    p.add_argument("--plan")
    p.add_argument("--policy", choices=POLICIES, default="per-call")
    p.add_argument("--adapt", action="store_true", help="per-call: correct the calibration from the calls' own times")
    p.add_argument("artifacts", nargs="+")
    args = p.parse_args(argv)
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)   # anything else printed goes to the log, not into the protocol
    w = _Worker(args)
    proto.write(json.dumps({"pid": os.getpid(), "full_quota_us": w.full_quota_us}) + "\n")
    proto.flush()
    ops = {"calibrate": lambda m: w.calibrate(), "switch": lambda m: w.switch(), "run": w.run, "prefetch": w.prefetch,
           "latencies": lambda m: setattr(w.chooser, "predicted_ms", list(m["predicted_ms"])) or {}}
    for line in sys.stdin:   # EOF: the caller is gone
        msg = json.loads(line)
        proto.write(json.dumps(ops[msg["op"]](msg)) + "\n")
        proto.flush()
        w.idle_cpu_ms = time.process_time() * 1e3
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
