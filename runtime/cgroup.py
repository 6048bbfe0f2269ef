"""Emulate a small board's limits with cgroup v1: a memory limit (page cache included) and a CPU quota."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgetvm.runtime.leftovers import CGROUP_ROOT as ROOT
from edgetvm.runtime.leftovers import cgroup_name
from edgetvm.runtime.signals import deferred

REMOVE_TIMEOUT_S = 10.0


def unavailable_reason() -> str | None:
    """None when this process may create memory and cpu cgroups (v1, as root)."""
    if os.geteuid() != 0:
        return "not root"
    for ctl in ("memory", "cpu"):
        if not (ROOT / ctl / "cgroup.procs").exists():
            return f"no cgroup v1 {ctl} controller at {ROOT / ctl}"
    return None


class Cgroup:
    """A fresh cgroup under the memory (and cpu) controllers; processes started by `run` live in it."""

    def __init__(self, memory_bytes: int | None = None, cpu_quota: float | None = None, name: str | None = None):
        # The name carries the owning command's pid, for runtime/leftovers.py.
        self.name = name or cgroup_name()
        self.mem = ROOT / "memory" / self.name
        self.cpu = ROOT / "cpu" / self.name
        self._made: list[Path] = []  # close removes only these: never a same-named cgroup of someone else
        with deferred():  # a signal between a mkdir and the end of __init__ would leak the directory
            try:
                self._configure(memory_bytes, cpu_quota)
            except BaseException:
                self.close()
                raise

    def _configure(self, memory_bytes: int | None, cpu_quota: float | None) -> None:
        for d in (self.mem, self.cpu):
            d.mkdir()
            self._made.append(d)
        # No swap here, but make sure a limit can never be met by swapping out.
        (self.mem / "memory.swappiness").write_text("0")
        if memory_bytes is not None:
            self.set_memory_limit(memory_bytes)
        if cpu_quota is not None:
            period = 100_000
            (self.cpu / "cpu.cfs_period_us").write_text(str(period))
            (self.cpu / "cpu.cfs_quota_us").write_text(str(int(cpu_quota * period)))

    def set_memory_limit(self, nbytes: int) -> None:
        (self.mem / "memory.limit_in_bytes").write_text(str(int(nbytes)))

    @property
    def max_usage(self) -> int:
        """Peak memory charged to the cgroup: resident memory plus page cache."""
        return int((self.mem / "memory.max_usage_in_bytes").read_text())

    def reset_max_usage(self) -> None:
        (self.mem / "memory.max_usage_in_bytes").write_text("0")

    @property
    def oom_kills(self) -> int:
        for line in (self.mem / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """Run a command inside the cgroup (it joins before exec, so all its memory is charged)."""
        def join():
            pid = str(os.getpid())
            (self.mem / "cgroup.procs").write_text(pid)
            (self.cpu / "cgroup.procs").write_text(pid)

        return subprocess.run(argv, preexec_fn=join, **kw)

    def close(self) -> None:
        """Removes the cgroup, killing what still runs in it (a cgroup with processes cannot be removed)."""
        with deferred():
            while self._made:
                remove(self._made.pop())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def remove(path: Path, timeout: float = REMOVE_TIMEOUT_S) -> None:
    """Removes the cgroup directory `path`, first killing the processes in it (this process moves out
    instead). Warns on stderr if it cannot within `timeout`: a leftover is worth a line, not a crash
    in the middle of another cleanup."""
    deadline = time.monotonic() + timeout
    while True:
        _empty(path)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            # EBUSY while a killed process is still exiting (freeing its memory takes a moment).
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                print(f"edgetvm: warning: cannot remove cgroup {path} ({e.strerror}); remove it with rmdir",
                      file=sys.stderr)
                return
        time.sleep(0.05)


def _empty(path: Path) -> None:
    try:
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return
    for pid in pids:
        if pid == os.getpid():
            (path.parent / "cgroup.procs").write_text(str(pid))
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cgroup_cpu_ns(cpu_dir: Path) -> int:
    """CPU time (ns) that the processes of a cgroup have used, all their threads counted."""
    total = 0
    with contextlib.suppress(OSError):
        for pid in (cpu_dir / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total
