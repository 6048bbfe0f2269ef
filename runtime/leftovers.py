"""What edgetvm has left on this machine: its cgroups, processes, listening ports, mounts and network namespaces.

Everything long-lived that an edgetvm command makes carries a mark that names the command's pid:

* processes (emulated boards, trackers, the latte measuring child, TVM's worker pools): OWNER_ENV
  in their environment. The CLI sets it for all it starts; a board, started with a clean
  environment, gets it explicitly. Emulated-board processes are also known by their root
  directory, inside the boards cache.
* listening ports: the TCP sockets those processes listen on.
* cgroups: CGROUP_PREFIX + owner pid + "-" + random, directly under each v1 controller.
* mounts: anything mounted under the boards cache, in this mount namespace or another one (a
  board mounts proc, sys and dev in a private namespace that lives as long as its processes do).
* network namespaces (`ip netns`): NETNS_PREFIX + owner pid + "-" + purpose; `netns_name` makes
  such names.

`python -m edgetvm.runtime.leftovers` lists them and exits with 1 if there are any.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

PREFIX = "edgetvm-"
CGROUP_PREFIX = PREFIX
NETNS_PREFIX = PREFIX
OWNER_ENV = "EDGETVM_OWNER"
CGROUP_ROOT = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/run/netns")  # where `ip netns add` keeps its names
_OWNED_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-")


def cache_root() -> Path:
    return Path(os.environ.get("EDGETVM_CACHE") or Path.home() / ".cache" / "edgetvm")


def boards_dir() -> Path:
    """Where emulated boards keep their root file systems."""
    return cache_root() / "boards"


def owner_pid() -> int:
    """The edgetvm command responsible for what this process makes: the one that started it, else this one."""
    inherited = os.environ.get(OWNER_ENV, "")
    return int(inherited) if inherited.isdigit() else os.getpid()


def owner_env() -> dict[str, str]:
    """The mark for the environment of a process started with an environment of its own."""
    return {OWNER_ENV: str(owner_pid())}


def cgroup_name() -> str:
    return f"{CGROUP_PREFIX}{owner_pid()}-{uuid.uuid4().hex[:8]}"


def netns_name(purpose: str) -> str:
    """A network namespace name for `ip netns add` that the detector finds and attributes."""
    return f"{NETNS_PREFIX}{owner_pid()}-{purpose}"


@contextlib.contextmanager
def owning_children():
    """Within: every process this one starts carries OWNER_ENV = this pid (restored afterwards)."""
    old = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = str(os.getpid())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = old


@dataclass(frozen=True, order=True)
class Resource:
    kind: str  # "cgroup", "process", "port", "mount" or "netns"
    name: str  # a path, "PID COMMAND", "HOST:PORT (pid PID)", a mount point, a namespace name
    owner: int | None = None  # pid of the edgetvm command that made it, when known

    def __str__(self) -> str:
        return f"{self.kind} {self.name}" + (f" (made by edgetvm pid {self.owner})" if self.owner else "")


def find(boards: Path | None = None) -> list[Resource]:
    """Every edgetvm-made resource that exists now."""
    boards = Path(boards) if boards is not None else boards_dir()
    procs = _edgetvm_processes(boards)
    found = _cgroups() + _netns()
    found += [Resource("process", f"{p.pid} {p.command}", p.owner) for p in procs]
    found += _listening_ports(procs)
    found += _mounts_under(boards)
    return sorted(found, key=lambda r: (r.kind, r.name))


def new_since(before: list[Resource], after: list[Resource] | None = None) -> list[Resource]:
    """What `after` (default: now) has that `before` had not."""
    seen = set(before)
    return [r for r in (find() if after is None else after) if r not in seen]


# --------------------------------------------------------------------------------- cgroups and netns


def _owner_in_name(name: str) -> int | None:
    m = _OWNED_NAME.match(name)
    return int(m.group(1)) if m else None


def _cgroups() -> list[Resource]:
    found = []
    with contextlib.suppress(OSError):
        for controller in CGROUP_ROOT.iterdir():
            with contextlib.suppress(OSError):
                found += [Resource("cgroup", str(d), _owner_in_name(d.name))
                          for d in controller.glob(CGROUP_PREFIX + "*") if d.is_dir()]
    return found


def _netns() -> list[Resource]:
    with contextlib.suppress(OSError):
        return [Resource("netns", p.name, _owner_in_name(p.name))
                for p in NETNS_DIR.iterdir() if p.name.startswith(NETNS_PREFIX)]
    return []


# --------------------------------------------------------------------------------- processes and ports


@dataclass
class _Process:
    pid: int
    command: str
    owner: int | None


def _read(path: str, mode: str = "r"):
    with contextlib.suppress(OSError):
        with open(path, mode) as f:
            return f.read()
    return None


def _is_live(pid: str) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    # Zombies hold nothing, and this machine's init may never reap them.
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"


def _owner_in_environ(pid: str) -> int | None:
    environ = _read(f"/proc/{pid}/environ", "rb") or b""
    for entry in environ.split(b"\0"):
        key, _, value = entry.partition(b"=")
        if key == OWNER_ENV.encode() and value.isdigit():
            return int(value)
    return None


def _is_under(path: str | None, directory: Path) -> bool:
    return path is not None and (path + "/").startswith(str(directory).rstrip("/") + "/")


def _root_of(pid: str) -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/root")
    return None


def _pids() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit()]


def _edgetvm_processes(boards: Path) -> list[_Process]:
    """Live processes with the owner mark, or chrooted into a board's root file system."""
    found = []
    for pid in _pids():
        owner = _owner_in_environ(pid)
        if (owner is None and not _is_under(_root_of(pid), boards)) or not _is_live(pid):
            continue
        argv = (_read(f"/proc/{pid}/cmdline", "rb") or b"").split(b"\0")
        command = " ".join(a.decode(errors="replace") for a in argv if a)[:160]
        found.append(_Process(int(pid), command, owner))
    return found


def _address(hex_address: str) -> str:
    """'0100007F:2382' (as /proc/net/tcp writes it) -> '127.0.0.1:9090'."""
    import ipaddress

    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # The kernel prints each 32-bit word of the address in host (little-endian) byte order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return f"{ipaddress.ip_address(raw)}:{int(port, 16)}"


def _listening_sockets() -> dict[str, str]:
    """socket inode -> address of every listening TCP socket in this network namespace."""
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in (_read(table) or "").splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                listening[fields[9]] = _address(fields[1])
    return listening


def _listening_ports(procs: list[_Process]) -> list[Resource]:
    listening = _listening_sockets()
    found = []
    for p in procs:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p.pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{p.pid}/fd/{fd}")
                    inode = link[len("socket:["):-1] if link.startswith("socket:[") else None
                    if inode in listening:
                        found.append(Resource("port", f"{listening[inode]} (pid {p.pid})", p.owner))
    return found


# --------------------------------------------------------------------------------- mounts


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount_points(pid: str) -> list[str]:
    """Mount points as this machine's root sees them: /proc/PID/mounts gives them relative to
    the process's root (a board's processes are chrooted) and only those under it."""
    root = _root_of(pid) or "/"
    points = [_unescape(line.split()[1]) for line in (_read(f"/proc/{pid}/mounts") or "").splitlines()
              if len(line.split()) > 1]
    return [p if root == "/" else root.rstrip("/") + p for p in points]


def _mounts_under(boards: Path) -> list[Resource]:
    """Mounts under `boards` in every mount namespace, each attributed to an owner living in it."""
    by_namespace: dict[str, list[str]] = {}
    for pid in ["self", *_pids()]:
        with contextlib.suppress(OSError):
            by_namespace.setdefault(os.readlink(f"/proc/{pid}/ns/mnt"), []).append(pid)
    ours = by_namespace.get(os.readlink("/proc/self/ns/mnt"))
    found = set()
    for pids in by_namespace.values():
        # A private namespace is its processes'; this machine's own namespace is nobody's in particular.
        owner = None if pids is ours else next((o for o in map(_owner_in_environ, pids) if o is not None), None)
        # Its least chrooted process sees the most of a namespace.
        pid = min(pids, key=lambda p: len(_root_of(p) or ""))
        found |= {Resource("mount", p, owner) for p in _mount_points(pid) if _is_under(p, boards)}
    return list(found)


def main() -> int:
    found = find()
    for r in found:
        print(r)
    if not found:
        print(f"nothing edgetvm made is left (boards cache {boards_dir()})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
