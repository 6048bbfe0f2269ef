"""Where to cut a model between a device and a server: the cost of a cut, and the partitioners.

The input frame starts on the device and the results are wanted on the server. A cut is the set of
kernel calls that run on the device, closed under predecessors. Its latency is the device's time
for them + the transfer of every value that crosses (once, however many server ops read it) + the
server's time for the rest. A transfer costs bytes / bandwidth + a fixed per-tensor time (the RPC
round trip and the link's delay). That additive cost is what the partitioners minimise (CIC needs a
line in 1 / bandwidth); the latency predicted for a chosen cut on an emulated link (`frame_latency`
with a calibrated `Link.shaper`) simulates each direction's tbf bucket over the frame's RPC messages
instead (costmodels/tbf.py).

- Neurosurgeon (Kang et al., ASPLOS 2017): the best single split point in topological order.
- DADS (Hu et al., INFOCOM 2019): a minimum s-t cut of the DAG, device times on the edges to the
  sink, server times on the edges from the source, each value's transfer on the edge into an
  auxiliary node (counted once for all its consumers), infinite edges back from every consumer to
  its producer (a value cannot flow from the server back to the device).
- CIC (Yang, Li, He, Zhang, IJCNN 2022): with x = 1 / bandwidth every cut's cost is a line
  a + b x (a: compute + per-tensor times, b: bytes crossing), so the optimal cost is the lower
  envelope of finitely many lines, concave in x. Offline, its breakpoints are found with a few
  min-cuts (Eisner-Severance: cut at two ends, cut where their lines cross, recurse while a new line
  appears); the "splitting model" is the envelope, independent of the network. Online, picking a
  cut for a bandwidth is a binary search over the breakpoints, exactly the min-cut's choice.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

from edgetvm.costmodels import tbf
from edgetvm.costmodels.profile import Graph

INF = float("inf")


@dataclass(frozen=True)
class Shaper:
    """What each direction's tbf does (the kernel's own figures, `EmulatedLink.qdiscs`): rate in Ethernet
    bytes per second, bucket in bytes."""
    up_rate: float             # device -> server
    up_burst: float
    down_rate: float           # server -> device
    down_burst: float


@dataclass(frozen=True)
class Link:
    bandwidth_bps: float       # bits per second
    per_tensor_s: float = 0.0  # fixed time per tensor sent: RPC round trip + the link's delay
    call_s: float | None = None  # the link's time of a call's round trip (None: per_tensor_s)
    shaper: Shaper | None = None   # simulate the tbf buckets over a frame's messages (frame_latency)
    round_trip_s: float = 0.0  # with a shaper: an RPC round trip's time beyond the buckets (both ends' work)
    read_byte_s: float = 0.0   # with a shaper: time per byte read beyond the buckets and the device's CPU

    @property
    def x(self) -> float:
        """Seconds per byte: CIC's variable."""
        return 8.0 / self.bandwidth_bps


@dataclass
class Costs:
    """Per-op times on each side and the value sizes: everything a partitioner needs."""
    graph: Graph
    device_s: list[float]
    server_s: list[float]

    def crossing(self, device: frozenset[int]) -> list[str]:
        """Values made on the device side (data inputs included) that the server side needs."""
        g = self.graph
        made_on_device = set(g.inputs) | {g.ops[k]["out"] for k in device}
        need = {v for k, op in enumerate(g.ops) if k not in device for v in op["reads"]} | set(g.outputs)
        return sorted(made_on_device & need, key=_value_order)

    def parts(self, device: frozenset[int]) -> dict:
        """The cost of a cut split in its parts: device s, crossing bytes and tensors, server s."""
        cross = self.crossing(device)
        return {"device_s": sum(self.device_s[k] for k in device),
                "server_s": sum(t for k, t in enumerate(self.server_s) if k not in device),
                "bytes": sum(self.graph.values[v] for v in cross), "tensors": len(cross), "crossing": cross,
                "sizes": [self.graph.values[v] for v in cross]}

    def latency(self, device: frozenset[int], link: Link) -> float:
        p = self.parts(device)
        return p["device_s"] + p["bytes"] * link.x + p["tensors"] * link.per_tensor_s + p["server_s"]

    def throughput(self, device: frozenset[int], link: Link) -> float:
        """Frames per second when frames stream: the slowest stage (device + sending, server) sets it."""
        p = self.parts(device)
        send = p["bytes"] * link.x + p["tensors"] * link.per_tensor_s
        return 1.0 / max(p["device_s"] + send, p["server_s"], 1e-12)


@dataclass(frozen=True)
class DeviceCPU:
    """What a frame costs the device's CPU beyond its kernels, and the quota it runs under: the RPC
    call of its part and the sending of each crossing tensor (TCP, the shaped veth) are CPU time too,
    charged to the same quota (measured: ~12 us per KiB sent at a quarter of a core's quota)."""
    share: float               # of a core (an emulated device's CFS quota / period; 1 for a board)
    period_s: float            # the CFS period
    call_s: float = 0.0        # CPU per call of the device part
    tensor_s: float = 0.0      # CPU per crossing tensor sent
    byte_s: float = 0.0        # CPU per byte sent
    tick_phase_s: float | None = None   # the device's scheduler ticks after its CFS period boundaries


def frame_latency(costs: "Costs", device: frozenset[int], link: Link, cpu: DeviceCPU,
                  idle_max_s: float = 0.0, burst: int = 1) -> tuple[float, float]:
    """(mean latency, mean device-side wall) of a cut for frames run one after another (in bursts of
    `burst`, each after a random idle time uniform in [0, idle_max_s)): the device's CPU work
    (kernels at full speed, the call, the sending) under its CFS quota (costmodels/cfs.py: short work
    runs at full speed in a period's quota, long work at the quota's share, and the time a frame
    spends on the link and the server refills the quota), then the wire and the server."""
    return parts_latency(costs.parts(device), link, cpu, idle_max_s, burst)


SETTLE_ROUNDS = 3   # rounds of device wall <-> bucket waits (parts_latency)


def parts_latency(p: dict, link: Link, cpu: DeviceCPU, idle_max_s: float = 0.0,
                  burst: int = 1) -> tuple[float, float]:
    """frame_latency from a cut's parts (device_s, server_s, bytes, tensors), as a split's manifest keeps them."""
    gap = _wire(p, link) + p["server_s"]
    work = device_work(p, cpu)
    dev = _under_quota(work, gap, cpu, idle_max_s, burst)
    if link.shaper is not None:
        # The device's wall time under its quota depends on the gap between its parts, and the buckets'
        # waits on the device's wall time: a few rounds of each settle them.
        for _ in range(SETTLE_ROUNDS):
            _, between = shaped_wire(p, link, dev, idle_max_s, burst)
            dev = _under_quota(work, between + p["server_s"], cpu, idle_max_s, burst)
        gap = shaped_wire(p, link, dev, idle_max_s, burst)[0] + p["server_s"]
    return dev + gap, dev


def frame_throughput(costs: "Costs", device: frozenset[int], link: Link, cpu: DeviceCPU) -> float:
    """Frames per second when frames stream: the device computes and sends frame i+1 while the server
    computes frame i; the device's stage is its CPU work under the quota with the wire time between."""
    return parts_throughput(costs.parts(device), link, cpu)


def parts_throughput(p: dict, link: Link, cpu: DeviceCPU) -> float:
    wire = _wire(p, link)
    return 1.0 / max(_under_quota(device_work(p, cpu), wire, cpu) + wire, p["server_s"], 1e-12)


def call_round_trips(parts: dict) -> int:
    """RPC round trips of a device part's call: the call, and where it returns several tensors, one per
    tensor (a tuple left on the device is taken apart there; one tensor comes back as itself)."""
    k = parts["tensors"]
    return 1 + (k if k > 1 else 0)


def device_work(parts: dict, cpu: DeviceCPU) -> float:
    """The device's CPU seconds for one frame of a cut (its kernels at full speed, the call, the sending)."""
    return (parts["device_s"] * cpu.share + call_round_trips(parts) * cpu.call_s + parts["tensors"] * cpu.tensor_s
            + parts["bytes"] * cpu.byte_s)


def _wire(parts: dict, link: Link) -> float:
    call_s = link.per_tensor_s if link.call_s is None else link.call_s
    return parts["bytes"] * link.x + parts["tensors"] * link.per_tensor_s + call_round_trips(parts) * call_s


# A frame's TVM RPC messages, TCP payload bytes each way, counted by the link's tbf qdiscs (`tc -s`,
# 40 calls each): the device part's call with one input (its handle; the weights wait on the device)
# and its reply, a tensor's handle; reading a tensor here (runtime/tensors.to_numpy: a copy, then the
# stream's sync); the free of a remote tensor, sent without waiting for a reply, which the other end
# acknowledges with a segment of its own. A calibration frame (alloc, read, free) is 4 segments each
# way, 493 and 360 bytes with headers; a split frame of a one-input, one-output part 517 and 424.
CALL = (84, 112)
ALLOC = (64, 48)
READ = ((80, 24), (42, 16))   # + the tensor's bytes in the first reply
FREE = 40


def _read(up, down, t: float, nbytes: int, rt: float, byte_s: float = 0.0) -> float:
    reply = READ[0][1] + nbytes
    t = up.send(down.send(t, READ[0][0]), reply) + rt + nbytes * byte_s
    for _ in range(len(tbf.frames(reply)) // 2):   # delayed acknowledgements, one per two segments received
        down.send(t, 0)
    return up.send(down.send(t, READ[1][0]), READ[1][1]) + rt


def _free(up, down, t: float) -> float:
    """A free: its segment, and the other end's acknowledgement. The client goes on once the segment is
    sent, which on a link whose bucket is empty waits for its tokens (measured as a split frame's time
    beyond its timers, where its tensors are freed: 16 us on a quiet link, 0.4 ms a frame on average
    on a saturated 1 Mbit/s one). That wait delays the next frame, not this one's results."""
    sent = down.send(t, FREE)
    up.send(sent, 0)
    return sent


def split_frame(up, down, t: float, device_wall_s: float, sizes: list[int],
                rt: float = 0.0, byte_s: float = 0.0) -> tuple[float, float, float]:
    """A split frame's messages from `t` on through the buckets `up` (device -> server) and `down`: the
    device part's call, its compute, its reply (and one call per item where it returns several), a
    read of each crossing tensor, the frees. (when the call returned, when the last read did, when the
    last free was sent: the frame's results are here at the second, the next frame starts after the third)"""
    items = len(sizes) if len(sizes) > 1 else 0
    t = up.send(down.send(t, CALL[0]) + device_wall_s, CALL[1]) + rt
    for _ in range(items):
        t = up.send(down.send(t, CALL[0]), CALL[1]) + rt
    called = t
    for n in sizes:
        t = _read(up, down, t, int(n), rt, byte_s)
    freed = t
    for _ in range(len(sizes) + (1 if items else 0)):
        freed = _free(up, down, freed)
    return called, t, freed


def calibration_frame(up, down, t: float, rt: float = 0.0) -> tuple[float, float]:
    """A compute-free calibration frame (runtime/split.calibrate_device: a tensor made on the device,
    read, freed) from `t` on: (when its read returned, when its free was sent). Three round trips."""
    t = up.send(down.send(t, ALLOC[0]), ALLOC[1]) + rt
    t = _read(up, down, t, 8, rt)
    return t, _free(up, down, t)


def _buckets(shaper: Shaper) -> tuple[tbf.Bucket, tbf.Bucket]:
    return tbf.Bucket(shaper.up_rate, shaper.up_burst), tbf.Bucket(shaper.down_rate, shaper.down_burst)


def shaped_wire(p: dict, link: Link, device_wall_s: float, idle_max_s: float = 0.0, burst: int = 1,
                frames: int = 96, warmup: int = 8, seed: int = 0) -> tuple[float, float]:
    """Link time of a cut's frames with each direction's tbf bucket simulated over the frame's messages
    (costmodels/tbf.py), the frames arriving as `frame_latency`'s do: (the mean of a frame's latency
    beyond the device's and the server's time, the mean link time from the device part's end to the
    next frame's call, the frees included)."""
    up, down = _buckets(link.shaper)
    sizes = p.get("sizes") or [p["bytes"] // max(1, p["tensors"])] * p["tensors"]
    rng, t, total, between = random.Random(seed), 0.0, 0.0, 0.0
    for i in range(frames + warmup):
        start = t
        _, done, t = split_frame(up, down, t, device_wall_s, sizes, link.round_trip_s, link.read_byte_s)
        if i >= warmup:
            total += done - start - device_wall_s
            between += t - start - device_wall_s
        t += p["server_s"]
        if idle_max_s > 0 and (i + 1) % burst == 0:
            t += rng.uniform(0.0, idle_max_s)
    return total / frames, between / frames


def calibration_round_trip(shaper: Shaper, frame_s: list[float], idle_s: list[float], burst: int) -> float:
    """An RPC round trip's time beyond the buckets, from compute-free calibration frames timed in bursts
    of `burst`, each burst after `idle_s[k]`: what their mean took beyond the same frames simulated
    without it, per round trip."""
    up, down = _buckets(shaper)
    t, sim = 0.0, 0.0
    for i in range(len(frame_s)):
        if i % burst == 0:
            t += idle_s[i // burst]
        start = t
        done, t = calibration_frame(up, down, t)
        sim += done - start
    return max(0.0, (sum(frame_s) - sim) / len(frame_s) / 3)


def calibration_read_byte(shaper: Shaper, round_trip_s: float, device_byte_s: float, nbytes: int,
                          read_s: float) -> float:
    """Time per byte read beyond the buckets and the device's CPU for it, from reads of an `nbytes`
    tensor that each found the buckets full (after an idle time) and took `read_s`: TVM RPC copies a
    tensor through a ring buffer a byte at a time on both ends (docs/pipeline.md), and the client's
    copy does not overlap the wire (100 Mbit/s: a 108 KiB read took 10.6 ms where the buckets give
    8.8). Reads back to back cannot tell it: the time it adds lets the buckets refill, and they absorb
    it (at 5 Mbit/s up to 5 ms a read)."""
    up, down = _buckets(shaper)
    simulated = _read(up, down, 0.0, nbytes, round_trip_s)
    return max(0.0, (read_s - simulated) / nbytes - device_byte_s)


def _under_quota(work: float, gap: float, cpu: DeviceCPU, idle_max_s: float = 0.0, burst: int = 1) -> float:
    from edgetvm.costmodels import cfs

    if cpu.share >= 1:
        return work
    return cfs.mean_wall(work, gap, cpu.share * cpu.period_s, cpu.period_s, idle_max_s=idle_max_s, burst=burst,
                         tick_phase_s=cpu.tick_phase_s)


def _value_order(name: str) -> tuple:
    return (name[0] != "i", int(name.lstrip("inv")))


@dataclass
class Decision:
    method: str
    device: frozenset[int]
    predicted_s: float
    decide_s: float = 0.0
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------ partitioners

def device_only(costs: Costs) -> frozenset[int]:
    return frozenset(range(len(costs.graph.ops)))


def server_only(costs: Costs) -> frozenset[int]:
    return frozenset()


def prefixes(costs: Costs) -> list[frozenset[int]]:
    """Every single split point in topological order (the bindings' order)."""
    n = len(costs.graph.ops)
    return [frozenset(range(j)) for j in range(n + 1)]


def neurosurgeon(costs: Costs, link: Link) -> frozenset[int]:
    return min(prefixes(costs), key=lambda d: costs.latency(d, link))


def min_cut(costs: Costs, x: float, per_tensor_s: float = 0.0, scale: float = 1.0) -> frozenset[int]:
    """DADS: the device set of a minimum s-t cut for seconds-per-byte `x` (the whole DAG, every call)."""
    import networkx as nx

    g = costs.graph
    G = nx.DiGraph()
    producer = {op["out"]: k for k, op in enumerate(g.ops)}
    consumers: dict[str, list[int]] = {}
    for k, op in enumerate(g.ops):
        for v in op["reads"]:
            consumers.setdefault(v, []).append(k)
    for k in range(len(g.ops)):
        G.add_edge("S", k, capacity=costs.server_s[k] * scale)   # cut when k runs on the server
        G.add_edge(k, "T", capacity=costs.device_s[k] * scale)   # cut when k runs on the device
    outputs = set(g.outputs)
    for v, size in g.values.items():
        users = consumers.get(v, [])
        if not users and v not in outputs:
            continue
        src = producer.get(v, "S")  # a data input is made on the device: the source side
        aux = ("send", v)
        G.add_edge(src, aux, capacity=(size * x + per_tensor_s) * scale)
        for c in users:
            G.add_edge(aux, c)                    # no capacity: infinite
            if src != "S":
                G.add_edge(c, src)                # a consumer never runs before its producer's side
        if v in outputs:
            G.add_edge(aux, "T")                  # results are wanted on the server
    _, (source_side, _) = nx.minimum_cut(G, "S", "T")
    return frozenset(k for k in source_side if isinstance(k, int))


def dads(costs: Costs, link: Link) -> frozenset[int]:
    return min_cut(costs, link.x, link.per_tensor_s)


@dataclass
class Envelope:
    """CIC's splitting model: the lower envelope of the cuts' cost lines over x = seconds per byte."""
    per_tensor_s: float
    breaks: list[float]             # x where the optimal cut changes, increasing
    cuts: list[frozenset[int]]      # cuts[i] is optimal on [breaks[i-1], breaks[i]]
    lines: list[tuple[float, float]]
    min_cuts: int = 0               # how many min-cuts building it took

    def lookup(self, link: Link) -> frozenset[int]:
        return self.cuts[bisect.bisect_right(self.breaks, link.x)]


def line(costs: Costs, device: frozenset[int], per_tensor_s: float) -> tuple[float, float]:
    p = costs.parts(device)
    return p["device_s"] + p["server_s"] + p["tensors"] * per_tensor_s, float(p["bytes"])


def cic_envelope(costs: Costs, per_tensor_s: float = 0.0, x_max: float = 8.0 / 1e3) -> Envelope:
    """The envelope between x = 0 (infinite bandwidth) and x_max (default: 1 kbit/s), by min-cuts."""
    count = [0]

    def cut_at(x):
        count[0] += 1
        d = min_cut(costs, x, per_tensor_s)
        return d, line(costs, d, per_tensor_s)

    found: dict[tuple[float, float], frozenset[int]] = {}

    def solve(xl, cl, ll, xr, cr, lr):
        # Two optimal lines at xl < xr: if they are one line, or a cut where they cross is no better,
        # nothing lies between them.
        if abs(ll[1] - lr[1]) < 1e-9:
            return
        xm = (lr[0] - ll[0]) / (ll[1] - lr[1])
        if not xl < xm < xr:
            return
        cm, lm = cut_at(xm)
        at_cross = ll[0] + ll[1] * xm
        if lm[0] + lm[1] * xm >= at_cross * (1 - 1e-9) - 1e-15:
            return
        found[lm] = cm
        solve(xl, cl, ll, xm, cm, lm)
        solve(xm, cm, lm, xr, cr, lr)

    c0, l0 = cut_at(0.0)
    c1, l1 = cut_at(x_max)
    found[l0], found[l1] = c0, c1
    solve(0.0, c0, l0, x_max, c1, l1)
    # The envelope from the lines found: sort by slope descending (steepest wins at small x).
    lines = sorted(found, key=lambda ln: (-ln[1], ln[0]))
    hull: list[tuple[float, float]] = []
    for ln in lines:
        if hull and abs(hull[-1][1] - ln[1]) < 1e-9:
            if ln[0] < hull[-1][0]:
                hull[-1] = ln
            continue
        hull.append(ln)
    # Keep only lines that are optimal somewhere on [0, inf).
    env: list[tuple[float, float]] = []
    starts: list[float] = []
    for ln in hull:
        while env:
            x_cross = (ln[0] - env[-1][0]) / (env[-1][1] - ln[1])
            if x_cross <= (starts[-1] if starts else 0.0):
                env.pop()
                starts.pop()
            else:
                break
        starts.append(0.0 if not env else (ln[0] - env[-1][0]) / (env[-1][1] - ln[1]))
        env.append(ln)
    return Envelope(per_tensor_s, starts[1:], [found[ln] for ln in env], env, count[0])


def decide(costs: Costs, link: Link, method: str, objective: str = "latency",
           envelope: Envelope | None = None) -> Decision:
    """Pick a cut with `method` for `objective` (latency, or throughput when frames stream)."""
    import time

    t0 = time.perf_counter()
    if objective == "throughput":
        device = best_throughput(costs, link, method, envelope)
    elif method == "device":
        device = device_only(costs)
    elif method == "server":
        device = server_only(costs)
    elif method == "neurosurgeon":
        device = neurosurgeon(costs, link)
    elif method == "dads":
        device = dads(costs, link)
    elif method == "cic":
        env = envelope or cic_envelope(costs, link.per_tensor_s)
        t0 = time.perf_counter()  # the envelope is built offline: the decision is the lookup
        device = env.lookup(link)
    else:
        raise ValueError(f"unknown method {method}")
    dt = time.perf_counter() - t0
    predicted = costs.latency(device, link) if objective == "latency" else 1.0 / costs.throughput(device, link)
    return Decision(method, device, predicted, dt)


def best_throughput(costs: Costs, link: Link, method: str, envelope: Envelope | None = None) -> frozenset[int]:
    """The slowest stage is not a sum, so no single min-cut gives it: among the method's candidate cuts
    (split points for Neurosurgeon; min-cuts with the two sides weighted for DADS and CIC) the best."""
    if method in ("device", "server"):
        return device_only(costs) if method == "device" else server_only(costs)
    if method == "neurosurgeon":
        cands = prefixes(costs)
    else:
        cands = {server_only(costs), device_only(costs)}
        env = envelope or cic_envelope(costs, link.per_tensor_s)
        cands |= set(env.cuts)
        for w in (0.25, 0.5, 2.0, 4.0):
            scaled = Costs(costs.graph, [t * w for t in costs.device_s], costs.server_s)
            cands.add(min_cut(scaled, link.x * w, link.per_tensor_s * w))
    return max(cands, key=lambda d: (costs.throughput(d, link), -len(d)))
