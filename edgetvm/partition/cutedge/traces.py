"""Frame-arrival and link-capacity traces: data files, seeded generators, checks.

A trace is a CSV file with '#' comment lines before it; comments of the form `# key = value` are its
metadata (`slot_ms` is required: every trace is slotted), then a header, then one row per slot,
numbered from 0 without gaps:

    # edgetvm trace
    # slot_ms = 100
    # model = poisson, rate_fps = 10, seed = 0
    slot,frames                       (arrivals: frames arriving in the slot, an integer >= 0)
    0,1
    ...
    slot,mbit                         (link: the channel's capacity in the slot, Mbit/s > 0)

Generators (`edgetvm cutedge trace ...`), all seeded, so a trace can be made again from its metadata:

- arrivals `poisson`: Poisson(rate_fps x slot) frames per slot.
- arrivals `bursty`: a two-state Markov-modulated Poisson process (on/off camera activity): mean on
  and off durations, exponential; the off state arrives at `off_ratio` of the on state's rate, which
  is set so the long-run mean is rate_fps (the same arrival rate as the Poisson trace).
- link `lognormal-ar1`: log capacity follows a Gauss-Markov (AR(1)) process, stationary with the
  model's log mean and log standard deviation, lag-1 autocorrelation phi per 100 ms (phi^(slot/100)
  for another slot length), clipped to [min_mbit, max_mbit]. The models in targets/traces/link-models.toml
  were fitted here to the uplink Saturator traces of Winstein, Sivaraman, Balakrishnan (NSDI 2013;
  shipped with mahimahi), with `fit_saturator` below.
- link `recorded`: what the emulated link itself delivered, slot by slot (runtime/cutedge.py).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetvm.errors import UserError

import edgetvm.targets as _targets  # noqa: E402

TRACES_DIR = Path(_targets.__file__).resolve().parent / "traces"
KINDS = {"frames": "arrivals", "mbit": "link"}


@dataclass
class Trace:
    kind: str                   # "arrivals" or "link"
    slot_ms: float
    values: np.ndarray          # frames per slot (int) or Mbit/s per slot (float)
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def slot_s(self) -> float:
        return self.slot_ms / 1e3

    def __len__(self) -> int:
        return len(self.values)

    def mean_rate(self) -> float:
        """Frames per second (arrivals) or mean Mbit/s (link)."""
        return float(self.values.mean() / self.slot_s) if self.kind == "arrivals" else float(self.values.mean())


def resolve(name: str | Path) -> Path:
    """A trace file by path, or by name in targets/traces (with or without .csv)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (TRACES_DIR / str(name), TRACES_DIR / f"{name}.csv"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(f.stem for f in TRACES_DIR.glob("*.csv")))
    raise UserError(f"trace '{name}' is neither a file nor a trace in {TRACES_DIR} (known: {known}); "
                    f"make one with `edgetvm cutedge trace`")


def load(name: str | Path, kind: str | None = None) -> Trace:
    """Reads and checks a trace; anything wrong is one line naming the file and the line."""
    path = resolve(name)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"trace {path} cannot be read ({e.__class__.__name__}); give a CSV trace file") from None
    meta, rows, header = {}, [], None
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            key, eq, value = s[1:].partition("=")
            if eq and header is None:
                meta[key.strip()] = value.strip()
            continue
        if header is None:
            header = [c.strip() for c in s.split(",")]
            if len(header) != 2 or header[0] != "slot" or header[1] not in KINDS:
                raise UserError(f"trace {path} line {n}: header '{s}' is not 'slot,frames' or 'slot,mbit'")
            continue
        rows.append((n, s))
    if header is None or not rows:
        raise UserError(f"trace {path} has no rows; a trace is a header 'slot,frames' or 'slot,mbit' and one row per slot")
    got_kind = KINDS[header[1]]
    if kind is not None and got_kind != kind:
        raise UserError(f"trace {path} is a {got_kind} trace (column '{header[1]}'), but a {kind} trace is wanted here")
    try:
        slot_ms = float(meta["slot_ms"])
        if not (slot_ms > 0 and math.isfinite(slot_ms)):
            raise ValueError
    except (KeyError, ValueError):
        raise UserError(f"trace {path} lacks a positive '# slot_ms = N' line before its header") from None
    values = []
    for i, (n, s) in enumerate(rows):
        cells = [c.strip() for c in s.split(",")]
        try:
            if len(cells) != 2:
                raise ValueError
            slot = int(cells[0])
            v = int(cells[1]) if got_kind == "arrivals" else float(cells[1])
        except ValueError:
            raise UserError(f"trace {path} line {n}: '{s}' is not 'SLOT,{header[1].upper()}' "
                            f"({'an integer' if got_kind == 'arrivals' else 'a number'})") from None
        if slot != i:
            what = f"slot {i} is missing (gap before slot {slot})" if slot > i else f"slot {slot} is out of order or repeated"
            raise UserError(f"trace {path} line {n}: {what}; slots run from 0 without gaps")
        if got_kind == "arrivals" and v < 0:
            raise UserError(f"trace {path} line {n}: {v} frames; arrivals are counts >= 0")
        if got_kind == "link" and not (v > 0 and math.isfinite(v)):
            raise UserError(f"trace {path} line {n}: capacity {v} Mbit/s; a link's capacity is a number > 0")
        values.append(v)
    arr = np.array(values, dtype=np.int64 if got_kind == "arrivals" else np.float64)
    return Trace(got_kind, slot_ms, arr, meta, path)


def write(trace: Trace, path: str | Path) -> Path:
    """The trace as a CSV file (written beside it and renamed into place)."""
    import os
    import tempfile

    path = Path(path)
    col = "frames" if trace.kind == "arrivals" else "mbit"
    lines = ["# edgetvm trace", f"# slot_ms = {trace.slot_ms:g}"]
    lines += [f"# {k} = {v}" for k, v in trace.meta.items() if k != "slot_ms"]
    lines.append(f"slot,{col}")
    fmt = (lambda v: str(int(v))) if trace.kind == "arrivals" else (lambda v: f"{v:.4f}")
    lines += [f"{i},{fmt(v)}" for i, v in enumerate(trace.values)]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------- generators

def poisson(rate_fps: float, slots: int, slot_ms: float = 100, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    vals = rng.poisson(rate_fps * slot_ms / 1e3, slots)
    return Trace("arrivals", slot_ms, vals, {"model": "poisson", "rate_fps": rate_fps, "seed": seed})


def bursty(rate_fps: float, slots: int, slot_ms: float = 100, seed: int = 0, on_s: float = 1.0,
           off_s: float = 3.0, off_ratio: float = 0.1) -> Trace:
    """Two-state MMPP with the same long-run rate as Poisson(rate_fps)."""
    rng = np.random.default_rng(seed)
    tau = slot_ms / 1e3
    p_on = on_s / (on_s + off_s)
    lam_on = rate_fps / (p_on + (1 - p_on) * off_ratio)
    leave = {True: 1 - math.exp(-tau / on_s), False: 1 - math.exp(-tau / off_s)}
    on = bool(rng.random() < p_on)
    vals = np.empty(slots, dtype=np.int64)
    for t in range(slots):
        vals[t] = rng.poisson((lam_on if on else lam_on * off_ratio) * tau)
        if rng.random() < leave[on]:
            on = not on
    return Trace("arrivals", slot_ms, vals, {"model": "bursty", "rate_fps": rate_fps, "on_s": on_s, "off_s": off_s,
                                             "off_ratio": off_ratio, "seed": seed})


def link_models() -> dict[str, dict]:
    path = TRACES_DIR / "link-models.toml"
    return tomllib.loads(path.read_text())


def lognormal_ar1(model: str, slots: int, slot_ms: float = 100, seed: int = 0, scale: float = 1.0) -> Trace:
    """Capacity from a fitted link model of targets/traces/link-models.toml (scaled by `scale`)."""
    models = link_models()
    if model not in models:
        raise UserError(f"unknown link model '{model}'; known: {', '.join(sorted(models))} "
                        f"(targets/traces/link-models.toml)")
    p = models[model]
    rng = np.random.default_rng(seed)
    phi = p["lag1_100ms"] ** (slot_ms / 100.0)
    mu, sd = p["log_mean"], p["log_std"]
    x = np.empty(slots)
    x[0] = mu + sd * rng.standard_normal()
    for t in range(1, slots):
        x[t] = mu + phi * (x[t - 1] - mu) + sd * math.sqrt(1 - phi * phi) * rng.standard_normal()
    vals = np.clip(np.exp(x) * scale, p["min_mbit"], p["max_mbit"])
    return Trace("link", slot_ms, vals, {"model": f"lognormal-ar1 {model}", "scale": scale, "seed": seed,
                                         "source": p["source"]})


def fit_saturator(lines, slot_ms: float = 100, floor_mbit: float = 0.05) -> dict:
    """A lognormal-AR(1) model's parameters from a Saturator/mahimahi trace (one line per 1500-byte
    delivery opportunity, its millisecond): capacity per slot, its log mean, log std, lag-1 autocorrelation."""
    t = np.array([int(s) for s in lines if str(s).strip()])
    n = int(t.max() // slot_ms)
    cap = np.bincount((t // slot_ms).astype(int), minlength=n + 1)[:n] * 1500 * 8 / (slot_ms / 1e3) / 1e6
    lc = np.log(np.maximum(cap, floor_mbit))
    return {"log_mean": float(lc.mean()), "log_std": float(lc.std()),
            "lag1": float(np.corrcoef(lc[:-1], lc[1:])[0, 1]), "mean_mbit": float(cap.mean()),
            "seconds": float(t.max() / 1e3)}
