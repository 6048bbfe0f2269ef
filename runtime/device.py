"""Emulated devices: TVM RPC servers with a device profile's limits, behind an emulated link.

    with EmulatedLink("lte-5mbit") as link, EmulatedDevice("phone-mid", link=link) as device:
        session = device.session()          # a tvm.rpc session; its traffic crosses the shaped link

An EmulatedDevice is TVM's RPC server (runtime/device_server.py) in the cpu, cpuset and memory
cgroups of a device profile (targets/devices/*.toml, latte.devices.DeviceCgroup: CPU quota, the
first `cpus` host CPUs, the memory limit), with TVM_NUM_THREADS = its CPUs; given a link, it runs
inside the link's network namespace and is reached at the link's device address (through the
link's delay relay if it has a delay), so every byte of a session crosses the shaped veth pair.
Without a profile it is a plain server on this machine (the "server" board of a split), without a
link it listens on 127.0.0.1. The memory limit counts what sessions allocate, not TVM itself
(device_server.py loads TVM before joining the cgroups).

With a tracker it registers under `key` (the tracker hands clients its address, so real boards and
emulated devices are reached the same way) and `session()` asks the tracker for it. A device
behind a link reaches the tracker at the link's host address: the tracker must listen on it or on
every address (`Tracker` below does).
"""

from __future__ import annotations

import os
import sys

from tvm import rpc

from edgetvm.runtime.emulated_board import HOST, RPCTracker, _logs_dir, _Service, free_port
from edgetvm.runtime.leftovers import owner_env
from edgetvm.runtime.signals import deferred


class Tracker(RPCTracker):
    """TVM's RPC tracker on every address of the root namespace: devices behind a link register at
    their link's host address, clients on this machine use 127.0.0.1."""

    host = "0.0.0.0"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def _tracker_address(tracker) -> str | None:
    return tracker.address if isinstance(tracker, RPCTracker) else tracker


class EmulatedDevice(_Service):
    """A TVM RPC server running as `profile` (a device profile or its name; None: no limits) behind
    `link` (an open EmulatedLink; None: on 127.0.0.1), registered with `tracker` under `key` if given."""

    name = "emulated device"

    def __init__(self, profile=None, link=None, tracker=None, key: str | None = None, port: int | None = None):
        from edgetvm.latte.devices import load_profile

        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        self.link = link
        self.tracker = _tracker_address(tracker)
        self.key = key or (self.profile.name if self.profile else "server")
        self.port = port or free_port()
        self.host = link.listen_host if link else HOST
        self.cgroup = None
        label = self.profile.name if self.profile else "server"
        self.log_path = _logs_dir() / f"device-{label}-{self.port}.log"

    # ------------------------------------------------------------------ starting and stopping

    def start(self, timeout: float = 60) -> "EmulatedDevice":
        """Starts the server and waits (at most `timeout` s) until it serves a session."""
        if self.link is not None and not self.link.netns:
            raise RuntimeError("the device's link is not open; open it first (`with EmulatedLink(...) as link`)")
        with deferred():  # a signal between making the cgroup and recording it would leak it
            try:
                self._make_cgroup()
                self._spawn(self._command(), self._environment())
                if self.link is not None:
                    self.link.expose(self.port)  # the delay relay, if any, before any client comes
            except BaseException:
                self.stop()
                raise
        self._wait_ready(self._registered if self.tracker else self._accepts_session, timeout)
        return self

    def _make_cgroup(self) -> None:
        if self.profile is not None:
            from edgetvm.latte.devices import DeviceCgroup

            self.cgroup = DeviceCgroup(self.profile)

    def _command(self) -> list[str]:
        argv = [sys.executable, "-m", "edgetvm.runtime.device_server", "--host", self.host, "--port", str(self.port)]
        if self.tracker:
            host, port = self.tracker.rsplit(":", 1)
            if self.link is not None:
                # From inside the namespace this machine is the link's host address.
                host = self.link.host_address
            argv += ["--tracker", f"{host}:{port}", "--key", self.key]
        if self.cgroup is not None:
            argv += [a for path in self.cgroup.paths.values() for a in ("--cgroup", path)]
        return self.link.netns_command(argv) if self.link is not None else argv

    def _environment(self) -> dict[str, str]:
        env = {**os.environ, **owner_env(), "PYTHONUNBUFFERED": "1"}
        if self.cgroup is not None:
            # TVM's pool would otherwise start one thread per host CPU and fight over the device's.
            env["TVM_NUM_THREADS"] = str(len(self.cgroup.cpus))
        return env

    def stop(self) -> None:
        """Kills the server's whole process group (its session children too), then removes the cgroup."""
        with deferred():
            super().stop()
            if self.cgroup is not None:
                self.cgroup.close()
                self.cgroup = None

    def cpu_seconds(self) -> float:
        """CPU time the device's processes have used so far (every thread of its cgroup, from schedstat)."""
        from pathlib import Path

        total = 0
        procs = Path(self.cgroup.paths["cpu"]) / "cgroup.procs"
        for pid in procs.read_text().split():
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    total += int((task / "schedstat").read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    pass  # a thread that ended meanwhile
        return total / 1e9

    # ------------------------------------------------------------------ reaching it

    @property
    def address(self) -> tuple[str, int]:
        """Where a client on this machine connects for a direct session."""
        return self.link.expose(self.port) if self.link is not None else (self.host, self.port)

    def session(self, session_timeout: int = 0):
        """A TVM RPC session on the device: through the tracker if it registered with one, else direct."""
        if self.tracker:
            host, port = self.tracker.rsplit(":", 1)
            return rpc.connect_tracker(host, int(port)).request(self.key, priority=1, session_timeout=session_timeout)
        return rpc.connect(*self.address, session_timeout=session_timeout)

    def _bound(self) -> bool:
        # Until TVM's server says it listens, a connect could reach nothing or wait forever.
        return f"bind to {self.host}:{self.port}" in self.log_path.read_text(errors="replace")

    def _accepts_session(self) -> bool:
        return self._bound() and self.session(session_timeout=60).cpu().exist

    def _registered(self) -> bool:
        if not self._bound():
            return False
        host, port = self.tracker.rsplit(":", 1)
        servers = rpc.connect_tracker(host, int(port)).summary()["server_info"]
        return any(s["key"] == f"server:{self.key}" and s["addr"][1] == self.port for s in servers)
