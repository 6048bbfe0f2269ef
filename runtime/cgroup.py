"""Emulate a small board's limits with cgroup v1: a memory limit (page cache included) and a CPU quota."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


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
        self.name = name or f"edgetvm-{uuid.uuid4().hex[:8]}"
        self.mem = ROOT / "memory" / self.name
        self.cpu = ROOT / "cpu" / self.name
        self.mem.mkdir()
        self.cpu.mkdir()
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
        for d in (self.mem, self.cpu):
            try:
                d.rmdir()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
