"""The pipeline's cost model and the inter-layer partitioning by dynamic programming.

A placement is an ordered list of stages, each a set of fleet devices (its head first). Stage s runs
layers [b_s, b_{s+1}) (layers: the kernel calls of the fused graph, in order). A stage of several
devices splits its layers' output rows in bands proportional to the devices' speeds for that stage
(passes/row_slices.py); each non-head device gets its band's input rows (halo included) from the
head and returns its output rows to it. Per frame, a stage costs

- worker: max(the head's band, for every other device: its input rows' transfer + its band + its
  output rows' transfer), what the head's worker thread waits for;
- forward: its output's transfer to the next stage's head (to the sink after the last stage), done by
  a thread of the head while the worker computes the next frame;
- links: the bytes each device's access link carries per frame in each direction, over its rate;
- busy (when calibrated, calibrate.py): each device's processor time per frame, its kernels plus the
  measured costs of the calls it receives and makes and of a head's band slicing and joining: the
  head's threads overlap in time but share its CPU quota.

The period of a stage is the largest of those; the pipeline's throughput is 1 / the slowest period.
A transfer a -> b is bytes / (0.95 x the slower access link: tbf counts Ethernet frames) + a fixed
time per tensor (TVM RPC's protocol work, bench/link.py). Memory: every device of a stage holds the
stage's weights and its largest live tensors; a stage that does not fit is infeasible.

The DP: for a fixed placement with S stages, best[s][j] = min over i of max(best[s-1][i], period of
stage s on layers [i, j)), every stage at least one layer: the boundaries that minimise the slowest
stage (O(S L^2) stage evaluations, each cached).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from edgetvm.passes.row_slices import band_rows

INF = math.inf
PAYLOAD_SHARE = 0.95        # partition/cli.py: TCP payload over tbf-shaped Ethernet
PER_TENSOR_S = 1e-3         # partition/cli.py: TVM RPC work per tensor moved
MEMORY_HEADROOM = 2.0       # live tensors counted twice (kernel scratch, TVM's pools)


@dataclass
class Problem:
    """What planning needs: layer times per device kind, the layer graph, the fleet."""
    graph: object                   # costmodels.profile.Graph of the fused main (op l = layer l)
    times: dict[str, list[float]]   # device kind -> seconds per layer
    windows: list[tuple | None]     # per layer: (k, s, d) of its conv/pool, () for elementwise, None: mixes rows
    heights: dict[str, int]         # value -> rows (4-D NCHW values only)
    weight_bytes: list[int]         # per layer: bytes of the weights it reads (shared ones counted once per stage)
    layer_weights: list[list[int]]  # per layer: weight indices
    weight_sizes: list[int]
    devices: list                   # FleetDevice
    input_bytes: int = 0
    # Only placements that split a layer run in row bands (`pipeline plan --bands`): a stage of several
    # devices whose layers cannot be sliced is then infeasible instead of falling back to its head alone.
    force_bands: bool = False
    # Device kind -> measured costs of moving tensors (calibrate.py): seconds of the device per call and
    # per byte received and sent, per byte of band slicing and joining. None: not calibrated, and a
    # stage's period is its worker, forward and links alone.
    overhead: dict | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return len(self.graph.ops)

    # -------------------------------------------------------------- stage structure

    def crossing(self, i: int, j: int) -> tuple[list[str], list[str]]:
        """Values layers [i, j) read from before i, and values they make that later layers or the
        model's outputs need."""
        ops = self.graph.ops
        made = {ops[k]["out"] for k in range(i, j)}
        ins = []
        for k in range(i, j):
            for v in ops[k]["reads"]:
                if v not in made and v not in ins:
                    ins.append(v)
        # Everything available at boundary j that later layers or the results need: the stage's own
        # values, and earlier ones it passes through (a skip connection across the boundary).
        later = {v for k in range(j, self.n) for v in ops[k]["reads"]} | set(self.graph.outputs)
        avail = list(self.graph.inputs) + [ops[k]["out"] for k in range(j)]
        outs = [v for v in avail if v in later]
        return ins, outs

    def sliceable(self, i: int, j: int) -> bool:
        ins, outs = self.crossing(i, j)
        made = {self.graph.ops[k]["out"] for k in range(i, j)}
        return (len(outs) == 1 and outs[0] in made and outs[0] in self.heights
                and all(self.windows[k] is not None for k in range(i, j))
                and all(v in self.heights for v in ins))

    def band_needs(self, i: int, j: int, rows: int) -> dict[str, int]:
        """Rows of every value of layers [i, j) (and their inputs) an interior band of `rows` output
        rows needs (the halo on both sides; a band at an edge needs fewer)."""
        ops = self.graph.ops
        _, outs = self.crossing(i, j)
        need = {outs[0]: rows}
        for k in range(j - 1, i - 1, -1):
            out = ops[k]["out"]
            if out not in need:
                continue
            r = need[out]
            w = self.windows[k]
            for v in ops[k]["reads"]:
                if v not in self.heights:
                    continue
                if w:
                    kk, s, d = w
                    got = min(self.heights[v], (r - 1) * s + (kk - 1) * d + 1)
                elif self.heights[v] == self.heights[out]:
                    got = r
                else:
                    continue  # broadcast over rows
                need[v] = max(need.get(v, 0), got)
        return need

    def stage_time(self, kind: str, i: int, j: int) -> float:
        return sum(self.times[kind][i:j])

    def stage_weights(self, i: int, j: int) -> int:
        ws = {w for k in range(i, j) for w in self.layer_weights[k]}
        return sum(self.weight_sizes[w] for w in ws)

    def fits(self, dev: int, i: int, j: int) -> bool:
        ops = self.graph.ops
        live = max(self.graph.values.get(ops[k]["out"], 0) + sum(self.graph.values.get(v, 0) for v in ops[k]["reads"])
                   for k in range(i, j))
        return self.stage_weights(i, j) + MEMORY_HEADROOM * live <= self.devices[dev].memory_bytes

    # -------------------------------------------------------------- transfers

    def transfer(self, nbytes: float, a: int | None, b: int | None, tensors: int = 1) -> float:
        """Seconds to move nbytes from device a to device b (None: this machine, the source or sink)."""
        if nbytes <= 0:
            return 0.0
        rates = [self.devices[x].bandwidth_bps for x in (a, b) if x is not None]
        return nbytes * 8 / (PAYLOAD_SHARE * min(rates)) + PER_TENSOR_S * tensors

    def _cpu(self, d: int, recv: tuple[int, float] = (0, 0.0), send: tuple[int, float] = (0, 0.0),
             join_bytes: float = 0.0, frames: int = 0) -> float:
        """Device seconds d spends per frame on (calls, bytes) received and sent, on band slicing and
        joining, and on `frames` rounds of a node's own work (calibrate.py: the VM call, the queues, the
        threads' hand-offs; a band's device is charged one too, for its call's VM glue): processor time its
        kernels' profiles do not count and its quota still pays for."""
        o = (self.overhead or {}).get(self.devices[d].kind)
        if not o:
            return 0.0
        return (recv[0] * o["call_recv_s"] + recv[1] * o["byte_recv_s"] + send[0] * o["call_send_s"]
                + send[1] * o["byte_send_s"] + join_bytes * o["byte_join_s"] + frames * o.get("frame_s", 0.0))

    # -------------------------------------------------------------- one stage

    def stage(self, devs: tuple[int, ...], i: int, j: int, prev_head: int | None,
              next_head: int | None) -> dict:
        """The cost of layers [i, j) on devices `devs` (head first), fed by prev_head, feeding next_head."""
        key = (tuple(devs), i, j, prev_head, next_head)
        if key in self._cache:
            return self._cache[key]
        ins, outs = self.crossing(i, j)
        in_bytes = sum(self.graph.values[v] for v in ins)
        out_bytes = sum(self.graph.values[v] for v in outs)
        head = devs[0]
        res = {"feasible": all(self.fits(d, i, j) for d in devs), "devices": list(devs), "layers": [i, j]}
        up = {d: 0.0 for d in devs}
        down = {d: 0.0 for d in devs}
        down[head] += in_bytes
        up[head] += out_bytes
        if len(devs) > 1 and self.sliceable(i, j):
            height = self.heights[outs[0]]
            speeds = [1.0 / max(self.stage_time(self.devices[d].kind, i, j), 1e-12) for d in devs]
            if len(devs) > height:
                res["feasible"] = False
                bands = [(0, height)] + [(height, height)] * (len(devs) - 1)
            else:
                bands = band_rows(height, speeds)
            busy, comp, cpu = {}, {}, {}
            for d, (o0, o1) in zip(devs, bands):
                need = self.band_needs(i, j, o1 - o0)
                kind = self.devices[d].kind
                comp[d] = sum(self.times[kind][k] * need.get(self.graph.ops[k]["out"], 0) /
                              self.heights[self.graph.ops[k]["out"]] for k in range(i, j))
                if d == head:
                    # its band's input rows sliced out, every band's output rows joined
                    b_own = sum(self.graph.values[v] * need.get(v, 0) / self.heights[v] for v in ins)
                    join = self._cpu(d, join_bytes=b_own + out_bytes)
                    busy[d] = comp[d] + join
                    cpu[d] = cpu.get(d, 0.0) + join
                    continue
                b_in = sum(self.graph.values[v] * need.get(v, 0) / self.heights[v] for v in ins)
                b_out = out_bytes * (o1 - o0) / height
                mate_cpu = self._cpu(d, recv=(1, b_in), send=(1, b_out), frames=1)
                head_cpu = self._cpu(head, send=(1, b_in), recv=(1, b_out), join_bytes=b_in)
                cpu[d] = mate_cpu
                cpu[head] = cpu.get(head, 0.0) + head_cpu
                busy[d] = (self.transfer(b_in, head, d, len(ins)) + comp[d] + mate_cpu + head_cpu
                           + self.transfer(b_out, d, head))
                up[head] += b_in
                down[d] += b_in
                up[d] += b_out
                down[head] += b_out
            res["bands"] = [list(b) for b in bands]
            worker = max(busy.values())
        else:
            if len(devs) > 1 and self.force_bands:
                res["feasible"] = False
            devs = (head,)
            res["devices"] = [head]
            comp = {head: self.stage_time(self.devices[head].kind, i, j)}
            cpu = {}
            worker = comp[head]
            res["bands"] = None
        forward = self.transfer(out_bytes, head, next_head, len(outs))
        receive = self.transfer(in_bytes, prev_head, head, len(ins))
        # Every device's processor per frame: its kernels and the calibrated costs of its calls. The
        # head's worker and forwarder threads overlap in time but share its quota.
        head_io = self._cpu(head, recv=(1, in_bytes), send=(1, out_bytes), frames=1)
        cpu[head] = cpu.get(head, 0.0) + head_io
        busy_s = max(comp[d] + cpu.get(d, 0.0) for d in devs)
        forward += self._cpu(head, send=(1, out_bytes))
        links = max(max(up[d], down[d]) * 8 / (PAYLOAD_SHARE * self.devices[d].bandwidth_bps) for d in devs)
        res.update(worker_s=worker, forward_s=forward, receive_s=receive, links_s=links,
                   busy_s=busy_s, period_s=max(worker, forward, links, busy_s) if res["feasible"] else INF,
                   latency_s=worker + forward, compute_s={self.devices[d].name: c for d, c in comp.items()},
                   in_bytes=in_bytes, out_bytes=out_bytes, inputs=ins, outputs=outs)
        self._cache[key] = res
        return res


def partition(problem: Problem, stages: list[tuple[int, ...]]) -> tuple[float, list[int]]:
    """The DP: stage boundaries (b_0 = 0 < ... < b_S = L) minimising the slowest stage's period for
    the ordered stages `stages`; (period, boundaries), period INF if no split is feasible."""
    L, S = problem.n, len(stages)
    if S == 0 or S > L:
        return INF, []
    heads = [st[0] for st in stages]
    best = [[INF] * (L + 1) for _ in range(S + 1)]
    arg = [[-1] * (L + 1) for _ in range(S + 1)]
    best[0][0] = 0.0
    for s in range(1, S + 1):
        prev_head = heads[s - 2] if s >= 2 else None
        next_head = heads[s] if s < S else None
        # stage s-1 (0-based) ends at j; later stages need at least one layer each
        for j in range(s, L - (S - s) + 1):
            for i in range(s - 1, j):
                if best[s - 1][i] == INF:
                    continue
                p = problem.stage(stages[s - 1], i, j, prev_head, next_head)["period_s"]
                v = max(best[s - 1][i], p)
                if v < best[s][j]:
                    best[s][j], arg[s][j] = v, i
    if best[S][L] == INF:
        return INF, []
    bounds = [L]
    for s in range(S, 0, -1):
        bounds.append(arg[s][bounds[-1]])
    return best[S][L], bounds[::-1]


def evaluate(problem: Problem, stages: list[tuple[int, ...]], bounds: list[int]) -> list[dict]:
    """Every stage's cost for a placement and its boundaries."""
    heads = [st[0] for st in stages]
    return [problem.stage(st, bounds[s], bounds[s + 1], heads[s - 1] if s else None,
                          heads[s + 1] if s + 1 < len(stages) else None) for s, st in enumerate(stages)]


def equal_split(problem: Problem, stages: list[tuple[int, ...]]) -> list[int]:
    """Boundaries with the same number of layers per stage (the baseline the DP is compared with)."""
    L, S = problem.n, len(stages)
    return [round(s * L / S) for s in range(S + 1)]
