"""A device's clocks, power and radio, read from its profile (targets/devices/NAME.toml).

    [dvfs]  freqs_mhz = [...]                     the clock steps; the highest is the profile's cpu_quota
    [power] busy_w_at_fmax, dynamic_share, idle_w   power of a busy core: static + kappa f^3
    [radio] bandwidth_mhz, max_tx_w, circuit_w, rate_fractions

Compute: a kernel measured at f_max takes t f_max / f at clock f (compute-bound scaling, which is what
the emulation does: the clock is a CFS quota of cpu_quota f / f_max). A busy core draws
P(f) = static + kappa f^3, with kappa f_max^3 = dynamic_share * busy_w_at_fmax, so energy per unit of
work, P(f) / f, is lowest at f* = (static / (2 kappa))^(1/3): below it static power dominates (race
to idle wins), above it the cube does.

Radio: a channel whose capacity at full transmit power is C (from the link trace) carries rate r <= C
at transmit power max_tx_w (2^(r/B) - 1) / (2^(C/B) - 1) (Shannon: r = B log2(1 + p g / N0), solved
for p), plus the radio's circuit power while it sends. The energy of sending is that power times the
time the radio is busy.

idle_w is reported only: the board's idle power is the same for every method over the same horizon.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError


@dataclass(frozen=True)
class Radio:
    bandwidth_mhz: float
    max_tx_w: float
    circuit_w: float
    rate_fractions: tuple[float, ...]

    def power_w(self, rate_mbit, capacity_mbit):
        """Power while sending at `rate_mbit` on a channel of `capacity_mbit` at full power (arrays ok)."""
        r = np.asarray(rate_mbit, dtype=float)
        c = np.maximum(np.asarray(capacity_mbit, dtype=float), 1e-9)
        b = self.bandwidth_mhz
        return self.circuit_w + self.max_tx_w * np.expm1(r / b * np.log(2)) / np.expm1(c / b * np.log(2))


@dataclass(frozen=True)
class DeviceEnergy:
    """The clocks and power models of one device profile."""
    device: str
    cpu_quota: float                  # CPUs of time per period at f_max
    freqs_mhz: tuple[float, ...]      # ascending
    busy_w_at_fmax: float
    dynamic_share: float
    idle_w: float
    radio: Radio

    @property
    def f_max(self) -> float:
        return self.freqs_mhz[-1]

    @property
    def kappa(self) -> float:
        """W per GHz^3 of the dynamic term."""
        return self.dynamic_share * self.busy_w_at_fmax / (self.f_max / 1e3) ** 3

    @property
    def static_w(self) -> float:
        return (1 - self.dynamic_share) * self.busy_w_at_fmax

    def busy_power_w(self, f_mhz):
        return self.static_w + self.kappa * (np.asarray(f_mhz, dtype=float) / 1e3) ** 3

    def speed(self, f_mhz):
        """Work done per second at clock f, in seconds of work measured at f_max."""
        return np.asarray(f_mhz, dtype=float) / self.f_max

    def quota(self, f_mhz: float) -> float:
        """The CFS quota (CPUs per period) that emulates clock f."""
        return self.cpu_quota * float(f_mhz) / self.f_max

    def energy_optimal_mhz(self) -> float:
        """The clock of the table with the least energy per unit of work, P(f) / f."""
        f = np.asarray(self.freqs_mhz)
        return float(f[np.argmin(self.busy_power_w(f) / f)])


def load(profile) -> DeviceEnergy:
    """The energy model of a device profile (a latte.devices.Profile); a profile without a frequency
    table, power or radio model is refused in one line."""
    path = Path(profile.path) if profile.path else None
    data = tomllib.loads(path.read_text()) if path else {}
    where = f"device profile '{profile.name}' ({path})"
    example = "see targets/devices/phone-mid.toml for an example"
    if "dvfs" not in data:
        raise UserError(f"{where} has no frequency table: add a [dvfs] table with freqs_mhz "
                        f"(and [power], [radio]) to use it with cutedge; {example}")
    for table in ("power", "radio"):
        if table not in data:
            raise UserError(f"{where} has a [dvfs] table but no [{table}] table; add it ({example})")

    def number(table, key, lo=0.0, hi=float("inf"), strict_lo=True):
        v = data[table].get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > lo if strict_lo else v >= lo) and v <= hi
        if not ok:
            raise UserError(f"{where}: [{table}] {key} must be a number in ({lo:g}, {hi:g}], not {v!r}; {example}")
        return float(v)

    freqs = data["dvfs"].get("freqs_mhz")
    if (not isinstance(freqs, list) or not freqs or any(isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0
                                                          for f in freqs) or sorted(set(freqs)) != list(freqs)):
        raise UserError(f"{where}: [dvfs] freqs_mhz must be a list of distinct positive clocks in MHz, "
                        f"ascending, not {freqs!r}; {example}")
    fracs = data["radio"].get("rate_fractions", [1.0])
    if (not isinstance(fracs, list) or not fracs or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                         or not 0 < x <= 1 for x in fracs)):
        raise UserError(f"{where}: [radio] rate_fractions must be a list of fractions of the link's capacity "
                        f"in (0, 1], not {fracs!r}; {example}")
    radio = Radio(number("radio", "bandwidth_mhz"), number("radio", "max_tx_w"),
                  number("radio", "circuit_w", strict_lo=False), tuple(sorted(set(float(x) for x in fracs))))
    return DeviceEnergy(profile.name, float(profile.cpu_quota), tuple(float(f) for f in freqs),
                        number("power", "busy_w_at_fmax"), number("power", "dynamic_share", hi=1.0),
                        number("power", "idle_w", strict_lo=False), radio)
