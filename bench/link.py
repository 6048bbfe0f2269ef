"""Achieved transfer rate over each emulated link profile: TVM RPC uploads and downloads, measured / nominal.

    python bench/link.py [--links narrowband-1mbit,lte-5mbit] [--sizes 100000,1000000,4000000] [--repeat 5]

Per link profile (targets/links/): an EmulatedLink and, in its namespace, an EmulatedDevice without
a device profile (no CPU quota: the link is what is measured). Each tensor size is uploaded
(`remote.copyfrom(x)`) and downloaded (`remote.numpy()`) `--repeat` times, alternating; a rate is
bytes / median seconds, next to the profile's nominal bandwidth (bytes/s = Mbit/s * 1e6 / 8). A
transfer whose nominal time is over --long-s seconds is repeated 3 times only. Also per link: the
median round trip of an RPC call that moves almost no data (the added delay shows there), and a reference
row over the unshaped loopback to a local server, next to plain TCP over the same loopback: TVM 0.27's
RPC serializes a tensor's bytes one at a time on the sending side (~25 ns a byte, ~40 MB/s a core on
the machine this was written on), so on an unshaped or fast link RPC, not the link, sets the rate,
and a device under a CPU quota pays it out of its quota. Downloads are checked bit-identical.
Needs root (network namespaces, tc, cgroups).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import tvm

from edgetvm.runtime.device import EmulatedDevice
from edgetvm.runtime.link import EmulatedLink, unavailable_reason
from edgetvm.runtime.signals import sigterm_raises
from edgetvm.targets.links import list_links, load_link


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def call_rtt_s(session, calls: int = 20) -> float:
    # Not `dev.exist`: TVM's client answers that one for a CPU without asking the server.
    f = session.get_function("edgetvm.device.whereami")
    return statistics.median(timed(f) for _ in range(calls))


def transfer_s(session, nbytes: int, repeat: int) -> tuple[float, float]:
    """Median seconds of an upload and of a download of `nbytes`, alternating."""
    x = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    remote = tvm.runtime.empty(x.shape, "uint8", session.cpu())
    up, down = [], []
    for _ in range(repeat):
        up.append(timed(lambda: remote.copyfrom(x)))
        got = []
        down.append(timed(lambda: got.append(remote.numpy())))
        if got[0].tobytes() != x.tobytes():
            raise RuntimeError(f"a download of {nbytes} bytes came back different")
    return statistics.median(up), statistics.median(down)


def tcp_s(nbytes: int, repeat: int) -> float:
    """Median seconds to send `nbytes` over plain TCP on the loopback (a thread receives): the floor
    under the RPC rows."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def receive():
        conn, _ = listener.accept()
        with conn:
            for _ in range(repeat):
                left = nbytes
                while left:
                    left -= len(conn.recv(min(left, 1 << 20)))
                conn.sendall(b"k")

    threading.Thread(target=receive, daemon=True).start()
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    times = []
    with socket.create_connection(listener.getsockname()) as sock:
        for _ in range(repeat):
            times.append(timed(lambda: (sock.sendall(data), sock.recv(1))))
    listener.close()
    return statistics.median(times)


def measure(session, sizes: list[int], repeat: int, nominal_bps: float | None, long_s: float) -> list[dict]:
    rows = []
    for n in sizes:
        reps = 3 if nominal_bps and n / nominal_bps > long_s else repeat
        up, down = transfer_s(session, n, reps)
        rows.append({"bytes": n, "repeat": reps, "up_Bps": n / up, "down_Bps": n / down})
    return rows


def print_rows(name: str, mbit: float | None, delay_ms: float, rtt_s: float, rows: list[dict]) -> None:
    nominal = mbit * 1e6 / 8 if mbit else None
    for r in rows:
        ratio = (f"{r['up_Bps'] / nominal:6.3f}  {r['down_Bps'] / nominal:6.3f}" if nominal
                 else f"{'-':>6}  {'-':>6}")
        print(f"{name:18} {mbit or 0:8g} {delay_ms:6g} {rtt_s * 1e3:8.2f} {r['bytes'] / 1e3:8.0f} {r['repeat']:3d} "
              f"{r['up_Bps'] / 1e6:9.3f} {r['down_Bps'] / 1e6:9.3f}  {ratio}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--links", default=",".join(link.name for link in list_links()))
    p.add_argument("--sizes", default="100000,1000000,4000000")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--long-s", type=float, default=5.0)
    args = p.parse_args(argv)
    if reason := unavailable_reason():
        print(f"error: {reason}", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    profiles = sorted((load_link(n) for n in args.links.split(",")), key=lambda l: (l.bandwidth_mbit, l.delay_ms))
    print(f"{'link':18} {'Mbit/s':>8} {'delay':>6} {'RTT ms':>8} {'KB':>8} {'n':>3} "
          f"{'up MB/s':>9} {'down MB/s':>9}  {'up/nom':>6}  {'dn/nom':>6}")
    with sigterm_raises():
        with EmulatedDevice(None) as server:
            session = server.session()
            rows = measure(session, sizes, args.repeat, None, 0)
            print_rows("loopback (none)", None, 0, call_rtt_s(session), rows)
            del session
        for r in rows:
            tcp = r["bytes"] / tcp_s(r["bytes"], args.repeat)
            print(f"{'loopback plain TCP':18} {'':8} {'':6} {'':8} {r['bytes'] / 1e3:8.0f} {args.repeat:3d} "
                  f"{tcp / 1e6:9.1f} {'':9}  RPC upload / TCP: {r['up_Bps'] / tcp:.3f}", flush=True)
        for profile in profiles:
            with EmulatedLink(profile) as link, EmulatedDevice(None, link=link) as device:
                session = device.session()
                rtt = call_rtt_s(session)
                rows = measure(session, sizes, args.repeat, profile.bytes_per_s, args.long_s)
                print_rows(profile.name, profile.bandwidth_mbit, profile.delay_ms, rtt, rows)
                del session
    return 0


if __name__ == "__main__":
    sys.exit(main())
