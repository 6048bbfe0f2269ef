"""The board registry: one TOML file per board in this folder (or in $EDGETVM_BOARDS, os.pathsep-separated)."""

from __future__ import annotations

import os
import platform
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgetvm.errors import UserError

REQUIRED = ("name", "description", "arch", "cross_compiler", "memory_mib", "cores",
            "peak_gflops_per_core", "mem_bandwidth_gbs", "tvm_target")


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    arch: str                  # as `uname -m` prints it on the board
    cross_compiler: str        # "" means the host's own compiler
    memory_mib: int
    cores: int
    peak_gflops_per_core: float
    mem_bandwidth_gbs: float
    tvm_target: dict = field(repr=False)
    path: Path | None = None

    @property
    def peak_gflops(self) -> float:
        return self.peak_gflops_per_core * self.cores

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib << 20

    def target(self):
        """The TVM target; `num-cores` is filled in because MetaSchedule needs it."""
        import tvm

        return tvm.target.Target({"num-cores": self.cores, **self.tvm_target})

    def runs_on_host(self) -> bool:
        return self.arch == platform.machine()


def toml_files(env_var: str, builtin: Path) -> dict[str, Path]:
    """name -> file for every *.toml in $env_var's directories (os.pathsep-separated), then in `builtin`;
    an earlier directory's file overrides a later one of the same name (boards, devices, links alike)."""
    dirs = [Path(p) for p in os.environ.get(env_var, "").split(os.pathsep) if p] + [builtin]
    found: dict[str, Path] = {}
    for d in dirs:
        for f in sorted(d.glob("*.toml")):
            found.setdefault(f.stem, f)
    return found


def _board_files() -> dict[str, Path]:
    return toml_files("EDGETVM_BOARDS", Path(__file__).parent)


def list_boards() -> list[Board]:
    return [load_board_file(f) for f in _board_files().values()]


def load_board(name: str) -> Board:
    files = _board_files()
    if name not in files:
        raise UserError(f"unknown board '{name}'; valid boards: {', '.join(sorted(files))} "
                        f"(add one as a TOML file in {Path(__file__).parent} or $EDGETVM_BOARDS)")
    return load_board_file(files[name])


def load_board_file(path: Path) -> Board:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"board file {path} cannot be read: {e}; fix the TOML syntax") from None
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise UserError(f"board file {path} lacks field(s) {', '.join(missing)}; "
                        f"add them (see targets/rpi4.toml for an example)")
    if data["name"] != Path(path).stem:
        raise UserError(f"board file {path} names itself '{data['name']}'; "
                        f"the name must match the file name '{Path(path).stem}'")
    if data["memory_mib"] == "auto":
        data["memory_mib"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    if data["cores"] == "auto":
        data["cores"] = len(os.sched_getaffinity(0))
    tgt = dict(data["tvm_target"])
    if tgt.get("mcpu") == "auto":
        import tvm

        # "native" is refused by the wheel's LLVM; ask LLVM which CPU this is instead.
        tgt["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
    try:
        return Board(name=data["name"], description=data["description"], arch=data["arch"],
                     cross_compiler=data["cross_compiler"], memory_mib=int(data["memory_mib"]),
                     cores=int(data["cores"]), peak_gflops_per_core=float(data["peak_gflops_per_core"]),
                     mem_bandwidth_gbs=float(data["mem_bandwidth_gbs"]), tvm_target=tgt, path=Path(path))
    except (TypeError, ValueError) as e:
        raise UserError(f"board file {path} has a field of the wrong type ({e}); "
                        f"memory_mib and cores are integers, the figures numbers") from None
