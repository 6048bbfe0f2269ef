"""A fleet as data: devices (emulated device profiles, or real boards by tracker key) and their links.

targets/fleets/NAME.toml (or $EDGETVM_FLEETS):

    name = "fleet-4"
    description = "..."
    [[device]]
    name = "cam0"            # unique in the fleet
    profile = "sbc-a53"      # targets/devices: CPU quota, memory, nominal figures
    link = "wifi-20mbit"     # targets/links: the device's access link (both directions), or
    # bandwidth = "20Mbit"
    # host_cpu = 1           # emulation: the host CPU its cpuset gets (default: the profile's first CPUs)
    # tracker_key = "rpi4"   # a real board registered with a tracker under this key

Topology: every device reaches the others through its own access link to a switch (this machine's
root network namespace), so a transfer from a to b is shaped by a's uplink and b's downlink: it gets
the slower of the two.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgetvm.errors import UserError

import edgetvm.targets as _targets

FLEETS_DIR = Path(_targets.__file__).resolve().parent / "fleets"


@dataclass(frozen=True)
class FleetDevice:
    name: str
    profile: object          # latte.devices.Profile
    link: object             # targets.links.LinkProfile
    host_cpu: int | None = None
    tracker_key: str = ""

    @property
    def kind(self) -> str:
        return self.profile.name

    @property
    def bandwidth_bps(self) -> float:
        return self.link.bandwidth_mbit * 1e6

    @property
    def speed(self) -> float:
        return self.profile.speed

    @property
    def memory_bytes(self) -> int:
        return self.profile.memory_bytes


@dataclass(frozen=True)
class Fleet:
    name: str
    description: str
    devices: tuple[FleetDevice, ...]
    path: Path | None = None

    def device(self, name: str) -> FleetDevice:
        for d in self.devices:
            if d.name == name:
                return d
        raise UserError(f"fleet {self.name} has no device '{name}'")

    def to_json(self) -> dict:
        return {"name": self.name, "path": str(self.path) if self.path else None,
                "devices": [{"name": d.name, "profile": d.kind, "link": d.link.name,
                             "bandwidth_mbit": d.link.bandwidth_mbit, "delay_ms": d.link.delay_ms,
                             "host_cpu": d.host_cpu, "tracker_key": d.tracker_key,
                             "cpu_quota": d.profile.cpu_quota, "memory_mib": d.profile.memory_mib}
                            for d in self.devices]}


def _files() -> dict[str, Path]:
    from edgetvm.targets import toml_files

    return toml_files("EDGETVM_FLEETS", FLEETS_DIR)


def list_fleets() -> list[str]:
    return sorted(_files())


def load_fleet(name_or_path: str | Path) -> Fleet:
    """A fleet by name (targets/fleets) or TOML path; any problem is one UserError line."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text:
        path = Path(text)
    else:
        files = _files()
        if text not in files:
            raise UserError(f"unknown fleet '{text}'; known: {', '.join(sorted(files))} "
                            f"(or give a .toml path; see {FLEETS_DIR}/fleet-2.toml)")
        path = files[text]
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"fleet file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"fleet file {path} does not parse: {e}") from None
    return _parse(data, path)


def _parse(data: dict, path: Path) -> Fleet:
    from edgetvm.latte.devices import load_profile
    from edgetvm.targets.links import LinkProfile, load_link

    entries = data.get("device")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"fleet file {path} has no [[device]] entries")
    devices, seen = [], set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(e.get("profile"), str):
            raise UserError(f"fleet file {path}: device #{i + 1} needs a name and a profile (strings)")
        if e["name"] in seen:
            raise UserError(f"fleet file {path}: device name '{e['name']}' appears twice")
        seen.add(e["name"])
        try:
            prof = load_profile(e["profile"])
        except UserError as err:
            raise UserError(f"fleet file {path}, device '{e['name']}': {err}") from None
        if ("link" in e) == ("bandwidth" in e):
            raise UserError(f"fleet file {path}, device '{e['name']}': give its link as link = NAME or "
                            f"bandwidth = RATE, one of the two")
        try:
            link = load_link(str(e.get("link") or e.get("bandwidth")))
        except UserError as err:
            raise UserError(f"fleet file {path}, device '{e['name']}': {err}") from None
        if not isinstance(link, LinkProfile):
            raise UserError(f"fleet file {path}, device '{e['name']}': bad link")
        cpu = e.get("host_cpu")
        if cpu is not None and (not isinstance(cpu, int) or cpu < 0):
            raise UserError(f"fleet file {path}, device '{e['name']}': host_cpu must be a CPU number")
        devices.append(FleetDevice(e["name"], prof, link, cpu, str(e.get("tracker_key", ""))))
    return Fleet(str(data.get("name", path.stem)), str(data.get("description", "")), tuple(devices), path)
