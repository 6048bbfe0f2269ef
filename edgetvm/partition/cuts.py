"""Where to cut a model between a device and a server: the cost of a cut, and the partitioners.

The input frame starts on the device and the results are wanted on the server. A cut is the set of
kernel calls that run on the device, closed under predecessors. Its latency is the device's time
for them + the transfer of every value that crosses (once, however many server ops read it) + the
server's time for the rest. A transfer costs bytes / bandwidth + a fixed per-tensor time (the RPC
round trip and the link's delay).

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
from dataclasses import dataclass, field

from edgetvm.costmodels.profile import Graph

INF = float("inf")


@dataclass(frozen=True)
class Link:
    bandwidth_bps: float       # bits per second
    per_tensor_s: float = 0.0  # fixed time per tensor sent: RPC round trip + the link's delay
    call_s: float | None = None  # the link's time of a call's round trip (None: per_tensor_s)

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
                "bytes": sum(self.graph.values[v] for v in cross), "tensors": len(cross), "crossing": cross}

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


def parts_latency(p: dict, link: Link, cpu: DeviceCPU, idle_max_s: float = 0.0,
                  burst: int = 1) -> tuple[float, float]:
    """frame_latency from a cut's parts (device_s, server_s, bytes, tensors), as a split's manifest keeps them."""
    gap = _wire(p, link) + p["server_s"]
    dev = _under_quota(device_work(p, cpu), gap, cpu, idle_max_s, burst)
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
