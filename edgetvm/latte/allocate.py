"""Sub-model allocation: each device's width ratio and local steps for a round.

LATTE: given a round deadline, every device gets the widest sub-model with which it can still do at
least `min_steps` local steps within the deadline by the cost model's *predicted* step time, then as
many steps (up to `local_steps`) as fit. Sub-models must fit the device's training memory; a device
that cannot fit even the smallest sub-model is left out with a warning. The static baselines:
FedAvg gives everyone the full model; HeteroFL/FedRolex pick, once, the widest ratio whose FLOPs
share (ratio^2) does not exceed the device's share of the fleet's best nominal GFLOP/s.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from edgetvm.latte import models
from edgetvm.latte.devices import Profile


@dataclass
class Assignment:
    client: int
    profile: str
    width: float | None        # None: left out
    steps: int = 0
    predicted_s: float = 0.0   # predicted time of its local work this round
    reason: str = ""


def train_memory_bytes(arch: dict, width: float, batch: int) -> int:
    """Training memory of a sub-model: parameters, gradients and updated parameters (3x), plus the
    batch's activations, their gradients and ReLU masks (3x); fp32."""
    sub = models.sub_arch(arch, width)
    acts = 0
    if sub["kind"] == "mlp":
        acts = sum([models.N_IN, *sub["hidden"], models.N_CLASSES])
    else:
        hw = 64
        acts = models.N_IN
        for c in sub["channels"]:
            acts += 2 * c * hw
            hw //= 4
        acts += sub["hidden"] + models.N_CLASSES
    return 3 * models.param_bytes(sub) + 3 * 4 * batch * acts


def fits(profile: Profile, arch: dict, width: float, batch: int) -> bool:
    return train_memory_bytes(arch, width, batch) <= profile.memory_bytes


def _leave_out(c, p, reason) -> Assignment:
    warnings.warn(f"device {c} ({p.name}) left out of the round: {reason}", stacklevel=3)
    return Assignment(c, p.name, None, 0, 0.0, reason)


def latte(fleet: dict[int, Profile], step_s, arch: dict, batch: int, local_steps: int,
          deadline: float | None = None, min_steps: int | None = None,
          widths=models.WIDTHS) -> tuple[list[Assignment], float]:
    """`step_s(profile, width)` is the predicted seconds per step. Returns (assignments, deadline)."""
    widths = sorted(widths, reverse=True)
    min_steps = min_steps or max(1, local_steps // 4)
    ok = {c: [w for w in widths if fits(p, arch, w, batch)] for c, p in fleet.items()}
    if deadline is None:
        # slow enough for the slowest device's smallest sub-model with min_steps,
        # and for the fastest device's largest sub-model with all its steps
        need = [step_s(fleet[c], ws[-1]) * min_steps for c, ws in ok.items() if ws]
        best = [step_s(fleet[c], widths[0]) * local_steps for c, ws in ok.items() if ws and ws[0] == widths[0]]
        deadline = max(max(need, default=0.0), min(best, default=0.0))
    out = []
    for c, p in fleet.items():
        if not ok[c]:
            out.append(_leave_out(c, p, f"even the 1/{int(1 / widths[-1])} sub-model needs "
                                        f"{train_memory_bytes(arch, widths[-1], batch) / 2**20:.2f} MiB, "
                                        f"it has {p.memory_mib:g} MiB"))
            continue
        chosen = None
        for w in ok[c]:
            t = step_s(p, w)
            if t * min_steps <= deadline * 1.0001:
                chosen = (w, min(local_steps, max(min_steps, int(math.floor(deadline / t)))), t)
                break
        if chosen is None:  # cannot make the deadline: smallest model, as few steps as fit
            w = ok[c][-1]
            t = step_s(p, w)
            chosen = (w, max(1, int(deadline // t)), t)
        w, steps, t = chosen
        out.append(Assignment(c, p.name, w, steps, steps * t))
    return out, deadline


def static(fleet: dict[int, Profile], arch: dict, batch: int, local_steps: int, full: bool,
           widths=models.WIDTHS) -> list[Assignment]:
    """FedAvg (full=True) or HeteroFL/FedRolex ratios from nominal compute."""
    widths = sorted(widths, reverse=True)
    top = max(p.nominal_gflops for p in fleet.values())
    out = []
    for c, p in fleet.items():
        if full:
            cands = [widths[0]]
        else:
            share = p.nominal_gflops / top
            cands = [w for w in widths if w * w <= share + 1e-9] or [widths[-1]]
        cands = [w for w in cands if fits(p, arch, w, batch)]
        if not cands:
            what = "the full model" if full else f"a {widths[-1]:g}-width sub-model or smaller"
            out.append(_leave_out(c, p, f"{what} does not fit its {p.memory_mib:g} MiB"))
            continue
        out.append(Assignment(c, p.name, cands[0], local_steps))
    return out
