"""Link profiles: one TOML file per link in this folder (or in $EDGETVM_LINKS, os.pathsep-separated).

A link joins an emulated device to the server side (runtime/link.py shapes it in the kernel). Its
fields: name, description, bandwidth_mbit (a number, or a string such as "10Mbit"), delay_ms (one
way, each direction; default 0). Where a link is asked for by name, a bandwidth string ("500kbit")
also does: a link of that rate and no added delay.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgetvm.errors import UserError

LINKS_DIR = Path(__file__).resolve().parent
REQUIRED = ("name", "description", "bandwidth_mbit")
# tc reads "mbps" as megaBYTES per second: only the unambiguous "bit" spellings are accepted.
_UNITS = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}
_BANDWIDTH = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class LinkProfile:
    name: str
    description: str
    bandwidth_mbit: float
    delay_ms: float = 0.0     # added one way, in each direction
    path: Path | None = None

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_mbit * 1e6 / 8


def parse_bandwidth(text: str | int | float) -> float:
    """Mbit/s from "10Mbit", "500kbit", "1Gbit" (or a plain number, already in Mbit/s)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        mbit = float(text)
    else:
        m = _BANDWIDTH.fullmatch(str(text))
        unit = m.group(2).lower() if m else ""
        if unit not in _UNITS:
            raise UserError(f"bandwidth '{text}' is not a rate in bits per second; write it like "
                            f"10Mbit, 500kbit or 1Gbit (units: bit, kbit, Mbit, Gbit)")
        mbit = float(m.group(1)) * _UNITS[unit]
    if not mbit > 0:
        raise UserError(f"bandwidth '{text}' is not positive; give a rate above zero, like 5Mbit")
    return mbit


def _files() -> dict[str, Path]:
    from edgetvm.targets import toml_files

    return toml_files("EDGETVM_LINKS", LINKS_DIR)


def list_links() -> list[LinkProfile]:
    return [load_link_file(f) for f in _files().values()]


def load_link(name: str) -> LinkProfile:
    """A link profile by name, or a bare bandwidth string ("10Mbit") for a link without delay."""
    files = _files()
    if name in files:
        return load_link_file(files[name])
    if name[:1].isdigit() or name[:1] == ".":
        return LinkProfile(name=name, description=f"{name}, no added delay", bandwidth_mbit=parse_bandwidth(name))
    raise UserError(f"unknown link '{name}'; known links: {', '.join(sorted(files))}, or a bandwidth "
                    f"like 10Mbit (add a link as a TOML file in {LINKS_DIR} or $EDGETVM_LINKS)")


def load_link_file(path: str | Path) -> LinkProfile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"link file {path} cannot be read: {e}; fix the TOML syntax") from None
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise UserError(f"link file {path} lacks field(s) {', '.join(missing)}; add them "
                        f"(see {LINKS_DIR}/lte-5mbit.toml for an example)")
    if data["name"] != path.stem:
        raise UserError(f"link file {path} names itself '{data['name']}'; "
                        f"the name must match the file name '{path.stem}'")
    delay = data.get("delay_ms", 0)
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
        raise UserError(f"link file {path}: delay_ms must be a number of milliseconds >= 0, not {delay!r}")
    try:
        mbit = parse_bandwidth(data["bandwidth_mbit"])
    except UserError as e:
        raise UserError(f"link file {path}: {e}") from None
    return LinkProfile(name=data["name"], description=str(data["description"]), bandwidth_mbit=mbit,
                       delay_ms=float(delay), path=path)
