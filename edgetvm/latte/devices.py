"""Device profiles as data (targets/devices/*.toml) and their emulation with cgroup v1.

A profile's work runs in a cgroup with `cpuset.cpus` = its first `cpus` host CPUs, a CFS quota of
`cpu_quota` CPUs per 10 ms period and a memory limit of `memory_mib`. The nominal figures
(`nominal_gflops`, `mem_bandwidth_gbs`) are what a datasheet would say; cost models get them as
features, static baselines (HeteroFL) allocate from them.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgetvm.errors import UserError

import edgetvm.targets as _targets

DEVICES_DIR = Path(_targets.__file__).resolve().parent / "devices"
REQUIRED = {"name": str, "description": str, "cpus": int, "cpu_quota": float, "memory_mib": float,
            "nominal_gflops": float, "mem_bandwidth_gbs": float}
PERIOD_US = 10_000
RUNTIME_ALLOWANCE = 32 << 20


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    cpus: int
    cpu_quota: float          # CPUs of time per period (0.1 = 10% of one core)
    memory_mib: float         # memory the device has for training
    nominal_gflops: float
    mem_bandwidth_gbs: float
    path: Path | None = None
    board: str = ""           # a board in targets/ measured over TVM RPC instead of an emulated cgroup

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_mib * (1 << 20))

    @property
    def speed(self) -> float:
        """CPUs of compute it may use: the quota, capped by its cpuset."""
        return min(self.cpu_quota, float(self.cpus))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in REQUIRED}


def _files() -> dict[str, Path]:
    from edgetvm.targets import toml_files

    return toml_files("EDGETVM_DEVICES", DEVICES_DIR)


def load_profile_file(path: str | Path) -> Profile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"device profile {path} does not exist; give a TOML file "
                        f"(see {DEVICES_DIR}/phone-mid.toml)") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"device profile {path} cannot be read: {e}; fix the TOML syntax") from None
    for key, typ in REQUIRED.items():
        if key not in data:
            raise UserError(f"device profile {path} lacks field '{key}'; add it "
                            f"(see {DEVICES_DIR}/phone-mid.toml for an example)")
        val = data[key]
        ok = isinstance(val, str) if typ is str else (isinstance(val, (int, float)) and not isinstance(val, bool))
        if not ok:
            raise UserError(f"device profile {path}: field '{key}' must be a {typ.__name__}, not {val!r}")
    if data["cpus"] < 1 or data["cpu_quota"] <= 0 or data["memory_mib"] <= 0:
        raise UserError(f"device profile {path}: cpus >= 1, cpu_quota > 0 and memory_mib > 0 are required")
    board = data.get("board", "")
    if not isinstance(board, str):
        raise UserError(f"device profile {path}: field 'board' must be a board name from `edgetvm targets`")
    return Profile(**{k: REQUIRED[k](data[k]) for k in REQUIRED}, path=path, board=board)


def list_profiles(boards: bool = False) -> list[Profile]:
    """The emulated fleet; with `boards`, also the profiles of real boards (those need an RPC address)."""
    return [p for p in map(load_profile_file, _files().values()) if boards or not p.board]


def load_profile(name: str) -> Profile:
    if name.endswith(".toml") or os.sep in name:
        return load_profile_file(name)
    files = _files()
    if name not in files:
        raise UserError(f"unknown device profile '{name}'; known: {', '.join(sorted(files))} "
                        f"(add one as a TOML file in {DEVICES_DIR} or $EDGETVM_DEVICES)")
    return load_profile_file(files[name])


class DeviceCgroup:
    """cpu (CFS quota), cpuset and memory cgroups emulating one profile; `join(pid)` moves a process in."""

    def __init__(self, profile: Profile):
        from edgetvm.runtime.signals import deferred

        self.profile = profile
        self.cg = self.cpuset = None
        with deferred():  # a signal between a mkdir and the end of __init__ would leak the directory
            try:
                self._make(profile)
            except BaseException:
                self.close()
                raise

    def _make(self, profile: Profile) -> None:
        from edgetvm.runtime.cgroup import ROOT, Cgroup

        # memory_mib is what the device has free for training; the limit adds an allowance for the
        # measuring runtime's own new pages (the allocators check the training memory itself).
        self.cg = Cgroup(memory_bytes=profile.memory_bytes + RUNTIME_ALLOWANCE)
        period = PERIOD_US
        quota = max(1000, int(profile.cpu_quota * period))
        (self.cg.cpu / "cpu.cfs_period_us").write_text(str(period))
        (self.cg.cpu / "cpu.cfs_quota_us").write_text(str(quota))
        cpuset = ROOT / "cpuset" / self.cg.name
        cpuset.mkdir()
        self.cpuset = cpuset  # only once it is ours to remove
        host = sorted(os.sched_getaffinity(0))
        cpus = host[:max(1, min(profile.cpus, len(host)))]
        (self.cpuset / "cpuset.mems").write_text((ROOT / "cpuset" / "cpuset.mems").read_text().strip())
        (self.cpuset / "cpuset.cpus").write_text(",".join(map(str, cpus)))
        self.cpus = cpus

    def join(self, pid: int) -> None:
        for d in (self.cg.mem, self.cg.cpu, self.cpuset):
            (d / "cgroup.procs").write_text(str(pid))

    @property
    def paths(self) -> dict[str, str]:
        return {"memory": str(self.cg.mem), "cpu": str(self.cg.cpu), "cpuset": str(self.cpuset)}

    def throttled_us(self) -> int:
        for line in (self.cg.cpu / "cpu.stat").read_text().splitlines():
            if line.startswith("throttled_time"):
                return int(line.split()[1]) // 1000
        return 0

    def close(self) -> None:
        """Removes the three cgroups, killing what still runs in them."""
        from edgetvm.runtime.cgroup import remove

        if self.cg is not None:
            self.cg.close()
        if self.cpuset is not None:
            remove(self.cpuset)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def cgroups_unavailable() -> str | None:
    from edgetvm.runtime.cgroup import ROOT, unavailable_reason

    r = unavailable_reason()
    if r is None and not (ROOT / "cpuset" / "cgroup.procs").exists():
        r = f"no cgroup v1 cpuset controller at {ROOT / 'cpuset'}"
    return r
