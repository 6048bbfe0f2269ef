"""The CutEdge controller: queues, and each slot's choice of (cut, clock, rate) by Lyapunov
drift-plus-penalty; and the policies it is compared with.

Per slot t of length tau the device sees A(t) new frames, its queues and the channel's capacity C(t).

- Q(t): work waiting on the device, in ms of device time at f_max (frames not computed yet, and what
  is left of the one computing). Served at f / f_max per ms of the slot.
- B(t): bytes computed and waiting to be sent (kB). Served at the chosen rate r <= C(t) (its payload
  share, see PAYLOAD_SHARE).
- Z(t): a virtual queue for a latency target D (optional): Z(t+1) = max(Z(t) + A(t) (l(t) - D), 0),
  where l(t) is the predicted latency of the slot's new frames; keeping Z stable keeps the frames'
  mean predicted latency <= D (Neely, Stochastic Network Optimization, 2010, ch. 4).

Each slot, over every (cut k, clock f, rate r) the controller minimises

    V * E(k, f, r) + Q (A w_k - served_Q) + B (A d_k - served_B) + Z A l(k, f, r)

where w_k and d_k are the cut's device work (ms) and bytes (kB) from the measured per-layer profiles,
served_Q = min(Q + A w_k, tau f / f_max), served_B = min(B, tau r') (r' the payload rate), and E the
slot's energy in mJ, priced so that a decision pays for what it commits: the new frames' work and
bytes at the cheapest energy per unit (e_cpu* at the energy-optimal clock, e_tx* at the cheapest rate
of the slot), plus what serving at (f, r) costs above that:

    E = A (w_k e_cpu* + d_k e_tx*) + (e_cpu(f) - e_cpu*) served_Q + (e_tx(r) - e_tx*) served_B.

Summed over slots, E is the device's energy (busy power P(f) x busy time, radio power x sending
time) up to the change of the backlog valued at the cheapest prices, so its time average is the
energy's. (Charging only the slot's own energy lets a cut's bytes look free when B is empty: they
are sent, and paid for, a slot later.) Enumeration is exact (a few hundred to a few thousand actions, vectorised).
Large V weighs energy more: the time-average energy comes within O(1/V) of the optimum while the
queues grow as O(V) (Neely 2010, Theorem 4.8).

Queues never go negative: every update is max(., 0). The units (mJ, ms, kB) fix what a value of V means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgetvm.partition import cuts as cutlib

# What the device's socket carries as payload, as a share of the rate the link is shaped to: the
# sender paces itself at this share so the shaped queue stays empty (runtime/cutedge.py), measured
# 0.904 of a 5 Mbit/s tbf link for 1 MB.
PAYLOAD_SHARE = 0.90


@dataclass(frozen=True)
class Cut:
    """One way to split a frame: its device ops, their time at f_max, what crosses, the server's time."""
    device: frozenset[int]
    work_s: float         # device seconds at f_max (processor busy: what its energy is charged for)
    bytes: int            # crossing bytes (data inputs and results the server needs included)
    server_s: float
    label: str = ""
    call_s: float = 0.0   # device stage wall time beyond the processor's (the testbed's RPC round trips)

    def stage_time(self, speed: float) -> float:
        return self.call_s + self.work_s / speed


@dataclass(frozen=True)
class Stage:
    """A cut's costs measured on the testbed: processor busy time (s at f_max), the device stage's wall
    time beyond it (call_s, not scaling with the clock), and the server's wall time."""
    work_s: float
    call_s: float
    server_s: float


@dataclass(frozen=True)
class Measured:
    """What a frame of each cut compiled on the testbed costs there: {device set: Stage}. The device part
    runs as one RPC call followed by the hand-over to the sender: it keeps the processor busy longer
    than its kernels' profiled sum (by 2-3 ms for ocr_cls on sbc-a53). A cut not compiled there costs
    its profile plus the median excess of the measured ones."""
    cuts: dict

    def stage(self, costs: cutlib.Costs, device: frozenset[int]) -> Stage:
        if device in self.cuts:
            return self.cuts[device]
        p = costs.parts(device)
        if not self.cuts:
            return Stage(p["device_s"], 0.0, p["server_s"])
        profiled = [costs.parts(d) for d in self.cuts]
        dev = max(float(np.median([m.work_s - q["device_s"] for m, q in zip(self.cuts.values(), profiled)])), 0.0)
        srv = max(float(np.median([m.server_s - q["server_s"] for m, q in zip(self.cuts.values(), profiled)])), 0.0)
        return Stage(p["device_s"] + dev, 0.0, p["server_s"] + srv)


def make_cut(costs: cutlib.Costs, device: frozenset[int], label: str = "", measured: Measured | None = None) -> Cut:
    """A cut's costs from the per-layer profiles, or, with `measured`, as the testbed measured them."""
    p = costs.parts(device)
    n = len(costs.graph.ops)
    label = label or ("device" if len(device) == n else "server" if not device else f"{len(device)}/{n}")
    if measured is None:
        return Cut(frozenset(device), p["device_s"], int(p["bytes"]), p["server_s"], label)
    m = measured.stage(costs, frozenset(device))
    return Cut(frozenset(device), m.work_s, int(p["bytes"]), m.server_s, label, m.call_s)


def candidate_cuts(costs: cutlib.Costs, envelope: cutlib.Envelope | None = None, measured: Measured | None = None) -> list[Cut]:
    """Every split point in topological order and CIC's envelope cuts, less those another cut beats on
    device work and bytes at once: the device's energy and queues depend on those two alone, so no
    choice of clock or rate can prefer a dominated cut (of two equal ones, the lesser server time stays).
    The server's time enters only the latency a frame sees."""
    def undominated(cands):
        keep: list[Cut] = []
        for c in sorted(cands, key=lambda c: (c.work_s, c.bytes, c.server_s, -len(c.device))):
            if not any(k.work_s <= c.work_s and k.bytes <= c.bytes for k in keep):
                keep.append(c)
        return keep

    # Which cuts, from the profiles (the testbed compiles these); their costs, as measured where known.
    cands = {d: make_cut(costs, d) for d in cutlib.prefixes(costs)}
    if envelope is not None:
        for d in envelope.cuts:
            cands.setdefault(d, make_cut(costs, d))
    keep = undominated(cands.values())
    if measured is not None:
        keep = undominated([make_cut(costs, c.device, measured=measured) for c in keep])
    return keep


@dataclass(frozen=True)
class Observation:
    slot: int
    arrivals: int
    capacity_mbit: float
    q_ms: float           # device work backlog, ms at f_max
    b_kb: float           # bytes waiting to be sent, kB


@dataclass(frozen=True)
class Action:
    cut: Cut
    f_mhz: float
    rate_mbit: float


class Policy:
    name = "policy"

    def decide(self, obs: Observation) -> Action:
        raise NotImplementedError

    def update(self, obs: Observation, action: Action) -> None:
        """After the slot: virtual queues (none for the baselines)."""

    def fixed_cuts(self) -> list[Cut]:
        """The cuts it may choose beyond the candidate cuts (the testbed compiles them beforehand)."""
        return []


class CutEdge(Policy):
    """Lyapunov drift-plus-penalty over (cut, clock, rate)."""

    def __init__(self, cuts: list[Cut], energy, slot_s: float, V: float, latency_target_s: float | None = None,
                 payload_share: float = PAYLOAD_SHARE):
        if not V > 0:
            raise ValueError("V must be positive")
        self.name = f"cutedge V={V:g}"
        self.cuts, self.energy, self.tau, self.V = cuts, energy, slot_s, float(V)
        self.target = latency_target_s
        self.share = payload_share
        self.Z = 0.0
        self.w = np.array([c.work_s * 1e3 for c in cuts])            # ms at f_max
        self.d = np.array([c.bytes / 1e3 for c in cuts])              # kB
        self.sv = np.array([c.server_s * 1e3 for c in cuts])          # ms
        self.f = np.array(energy.freqs_mhz)
        self.speed = energy.speed(self.f)
        self.p_cpu = energy.busy_power_w(self.f)                      # W
        self.fr = np.array(energy.radio.rate_fractions)

    def costs(self, obs: Observation) -> dict[str, np.ndarray]:
        """Every term of the objective for every action, shape (cuts, clocks, rates)."""
        tau_ms = self.tau * 1e3
        A, Q, B = obs.arrivals, max(obs.q_ms, 0.0), max(obs.b_kb, 0.0)
        shape = (len(self.w), len(self.f), len(self.fr))
        w = self.w[:, None, None]
        d = self.d[:, None, None]
        speed = self.speed[None, :, None]
        rate = self.fr[None, None, :] * obs.capacity_mbit                   # Mbit/s
        kb_per_ms = rate * self.share / 8.0                                 # kB of payload per ms
        e_cpu = self.p_cpu[None, :, None] / speed                           # mJ per ms of f_max work
        e_tx = self.energy.radio.power_w(rate, obs.capacity_mbit) / kb_per_ms   # mJ per kB
        e_cpu_min, e_tx_min = float(e_cpu.min()), float(e_tx.min())
        served_q = np.minimum(Q + A * w, tau_ms * speed)
        served_b = np.minimum(B, tau_ms * kb_per_ms)                       # only what is computed can go
        # The penalty: the slot's new frames are charged their work at the cheapest energy per unit
        # (the energy-optimal clock, the cheapest rate this slot), and what is served pays what its
        # clock and rate cost above that. Summed over slots this is the device's energy up to the
        # change of the backlog (valued at the cheapest prices), so it has the same time average;
        # unlike the energy of the slot alone, it charges a cut its bytes when it is chosen, not
        # when they are sent a slot later.
        energy_mj = (A * (w * e_cpu_min + d * e_tx_min) + (e_cpu - e_cpu_min) * served_q
                     + (e_tx - e_tx_min) * served_b)
        drift = Q * (A * w - served_q) + B * (A * d - served_b)
        latency_ms = (Q + A * w) / speed + (B + A * d) / kb_per_ms + self.sv[:, None, None]
        return {"energy_mj": np.broadcast_to(energy_mj, shape), "drift": np.broadcast_to(drift, shape),
                "latency_ms": np.broadcast_to(latency_ms, shape)}

    def objective(self, obs: Observation) -> tuple[np.ndarray, dict]:
        c = self.costs(obs)
        j = self.V * c["energy_mj"] + c["drift"]
        if self.target is not None and obs.arrivals:
            j = j + self.Z * obs.arrivals * c["latency_ms"]
        return j, c

    def decide(self, obs: Observation) -> Action:
        j, c = self.objective(obs)
        # Ties (an empty slot costs nothing whatever is chosen) go to the least energy, then the
        # least predicted latency: lexicographic order over the flattened arrays.
        order = np.lexsort((c["latency_ms"].ravel(), c["energy_mj"].ravel(), np.round(j.ravel(), 9)))
        k, fi, ri = np.unravel_index(order[0], j.shape)
        self._last = float(c["latency_ms"][k, fi, ri])
        return Action(self.cuts[k], float(self.f[fi]), float(self.fr[ri] * obs.capacity_mbit))

    def update(self, obs: Observation, action: Action) -> None:
        if self.target is not None and obs.arrivals:
            self.Z = max(self.Z + obs.arrivals * (self._last - self.target * 1e3), 0.0)


class Fixed(Policy):
    """One cut at the top clock and the channel's full capacity, every slot (device-only, server-only,
    Neurosurgeon's best split point for the mean capacity)."""

    def __init__(self, name: str, cut: Cut, energy):
        self.name, self.cut, self.f = name, cut, energy.f_max

    def decide(self, obs: Observation) -> Action:
        return Action(self.cut, self.f, obs.capacity_mbit)

    def fixed_cuts(self) -> list[Cut]:
        return [self.cut]


class PerSlot(Policy):
    """DADS (a full min-cut) or CIC (its envelope's lookup) re-decided every slot for the slot's capacity,
    latency objective, at the top clock and full capacity: frequency-unaware."""

    def __init__(self, method: str, costs: cutlib.Costs, energy, envelope=None, payload_share: float = PAYLOAD_SHARE,
                 measured: Measured | None = None, memo: bool = True):
        self.name, self.costs, self.f = method, costs, energy.f_max
        self.measured = measured
        # DADS's min-cut for a capacity is computed once per distinct capacity value (to 4 significant
        # digits); each is a full networkx min-cut. The time of each decision is kept in decide_s.
        self.memo: dict | None = {} if memo else None
        self.share = payload_share
        self.env = envelope or cutlib.cic_envelope(costs, 0.0)
        self._cuts: dict[frozenset, Cut] = {}
        self.decide_s: list[float] = []

    def decide(self, obs: Observation) -> Action:
        import time

        link = cutlib.Link(obs.capacity_mbit * 1e6 * self.share, 0.0)
        key = float(f"{obs.capacity_mbit:.4g}")
        if self.name == "dads" and self.memo is not None and key in self.memo:
            d = self.memo[key]
        else:
            t0 = time.perf_counter()
            d = cutlib.dads(self.costs, link) if self.name == "dads" else self.env.lookup(link)
            self.decide_s.append(time.perf_counter() - t0)
            if self.name == "dads" and self.memo is not None:
                self.memo[key] = d
        if d not in self._cuts:
            self._cuts[d] = make_cut(self.costs, d, measured=self.measured)
        return Action(self._cuts[d], self.f, obs.capacity_mbit)

    def fixed_cuts(self) -> list[Cut]:
        # DADS's min-cut is always a cut of CIC's envelope (they cost the same: tests/test_partition.py).
        for d in self.env.cuts:
            self._cuts.setdefault(d, make_cut(self.costs, d, measured=self.measured))
        return list(self._cuts.values())


def neurosurgeon_cut(costs: cutlib.Costs, mean_capacity_mbit: float, payload_share: float = PAYLOAD_SHARE,
                     measured: Measured | None = None) -> Cut:
    link = cutlib.Link(mean_capacity_mbit * 1e6 * payload_share, 0.0)
    d = cutlib.neurosurgeon(costs, link)
    return make_cut(costs, d, f"neurosurgeon {len(d)}/{len(costs.graph.ops)}", measured)


def baselines(costs: cutlib.Costs, energy, mean_capacity_mbit: float, envelope=None, measured: Measured | None = None) -> list[Policy]:
    """The static and frequency-unaware policies CutEdge is compared with."""
    n = len(costs.graph.ops)
    return [Fixed("device-only", make_cut(costs, frozenset(range(n)), "device", measured=measured), energy),
            Fixed("server-only", make_cut(costs, frozenset(), "server", measured=measured), energy),
            Fixed("neurosurgeon", neurosurgeon_cut(costs, mean_capacity_mbit, measured=measured), energy),
            PerSlot("dads", costs, energy, envelope, measured=measured),
            PerSlot("cic", costs, energy, envelope, measured=measured)]
