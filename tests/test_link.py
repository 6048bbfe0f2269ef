"""Emulated links and devices: a shaped veth pair into a network namespace, and TVM RPC servers
with a device profile's limits behind it. Every byte of a session crosses the shaped link, and
nothing the link or the device made outlives them."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import rpc

from edgetvm.errors import UserError
from edgetvm.latte.devices import cgroups_unavailable
from edgetvm.runtime import link as link_mod
from edgetvm.runtime.device import EmulatedDevice, Tracker
from edgetvm.runtime.emulated_board import _group_alive
from edgetvm.runtime.leftovers import OWNER_ENV
from edgetvm.runtime.link import EmulatedLink, remove_stale_links
from edgetvm.targets.links import list_links, load_link, parse_bandwidth

needs_root = pytest.mark.skipif(
    (reason := link_mod.unavailable_reason() or cgroups_unavailable()) is not None, reason=f"emulated links: {reason}"
)


# ---------------------------------------------------------------------------- profiles as data


def test_bandwidth_strings_are_read_as_mbit():
    assert parse_bandwidth("10Mbit") == 10
    assert parse_bandwidth("500kbit") == 0.5
    assert parse_bandwidth("1Gbit") == 1000
    assert parse_bandwidth("2.5mbit") == 2.5
    assert load_link("10Mbit").bandwidth_mbit == 10 and load_link("10Mbit").delay_ms == 0


@pytest.mark.parametrize("text", ["10Mbps", "fast", "10", "Mbit", "0Mbit", "10 Mbit/s"])
def test_a_bad_bandwidth_is_one_clear_user_error(text):
    with pytest.raises(UserError) as e:
        parse_bandwidth(text)
    message = str(e.value)
    assert "\n" not in message and f"'{text}'" in message and "Mbit" in message


def test_an_unknown_link_is_one_clear_user_error():
    with pytest.raises(UserError) as e:
        load_link("no-such-link")
    message = str(e.value)
    assert "\n" not in message and "'no-such-link'" in message and "lte-5mbit" in message


def test_link_profiles_are_data_files_with_rates_and_delays():
    links = {p.name: p for p in list_links()}
    assert {p.bandwidth_mbit for p in links.values()} >= {1, 5, 20, 100}
    assert links["lte-5mbit"].delay_ms == 0
    assert links["lte-5mbit-20ms"].delay_ms == 20
    assert all(p.path.parent.name == "links" for p in links.values())


# ---------------------------------------------------------------------------- the link itself


def _remains(netns: str, veth: str, cgroups: list[str] = (), pgid: int | None = None) -> list[str]:
    """What is left of a link's namespace and veth pair, a device's cgroups and process group."""
    left = []
    if netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        left.append(f"netns {netns}")
    if subprocess.run(["ip", "link", "show", veth], capture_output=True).returncode == 0:
        left.append(f"veth {veth} (and its qdisc)")
    left += [f"cgroup {c}" for c in cgroups if Path(c).exists()]
    if pgid is not None and _group_alive(pgid):
        left.append(f"process group {pgid}")
    return left


@needs_root
def test_the_link_is_shaped_in_the_kernel_on_both_ends_and_its_rate_can_change():
    with EmulatedLink("wifi-20mbit") as link:
        qdiscs = link.qdiscs()
        assert {end: (q["kind"], q["rate_mbit"]) for end, q in qdiscs.items()} == \
            {"host": ("tbf", 20.0), "device": ("tbf", 20.0)}
        # The device end is inside the namespace, the host end is not.
        inside = subprocess.run(["ip", "-n", link.netns, "-o", "link"], capture_output=True, text=True).stdout
        assert link.device_veth in inside and link.host_veth not in inside
        link.set_rate("5Mbit")
        assert [q["rate_mbit"] for q in link.qdiscs().values()] == [5.0, 5.0]
        netns, veth = link.netns, link.host_veth
    assert _remains(netns, veth) == []


def _class_bytes(link) -> dict[str, int]:
    """Bytes sent through each htb class of the host end."""
    out = subprocess.run(["tc", "-s", "class", "show", "dev", link.host_veth], capture_output=True, text=True).stdout
    # tc prints no JSON for htb classes: "class htb 1:1 ..." then " Sent N bytes ..."
    return {m[0]: int(m[1]) for m in re.findall(r"class htb (\S+) .*\n\s*Sent (\d+) bytes", out)}


def _send_into_namespace(link, port: int, nbytes: int) -> None:
    sink = ("import socket; s = socket.create_server(('%s', %d)); print('ready', flush=True); c, _ = s.accept()\n"
            "while c.recv(65536): pass" % (link.device_address, port))
    proc = subprocess.Popen(link.netns_command([sys.executable, "-c", sink]), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        import socket
        with socket.create_connection((link.device_address, port), timeout=30) as c:
            c.sendall(b"x" * nbytes)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()


@needs_root
def test_an_unshaped_port_bypasses_the_shaping_and_the_rest_stays_shaped():
    with EmulatedLink("wifi-20mbit") as link:
        link.unshaped(47001)
        assert {end: (q["kind"], q["rate_mbit"]) for end, q in link.qdiscs().items()} == \
            {"host": ("tbf", 20.0), "device": ("tbf", 20.0)}
        before = _class_bytes(link)
        _send_into_namespace(link, 47001, 300_000)
        mid = _class_bytes(link)
        assert mid["1:1"] - before["1:1"] >= 300_000 and mid["1:2"] - before["1:2"] < 30_000
        _send_into_namespace(link, 47002, 300_000)
        after = _class_bytes(link)
        assert after["1:2"] - mid["1:2"] >= 300_000 and after["1:1"] - mid["1:1"] < 30_000
        link.set_rate("5Mbit")   # the tbf under the default class, on both ends
        assert [q["rate_mbit"] for q in link.qdiscs().values()] == [5.0, 5.0]
        netns, veth = link.netns, link.host_veth
    assert _remains(netns, veth) == []


@needs_root
def test_a_tensor_crosses_the_link_to_a_device_bit_identical_and_runs_in_its_cgroup_and_namespace():
    raw = np.random.default_rng(0).integers(0, 2**32, 300_000, dtype=np.uint32)
    x = raw.view(np.float32)  # every bit pattern: NaN payloads, denormals, negative zero
    with pytest.raises(RuntimeError, match="leave on an exception"):
        with EmulatedLink("wifi-20mbit") as link, EmulatedDevice("phone-mid", link=link) as device:
            made = (link.netns, link.host_veth, list(device.cgroup.paths.values()), device.proc.pid)
            session = device.session()
            sent_before = int(Path(f"/sys/class/net/{link.host_veth}/statistics/tx_bytes").read_text())
            remote = tvm.runtime.tensor(x, session.cpu())
            sent = int(Path(f"/sys/class/net/{link.host_veth}/statistics/tx_bytes").read_text()) - sent_before
            assert sent >= x.nbytes, "the upload did not cross the shaped veth pair"
            assert session.get_function("edgetvm.device.sha256")(remote) == hashlib.sha256(x.tobytes()).hexdigest()
            assert remote.numpy().tobytes() == x.tobytes()

            where = json.loads(session.get_function("edgetvm.device.whereami")())
            cgroup = "/" + Path(device.cgroup.paths["cpu"]).name
            assert {c: where["cgroups"][c] for c in ("cpu", "cpuset", "memory")} == \
                {"cpu": cgroup, "cpuset": cgroup, "memory": cgroup}
            assert where["netns"] == f"net:[{os.stat(f'/run/netns/{link.netns}').st_ino}]"
            assert where["tvm_num_threads"] == str(device.profile.cpus)
            assert f"cpu:{cgroup}" in Path(f"/proc/{device.proc.pid}/cgroup").read_text()
            del remote, session
            raise RuntimeError("leave on an exception")
    assert _remains(made[0], made[1], made[2], made[3]) == []


@needs_root
def test_a_device_behind_a_delayed_link_registers_with_the_tracker_through_the_relay():
    with Tracker() as tracker, EmulatedLink("lte-5mbit-20ms") as link, \
            EmulatedDevice("iot-tiny", link=link, tracker=tracker, key=f"test-link-{os.getpid()}") as device:
        servers = rpc.connect_tracker("127.0.0.1", tracker.port).summary()["server_info"]
        addr = next(s["addr"] for s in servers if s["key"] == f"server:{device.key}")
        # The tracker sends clients to the device's end of the link, where the delay relay listens.
        assert list(addr) == [link.device_address, device.port]
        session = device.session()
        where = json.loads(session.get_function("edgetvm.device.whereami")())
        assert where["netns"] == f"net:[{os.stat(f'/run/netns/{link.netns}').st_ino}]"
        x = np.arange(50_000, dtype="float32")
        assert np.array_equal(tvm.runtime.tensor(x, session.cpu()).numpy(), x)


_CHILD = """
import json, sys, time
from edgetvm.runtime.signals import sigterm_raises
from edgetvm.runtime.link import EmulatedLink
from edgetvm.runtime.device import EmulatedDevice
with sigterm_raises():
    with EmulatedLink("lte-5mbit") as link, EmulatedDevice(sys.argv[1] or None, link=link) as device:
        cgroups = list(device.cgroup.paths.values()) if device.cgroup else []
        print(json.dumps([link.netns, link.host_veth, cgroups, device.proc.pid]), flush=True)
        time.sleep(600)
"""


def _start_child(profile: str) -> tuple[subprocess.Popen, list]:
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}  # the child owns what it makes
    child = subprocess.Popen([sys.executable, "-c", _CHILD, profile], stdout=subprocess.PIPE, text=True, env=env)
    line = child.stdout.readline()
    assert line, f"the child failed to start its link and device (exit {child.wait()})"
    return child, json.loads(line)


@needs_root
def test_sigterm_removes_the_link_the_device_and_its_cgroups():
    child, made = _start_child("iot-tiny")
    assert _remains(*made) != []
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=60)
    assert _remains(*made) == []


@needs_root
def test_what_a_killed_process_left_is_removed_and_a_live_link_is_not():
    child, made = _start_child("")
    with EmulatedLink("narrowband-1mbit") as mine:
        child.kill()  # SIGKILL: nothing of it runs its cleanups
        child.wait()
        assert _remains(*made) != []
        removed = remove_stale_links()
        assert f"netns {made[0]}" in removed
        assert _remains(*made) == []
        assert _remains(mine.netns, mine.host_veth) == [f"netns {mine.netns}", f"veth {mine.host_veth} (and its qdisc)"]
