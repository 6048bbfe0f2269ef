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

Every cgroup and the worker are removed on exit, on errors and on Ctrl-C / SIGTERM (signals.deferred
around making and removing them; the cgroups carry the owner pid for runtime/leftovers.py).
"""

from __future__ import annotations

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
HEADROOM_BYTES = 256 << 10   # a limit is never set below the worker's anonymous memory plus this
CHUNK = 200                  # inferences per message: the worker's records stay small
CALIBRATION_CALLS = 15       # timed calls per subnet at the start (their median): this machine is loaded


class DeviceWorker:
    """A worker running artifacts in the cgroups of device profile `profile`; this side sets its quota and
    memory limit. mode "dress": one DRESS artifact, choosing per inference; "dense": one artifact run
    whatever the budget; "separate": one artifact per subnet (pruned models stored separately), chosen by
    the rule and predictions of `plan` (a DRESS calibration), the chosen one loaded when the choice changes."""

    def __init__(self, profile, mode: str, arts: list, inputs: dict[str, np.ndarray], plan: dict | None = None):
        from edgetvm.latte.devices import DeviceCgroup, cgroups_unavailable, load_profile

        if mode not in MODES:
            raise ValueError(mode)
        if reason := cgroups_unavailable():
            raise UserError(f"--device needs cgroups to emulate the device, and they are not available here: {reason}")
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        self.mode = mode
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
                argv = [sys.executable, "-m", "edgetvm.runtime.dress_device", "--mode", mode,
                        "--inputs", str(self.tmp / "inputs.npz"), *map(str, arts)]
                argv += [a for path in self.device.paths.values() for a in ("--cgroup", path)]
                if plan is not None:
                    argv += ["--plan", str(self.tmp / "plan.json")]
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
            self.set_share(b.cpu_share)
            limit, raised = self.set_memory(b.memory_bytes)
            th = self.throttled_periods()
            for start in range(0, n, CHUNK):
                out = self._send({"op": "run", "time_ms": b.time_ms, "memory_bytes": b.memory_bytes,
                                  "count": min(CHUNK, n - start)})
                for r in out["records"]:
                    r["line"] = len(lines)
                records += out["records"]
            lines.append({"share": b.cpu_share, "quota_us": self.quota_us(b.cpu_share), "count": n,
                          "memory_limit": limit, "limit_raised": raised,
                          "throttled_periods": self.throttled_periods() - th})
            i += n
        self.set_share(1.0)
        self.set_memory(None)
        return {"records": records, "lines": lines, "limit_raised": self.limit_raised,
                "oom_kills": self.device.cg.oom_kills}

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
            "limit_raised": run["limit_raised"], "oom_kills": run["oom_kills"], "per_share": check}


# ---------------------------------------------------------------------------------------------- the worker


class _Plan:
    """The choosing rule of SubnetRunner over predictions made elsewhere (mode "separate")."""

    def __init__(self, plan: dict):   # the memory figures are DRESS's, as measured at its calibration
        self.subnets = plan["subnets"]
        self.predicted_ms = plan["predicted_ms"]
        self.memory_bytes = plan["memory_bytes"]

    def choose(self, budget, share):
        from edgetvm.runtime.subnets import SubnetRunner

        return SubnetRunner.choose(self, budget, share)

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
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    target, done = str(Path(path).resolve()), 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if libc.madvise(lo, hi - lo, 1) == 0:   # MADV_RANDOM
                done += hi - lo
    return done


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

        self.mode = args.mode
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
        cg = {Path(d).parent.name: Path(d) for d in args.cgroup}
        self.cpu, self.mem = cg["cpu"], cg["memory"]
        for d in args.cgroup:
            Path(d, "cgroup.procs").write_text(str(os.getpid()))
        self.full_quota_us = self.quota_us()
        self.rss0 = _rss_bytes()

    def quota_us(self) -> int:
        return int((self.cpu / "cpu.cfs_quota_us").read_text())

    def held_parts(self) -> tuple[int, int]:
        """What the device's cgroup holds: anonymous pages and page cache (the weight pages touched) charged
        to it since the worker joined (memory.stat, exact; memory.usage_in_bytes moves in 512 KiB steps
        on this kernel)."""
        stat = dict(line.split() for line in (self.mem / "memory.stat").read_text().splitlines())
        return int(stat["rss"]), int(stat["cache"])

    def held(self) -> int:
        return sum(self.held_parts())

    def follow_anonymous_memory(self) -> None:
        """A subnet's memory = its weight pages (measured at calibration) + the anonymous memory the worker
        holds now: the loop's own pages grow during a run, and a budget that a subnet fits only by its
        calibration-time figure would make the kernel evict its weights at every call."""
        self.anon = self.held_parts()[0]
        self.chooser.memory_bytes = [f + self.anon for f in self.file_bytes]

    def calibrate(self) -> dict:
        if self.mode == "dress":
            mem, self.file_bytes = [0] * len(self.sr.subnets), [0] * len(self.sr.subnets)

            def measure(k):   # sparsest first, so what is held is subnet k's prefix and buffers
                rss, self.file_bytes[k] = self.held_parts()
                mem[k] = rss + self.file_bytes[k]

            self.sr.calibrate(self.data, repeat=CALIBRATION_CALLS, after_first_call=measure)
            self.sr.memory_bytes = mem
            return {"predicted_ms": self.sr.predicted_ms, "memory_bytes": mem, "file_bytes": self.file_bytes,
                    "rss_bytes": _rss_bytes() - self.rss0, "subnets": self.sr.subnets}
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
        for _ in range(msg["count"]):
            share = self.quota_us() / self.full_quota_us     # what the device grants now, read from its cgroup
            loaded = False
            if self.mode == "dense":
                level, fits, pred, args = 0, True, float("nan"), self.dense_args
            else:
                if self.mode == "dress":
                    self.follow_anonymous_memory()
                c = self.chooser.choose(budget, share)
                level, fits, pred = c.level, c.fits, self.chooser.predicted(c.level, share)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
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
            ms = (time.perf_counter() - t) * 1e3
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults
            peak = self.held()
            rec = {"level": level, "fits": fits, "share": round(share, 6), "quota_us": self.quota_us(),
                   "predicted_ms": pred, "ms": ms, "budget_ms": budget.time_ms, "miss": ms > budget.time_ms,
                   "memory_bytes": peak, "budget_memory_bytes": budget.memory_bytes,
                   "memory_limit": int((self.mem / "memory.limit_in_bytes").read_text()),
                   "rss_bytes": _rss_bytes() - self.rss0, "loaded": loaded, "page_ins": faults,
                   "anon_bytes": self.anon if self.mode == "dress" else None}
            if self.mode == "dense":   # it runs whatever the budget: over the memory budget is a miss too
                rec["miss"] = rec["miss"] or peak > budget.memory_bytes
            out.append(rec)
        return {"records": out}


def worker_main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m edgetvm.runtime.dress_device")
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--cgroup", action="append", default=[])
    p.add_argument("--plan")
    p.add_argument("artifacts", nargs="+")
    args = p.parse_args(argv)
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)   # anything else printed goes to the log, not into the protocol
    w = _Worker(args)
    proto.write(json.dumps({"pid": os.getpid(), "full_quota_us": w.full_quota_us}) + "\n")
    proto.flush()
    ops = {"calibrate": lambda m: w.calibrate(), "switch": lambda m: w.switch(), "run": w.run}
    for line in sys.stdin:   # EOF: the caller is gone
        msg = json.loads(line)
        proto.write(json.dumps(ops[msg["op"]](msg)) + "\n")
        proto.flush()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
