"""Stages on emulated devices: each device a TVM RPC server in its profile's cgroups (CPU quota, cpuset,
memory) behind its own shaped link (runtime/device.py, runtime/link.py), one session per stage replica.

    devices = parse_devices("4xsbc-a53")                  # or "sbc-a53,tablet-old@wifi-20mbit", a fleet
    with EmulatedStages(plan, [[devices[0]], [devices[1]]], params) as reps:
        controller = Controller(reps.replicas, "1f1b", 4, reps.names)

Everything started (servers, cgroups, namespaces, veth pairs, qdiscs, the library directory) is removed
on exit, errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError

DEFAULT_LINK = "ethernet-100mbit"


def parse_devices(spec: str):
    """A device list: a fleet (name or .toml), or comma-separated PROFILE[@LINK] items, each optionally
    prefixed by a count ("4xsbc-a53"). Devices get host CPUs round-robin."""
    from edgetvm.latte.devices import load_profile
    from edgetvm.partition.pipeline.fleet import FleetDevice, _files, load_fleet
    from edgetvm.targets.links import load_link

    spec = spec.strip()
    if spec.endswith(".toml") or spec in _files():
        return list(load_fleet(spec).devices)
    ncpu = len(os.sched_getaffinity(0))
    out = []
    for item in [i.strip() for i in spec.split(",") if i.strip()]:
        count, _, rest = item.partition("x") if item.split("x", 1)[0].isdigit() else ("1", "", item)
        prof, _, link = rest.partition("@")
        try:
            p, ln = load_profile(prof), load_link(link or DEFAULT_LINK)
        except UserError as e:
            raise UserError(f"--devices {spec}: {e}") from None
        for _ in range(int(count)):
            out.append(FleetDevice(f"{p.name.split('-')[0]}{len(out)}", p, ln, len(out) % ncpu))
    if not out:
        raise UserError("--devices is empty; give e.g. 4xsbc-a53 or sbc-a53,tablet-old")
    return out


def stage_memory_bytes(plan, s: int, in_flight: int) -> int:
    """What stage s keeps on its device: weights, optimizer state and accumulated gradients, `in_flight`
    stashed input activations, and one micro-batch's activations and their gradients while it computes."""
    from edgetvm import train
    from edgetvm.pipetrain.stages import activation_shapes

    shapes = train.param_shapes(plan.model)
    w = sum(int(np.prod(shapes[n])) for n in plan.stage_weights()[s])
    state = sum(int(a.size) for a in plan.initial_state(s))
    acts = activation_shapes(plan.model, plan.micro_batch)
    a, b = plan.bounds[s], plan.bounds[s + 1]
    x = int(np.prod(acts[a - 1])) if a > 0 else plan.micro_batch * int(np.prod(plan.model.input_shape))
    inner = sum(int(np.prod(acts[i])) for i in range(a, b))
    return 4 * (2 * w + state + in_flight * x + 3 * inner)


def check_memory(plan, assignment, micro_batches: int, schedule: str) -> None:
    for s, devs in enumerate(assignment):
        in_flight = micro_batches if schedule == "gpipe" else min(plan.n_stages - s, micro_batches)
        need = stage_memory_bytes(plan, s, in_flight)
        # the TVM runtime's own allocations in the session (pools, workspace) come on top: keep a margin
        for d in devs:
            if need > 0.8 * d.profile.memory_bytes:
                raise UserError(f"device '{d.name}' ({d.kind}, {d.profile.memory_mib:g} MiB) cannot hold stage {s} "
                                f"(layers {plan.bounds[s]}-{plan.bounds[s + 1] - 1}: ~{need / 2**20:.0f} MiB of weights, "
                                f"optimizer state, gradients and activations); use more partitions, fewer "
                                f"micro-batches in flight (1f1b) or a bigger device")


def coordinator_bytes(addresses) -> int:
    """Payload bytes sent plus received by this process's host's TCP connections to `addresses`."""
    import re
    import subprocess

    total = 0
    for addr in addresses:
        text = subprocess.run(["ss", "-tinH", "dst", addr], capture_output=True, text=True, check=True).stdout
        for m in re.finditer(r"bytes_(?:acked|received):(\d+)", text):
            total += int(m.group(1))
    return total


class EmulatedStages:
    """The replicas of every stage of `plan` on emulated devices (assignment[s]: stage s's devices)."""

    def __init__(self, plan, assignment, params: dict[str, np.ndarray], states=None, log=lambda msg: None,
                 direct: bool = True):
        self.plan, self.assignment, self.params, self.log = plan, assignment, params, log
        self.direct = direct
        self.states = states
        self.replicas: list[list] = []
        self.names: list[list[str]] = []
        self.devices: dict = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "EmulatedStages":
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _open(self) -> None:
        from edgetvm.latte.devices import cgroups_unavailable
        from edgetvm.runtime.link import EmulatedLink, unavailable_reason
        from edgetvm.runtime.pipeline import FleetDevice, join_switch

        if reason := unavailable_reason() or cgroups_unavailable():
            raise UserError(f"cannot emulate the devices: {reason}; run as root, or train here with --local")
        tmp = Path(tempfile.mkdtemp(prefix="edgetvm-pipetrain-"))
        self._stack.callback(shutil.rmtree, tmp, True)
        lib = tmp / "stages.so"
        self.plan.executable().export_library(str(lib))
        names = self.plan.stage_weights()
        for s, devs in enumerate(self.assignment):
            arrays = tmp / f"stage{s}.npz"
            state = self.states[s] if self.states else self.plan.initial_state(s)
            np.savez(arrays, **{f"w{i}": self.params[n] for i, n in enumerate(names[s])},
                     **{f"s{i}": a for i, a in enumerate(state)})
            cfg = {"library": str(lib), "arrays": str(arrays), "n_weights": len(names[s]), "n_state": len(state),
                   "n_stages": self.plan.n_stages, "s": s}
            reps, labels = [], []
            for d in devs:
                link = self._stack.enter_context(EmulatedLink(d.link))
                if self.direct:
                    join_switch(link)
                dev = self._stack.enter_context(FleetDevice(d.profile, link, d.host_cpu, d.name))
                self.devices[d.name] = dev
                self.log(f"device {d.name}: {d.kind} (quota {d.profile.cpu_quota:g} CPU, {d.profile.memory_mib:g} MiB), "
                         f"{link.rate_mbit:g} Mbit/s link: stage {s} (layers {self.plan.bounds[s]}-"
                         f"{self.plan.bounds[s + 1] - 1})")
                from edgetvm.pipetrain.device import RemoteStage

                reps.append(RemoteStage(dev.session(), d.name, cfg))
                labels.append(f"stage {s} on device '{d.name}'")
            self.replicas.append(reps)
            self.names.append(labels)
        if self.direct and sum(len(reps) for reps in self.replicas) > 1:
            self._connect()

    def _connect(self) -> None:
        """Every replica a client of its neighbouring stages' replicas and of its stage's other replicas: a
        tensor leaves a device on its own link and enters the next one's on that one's (this machine routes
        between the namespaces)."""
        for s, reps in enumerate(self.replicas):
            for st, d in zip(reps, self.assignment[s]):
                st.listen(self.devices[d.name].link.device_address)
        S = len(self.replicas)
        for s, reps in enumerate(self.replicas):
            for st in reps:
                st.connect_neighbours(self.replicas[s + 1] if s + 1 < S else [], self.replicas[s - 1] if s else [],
                                      reps if len(reps) > 1 else [])
        self.log("stages connected device to device: activations and gradients bypass the coordinator")

    def coordinator_bytes(self) -> int:
        """Bytes sent and received so far by this machine's TCP connections to the devices (the coordinator's
        sessions), as the kernel counts them (`ss`): what crosses the coordinator, not what goes from device
        to device (those connections live in the devices' namespaces)."""
        return coordinator_bytes([dev.link.device_address for dev in self.devices.values()])

    def link_bytes(self) -> dict[str, int]:
        """Per device, the bytes its link carried so far out of the device (the veth end in its namespace)."""
        from edgetvm.runtime.link import _run

        out = {}
        for name, dev in self.devices.items():
            text = _run("ip", "-n", dev.link.netns, "-j", "-s", "link", "show", "dev", dev.link.device_veth)
            out[name] = int(json.loads(text)[0]["stats64"]["tx"]["bytes"])
        return out

    def dead(self) -> list[str]:
        return [n for n, d in self.devices.items() if d.proc is None or d.proc.poll() is not None]
