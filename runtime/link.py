"""A network link between an emulated device and this machine, shaped in the kernel.

The device side is a network namespace (`ip netns`) joined to the root namespace by a veth pair,
one /30 of 10.213.0.0/16 per link: the host end gets .1, the end inside the namespace .2. The
namespace has no other route, so whatever runs in it reaches this machine only, over the veth.

Bandwidth: a `tbf` qdisc on each veth end shapes what that end sends (the host end: server ->
device, the device end: device -> server). tbf counts whole Ethernet frames, so TCP payload gets
about 95% of the nominal rate (1448 of 1514 bytes), as on a real link. The bucket holds two full
frames or 0.5 ms at the rate, whichever is larger: a bigger bucket lets a 10 KB transfer pass at
line speed (a 12.5 KB bucket made 10 KB at 100 Mbit 16% faster than nominal), one frame's worth
lost 10-20% at 20 Mbit on this host (measured with plain TCP; the qdisc waits for the next token on a
timer, probably what a busy host delays). The queue holds 4 MiB (or 100 ms at the rate, if more), as
a cellular base station's buffer for one device does: with 100 ms, TCP over the veth (no round trip
to slow it) overflowed a 5 Mbit/s queue (62 KB) with a 77 KB tensor, and the drops cost
retransmission timeouts: three tensors (141 KiB) crossed in 238-648 ms, mean 302-438, where the
rate gives 238, and their sending took the device 5.5-6.0 ms of CPU a frame; with 4 MiB, 238-244 ms
and 3.4-3.7 ms.

Delay: this kernel has no netem (nor any qdisc that delays), so a profile's `delay_ms` is added in
user space. A server in the namespace listens on the namespace's loopback (`listen_host`), and
`expose(port)` starts a relay process inside the namespace on device_address:port that forwards
each TCP connection to it, holding every chunk it reads back for delay_ms before passing it on, in
both directions. So every byte arrives delay_ms later one way, a request/reply pays 2 x delay_ms
more, and the bytes still cross the tbf-shaped veth pair before reaching the relay. What it does
not do: the TCP connection that crosses the veth ends at the relay, so its congestion control
never sees the long round trip (no slow start over a long RTT, no bandwidth-delay-product limit);
and the delay applies to connections made to the device through `expose`, not to connections the
device opens itself (its tracker registration). The relay is a process of its own, not threads of
the caller: as threads in the client's process it deadlocked, the client freeing a remote Function
(TVM sends the free and waits for the reply) while holding the GIL the relay threads needed to
carry that reply.

Everything a link makes is named after the edgetvm command that owns it (leftovers.netns_name,
`etv<owner pid>h<slot>` for the veth), is removed on exit, on exceptions and on Ctrl-C/SIGTERM
(as a KeyboardInterrupt), and `remove_stale_links()` removes what a killed process left.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import queue
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgetvm.errors import UserError
from edgetvm.runtime.leftovers import NETNS_DIR, NETNS_PREFIX, netns_name, owner_env, owner_pid
from edgetvm.runtime.signals import deferred
from edgetvm.targets.links import LinkProfile, load_link, parse_bandwidth

SUBNET = ipaddress.ip_network("10.213.0.0/16")
SLOTS = SUBNET.num_addresses // 4          # one /30 per link
VETH_PREFIX = "etv"                        # + owner pid + h/d + slot in hex: at most 15 characters
LOCK_PATH = Path("/run/edgetvm-links.lock")
MIN_BURST_BYTES = 3200                     # two full Ethernet frames
BURST_S = 0.0005
QUEUE_BYTES = 4 << 20                      # tbf drops what does not fit (see above)
QUEUE_MIN_S = 0.1
RELAY_START_TIMEOUT_S = 15.0
_VETH_NAME = re.compile(re.escape(VETH_PREFIX) + r"(\d+)[hd][0-9a-f]+")
_NETNS_NAME = re.compile(re.escape(NETNS_PREFIX) + r"(\d+)-")


def unavailable_reason() -> str | None:
    """None when this process can make emulated links (root, ip, tc and nsenter), else why not."""
    if os.geteuid() != 0:
        return "emulated links need root (network namespaces, veth pairs, tc)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nsenter", "util-linux")):
        if not shutil.which(tool):
            return f"{tool} not found (apt-get install {package})"
    return None


def _run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def _run_all(argvs: list[list[str]]) -> None:
    """Commands started together, each checked as _run does."""
    procs = [(argv, subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
             for argv in argvs]
    errors = []
    for argv, proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            errors.append(f"`{' '.join(argv)}` failed: {err.strip()}")
    if errors:
        raise RuntimeError("; ".join(errors))


def _run_quietly(*argv: str) -> None:
    """For removal: what is already gone is fine."""
    subprocess.run(argv, capture_output=True)


def tbf_args(mbit: float) -> list[str]:
    rate = mbit * 1e6 / 8
    burst = max(MIN_BURST_BYTES, int(rate * BURST_S))
    limit = max(QUEUE_BYTES, int(rate * QUEUE_MIN_S))
    return ["tbf", "rate", f"{round(mbit * 1e6)}bit", "burst", str(burst), "limit", str(limit)]


def slot_addresses(slot: int) -> tuple[str, str]:
    """(host end, device end) addresses of link slot `slot`."""
    base = SUBNET.network_address + 4 * slot
    return str(base + 1), str(base + 2)


def _used_slots() -> set[int]:
    used = set()
    for line in _run("ip", "-o", "-4", "addr", "show").splitlines():
        m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)", line)
        if m and ipaddress.ip_address(m.group(1)) in SUBNET:
            used.add((int(ipaddress.ip_address(m.group(1))) - int(SUBNET.network_address)) // 4)
    with contextlib.suppress(OSError):
        for p in NETNS_DIR.iterdir():
            if m := re.search(r"-link(\d+)$", p.name):
                used.add(int(m.group(1)))
    return used


@contextlib.contextmanager
def _slot_lock():
    # Two processes opening links at once must not pick the same /30.
    with open(LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # zombies hold nothing


def _kill_processes_in(netns: str) -> None:
    """SIGKILL whatever still runs in the namespace: while anything does, the namespace (and its
    veth end) outlives `ip netns del`."""
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(map(_pid_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)


class EmulatedLink:
    """A shaped veth pair between the root namespace and a fresh network namespace.

    `host_address` is this machine's end, `device_address` the namespace's; `netns_command(argv)`
    runs a command inside the namespace; `expose(port)` is the address a client here uses to reach
    a server listening in the namespace (through the delay relay when the profile has a delay).
    """

    def __init__(self, profile: LinkProfile | str):
        self.profile = load_link(profile) if isinstance(profile, str) else profile
        self.rate_mbit = self.profile.bandwidth_mbit
        self.delay_s = self.profile.delay_ms / 1e3
        self.netns: str | None = None
        self.host_veth: str | None = None
        self.device_veth: str | None = None
        self.host_address = self.device_address = ""
        self._relays: dict[int, subprocess.Popen] = {}
        self.unshaped_ports: list[int] = []

    # ------------------------------------------------------------------ making and removing

    def open(self) -> "EmulatedLink":
        if reason := unavailable_reason():
            raise UserError(f"cannot emulate link '{self.profile.name}': {reason}")
        # A signal between making a resource and recording it would leak it: hold signals back.
        with deferred():
            try:
                self._make()
            except BaseException:
                self.close()
                raise
        return self

    def _make(self) -> None:
        owner = owner_pid()
        with _slot_lock():
            slot = min(set(range(SLOTS)) - _used_slots())
            self.host_address, self.device_address = slot_addresses(slot)
            self.netns = netns_name(f"link{slot}")
            _run("ip", "netns", "add", self.netns)
            self.host_veth = f"{VETH_PREFIX}{owner}h{slot:x}"
            self.device_veth = f"{VETH_PREFIX}{owner}d{slot:x}"
            _run("ip", "link", "add", self.host_veth, "type", "veth", "peer", "name", self.device_veth)
            # Once the host end has its address the slot is taken for everyone else.
            _run("ip", "addr", "add", f"{self.host_address}/30", "dev", self.host_veth)
        _run("ip", "link", "set", self.device_veth, "netns", self.netns)
        _run("ip", "-n", self.netns, "addr", "add", f"{self.device_address}/30", "dev", self.device_veth)
        _run("ip", "link", "set", self.host_veth, "up")
        _run("ip", "-n", self.netns, "link", "set", self.device_veth, "up")
        _run("ip", "-n", self.netns, "link", "set", "lo", "up")
        for side in self._sides():
            _run("tc", *side, "qdisc", "add", "dev", self._dev(side), "root", *tbf_args(self.rate_mbit))

    def close(self) -> None:
        with deferred():
            for relay in self._relays.values():
                relay.kill()
                relay.wait()
                relay.stdout.close()
            self._relays.clear()
            if self.host_veth:
                # Deleting one end deletes the pair and both qdiscs at once.
                _run_quietly("ip", "link", "del", self.host_veth)
            if self.netns:
                _kill_processes_in(self.netns)
                _run_quietly("ip", "netns", "del", self.netns)
            self.netns = self.host_veth = self.device_veth = None
            self.unshaped_ports = []

    def __enter__(self) -> "EmulatedLink":
        try:
            return self.open()
        except BaseException:  # a Ctrl-C held back by open() lands here, after the resources exist
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ shaping

    def _sides(self) -> list[list[str]]:
        """tc's arguments for each end: the host end, then the end inside the namespace."""
        return [[], ["-n", self.netns]]

    def _dev(self, side: list[str]) -> str:
        return self.device_veth if side else self.host_veth

    def _tbf_at(self) -> list[str]:
        """Where each end's tbf sits: the root, or under class 1:2 of the htb qdisc `unshaped` puts first."""
        return ["parent", "1:2", "handle", "20:"] if self.unshaped_ports else ["root"]

    def set_rate(self, mbit: float | str) -> None:
        """Changes the bandwidth of both directions at once (a number in Mbit/s or "10Mbit")."""
        mbit = parse_bandwidth(mbit)
        # Both ends at once: a controller changes the rate every slot, and each tc takes ~3 ms.
        _run_all([["tc", *side, "qdisc", "change", "dev", self._dev(side), *self._tbf_at(), *tbf_args(mbit)]
                  for side in self._sides()])
        self.rate_mbit = mbit

    def unshaped(self, port: int) -> None:
        """Lets the TCP traffic of the device's `port` (a server in the namespace) bypass the shaping in
        both directions: a control connection that drives the device must not queue behind the data
        the device sends over the link (an emulation's need; a real device is not driven over its
        radio). Each end's root becomes an htb qdisc with two unlimited classes: 1:1 for that port, 1:2
        (everything else) holding the tbf as before."""
        if not self.unshaped_ports:
            for side in self._sides():
                dev = self._dev(side)
                _run("tc", *side, "qdisc", "del", "dev", dev, "root")
                # This kernel has no prio qdisc: an htb root whose two classes never limit (10 Gbit/s),
                # the shaping left to the same tbf as before, under the default class.
                _run("tc", *side, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "2")
                for cls in ("1:1", "1:2"):
                    _run("tc", *side, "class", "add", "dev", dev, "parent", "1:", "classid", cls, "htb",
                         "rate", "10gbit", "burst", "1mb", "cburst", "1mb", "quantum", "60000")
                _run("tc", *side, "qdisc", "add", "dev", dev, "parent", "1:2", "handle", "20:",
                     *tbf_args(self.rate_mbit))
        for side in self._sides():
            # The device end sends from the port, the host end to it.
            match = "sport" if side else "dport"
            _run("tc", *side, "filter", "add", "dev", self._dev(side), "parent", "1:", "protocol", "ip",
                 "prio", "1", "u32", "match", "ip", match, str(port), "0xffff", "flowid", "1:1")
        self.unshaped_ports.append(port)

    def qdiscs(self) -> dict[str, dict]:
        """The shaping qdisc of each end as the kernel reports it: {"host": {...}, "device": {...}} with
        kind, rate_mbit, burst_bytes and latency_ms."""
        out = {}
        for name, side in zip(("host", "device"), self._sides()):
            qs = json.loads(_run("tc", "-j", *side, "qdisc", "show", "dev", self._dev(side)))
            root = next(q for q in qs if (q.get("handle") == "20:" if self.unshaped_ports else q.get("root")))
            opts = root.get("options", {})
            out[name] = {"kind": root["kind"], "rate_mbit": opts.get("rate", 0) * 8 / 1e6,
                         "burst_bytes": opts.get("burst"), "latency_ms": opts.get("lat", 0) / 1e3}
        return out

    # ------------------------------------------------------------------ reaching the namespace

    def netns_command(self, argv: list[str]) -> list[str]:
        """argv run inside the link's namespace."""
        return ["nsenter", f"--net={NETNS_DIR / self.netns}", "--", *argv]

    @property
    def listen_host(self) -> str:
        """Where a server in the namespace listens: behind the delay relay if the link has a delay."""
        return "127.0.0.1" if self.delay_s else self.device_address

    def expose(self, port: int) -> tuple[str, int]:
        """The address of a server listening on listen_host:port, for clients on this machine (or a
        tracker) to connect to. With a delay, the first call starts the relay in front of it."""
        if self.delay_s and port not in self._relays:
            with deferred():
                self._relays[port] = self._start_relay(port)
        return self.device_address, port

    def _start_relay(self, port: int) -> subprocess.Popen:
        argv = [sys.executable, "-m", "edgetvm.runtime.link", "relay", f"{self.device_address}:{port}",
                f"127.0.0.1:{port}", str(self.profile.delay_ms)]
        proc = subprocess.Popen(self.netns_command(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                env={**os.environ, **owner_env()}, start_new_session=True)
        ready, _, _ = select.select([proc.stdout], [], [], RELAY_START_TIMEOUT_S)
        if not ready or proc.stdout.readline().strip() != b"listening":
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the delay relay for {self.device_address}:{port} did not start within "
                               f"{RELAY_START_TIMEOUT_S:.0f} s (exit {proc.returncode})")
        return proc


class DelayRelay:
    """Forwards each TCP connection made to `listen` on to `target`, every chunk held back `delay_s`
    in each direction (a delay line: chunks keep their order and spacing). Threads: run it in a
    process of its own (`python -m edgetvm.runtime.link relay`), see the module's docstring."""

    CHUNK = 1 << 16
    MAX_CHUNKS = 256  # 16 MiB in flight per direction; beyond that the sender is held back

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float):
        self.target, self.delay_s = target, delay_s
        self.sock = socket.create_server(listen)
        self._conns: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True, name="delay-relay").start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        line: queue.Queue = queue.Queue(self.MAX_CHUNKS)
        threading.Thread(target=self._release, args=(line, dst, src), daemon=True).start()
        while True:
            try:
                chunk = src.recv(self.CHUNK)
            except OSError:
                chunk = b""
            line.put((time.monotonic() + self.delay_s, chunk))
            if not chunk:
                return

    @staticmethod
    def _release(line: queue.Queue, dst: socket.socket, src: socket.socket) -> None:
        while True:
            due, chunk = line.get()
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                if not chunk:
                    dst.shutdown(socket.SHUT_WR)  # the end of the stream arrives late too
                    return
                dst.sendall(chunk)
            except OSError:
                with contextlib.suppress(OSError):
                    src.shutdown(socket.SHUT_RDWR)
                return

    def close(self) -> None:
        self._closed = True
        # shutdown, not just close: it wakes the threads blocked in accept and recv.
        for s in [self.sock, *self._conns]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def remove_stale_links() -> list[str]:
    """Removes the network namespaces (with the processes still in them) and veth pairs that an
    edgetvm process which is no longer alive left behind; returns what it removed. Owners are read
    from the names; a live owner's links are left alone."""
    removed = []
    with contextlib.suppress(OSError):
        for p in sorted(NETNS_DIR.iterdir()):
            m = _NETNS_NAME.match(p.name)
            if m and not _pid_alive(int(m.group(1))):
                _kill_processes_in(p.name)
                _run_quietly("ip", "netns", "del", p.name)
                removed.append(f"netns {p.name}")
    for line in _run("ip", "-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        m = _VETH_NAME.fullmatch(name)
        if m and not _pid_alive(int(m.group(1))):
            _run_quietly("ip", "link", "del", name)
            removed.append(f"veth {name}")
    return removed


def _relay_main(listen: str, target: str, delay_ms: str) -> None:
    host, port = listen.rsplit(":", 1)
    to_host, to_port = target.rsplit(":", 1)
    DelayRelay((host, int(port)), (to_host, int(to_port)), float(delay_ms) / 1e3)
    print("listening", flush=True)
    threading.Event().wait()  # serves until the link kills it


if __name__ == "__main__" and sys.argv[1:2] == ["relay"]:
    _relay_main(*sys.argv[2:5])
