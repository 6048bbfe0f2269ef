"""Device placement: which devices serve which pipeline stage, by an enhanced particle swarm.

A particle is a position x in [-1, n)^n, one coordinate per device: floor(x_d) is the stage label of
device d, a negative x_d leaves it out. Decoding sorts the used labels (their order is the stages'
order), drops empty stages (repair: stages are contiguous by construction; a particle that uses no
device gets the fastest device alone) and makes each stage's fastest device its head; devices
that cannot hold even the smallest layer are left out (memory repair). The fitness is the DP's
slowest stage period for that placement (dp.partition), cached per decoded placement.

Enhancements over the plain PSO (as Dai et al. propose for this problem): seeded particles (all
devices in one stage; one device per stage by speed; the fastest device alone), an inertia weight
falling linearly from 0.9 to 0.4, a mutation that re-draws coordinates of a particle at random
(escapes early convergence on a discrete landscape), and a local search around the global best
(move one device to another stage, or out) each iteration.

`exhaustive` enumerates every placement (ordered set partitions of every subset of the devices,
devices with the same profile and link interchangeable) for fleets of up to 5 devices: the optimum
PSO is checked against.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass

from edgetvm.partition.pipeline import dp

INF = math.inf
MAX_EXHAUSTIVE = 5
DEVICE_TIE = 0.05   # 5% of the period per extra device


@dataclass
class Result:
    period_s: float
    stages: list[tuple[int, ...]]
    bounds: list[int]
    evaluations: int
    seconds: float


class Search:
    def __init__(self, problem: dp.Problem):
        self.p = problem
        self.n = len(problem.devices)
        self.cache: dict[tuple, tuple[float, list[int]]] = {}
        smallest = min(problem.stage_weights(k, k + 1) for k in range(problem.n))
        self.usable = [problem.devices[d].memory_bytes >= smallest for d in range(self.n)]
        self.order = sorted(range(self.n), key=lambda d: (-problem.devices[d].speed,
                                                          -problem.devices[d].bandwidth_bps, d))

    def _class(self, d: int) -> tuple:
        dev = self.p.devices[d]
        return (dev.kind, dev.bandwidth_bps)

    def canonical(self, stages: list[tuple[int, ...]]) -> tuple:
        return tuple(tuple(sorted(self._class(d) for d in st)) for st in stages)

    def head_first(self, members: list[int]) -> tuple[int, ...]:
        return tuple(sorted(members, key=self.order.index))

    def decode(self, x: list[float]) -> list[tuple[int, ...]]:
        labels: dict[int, list[int]] = {}
        for d, v in enumerate(x):
            if v >= 0 and self.usable[d]:
                labels.setdefault(int(v), []).append(d)
        stages = [self.head_first(labels[k]) for k in sorted(labels)]
        if not stages:
            stages = [(self.order[0],)]
        return stages[: self.p.n]

    def fitness(self, stages: list[tuple[int, ...]]) -> float:
        """The placement's period, made DEVICE_TIE longer per device beyond the first: of two placements
        predicted equally fast, the one with fewer devices wins (a device that adds no throughput still
        adds its calls, and every prediction has an error the extra hop only widens)."""
        key = self.canonical(stages)
        if key not in self.cache:
            if self.p.force_bands and all(len(st) == 1 for st in stages):
                self.cache[key] = (INF, [])  # --bands: a placement without a shared stage does not count
            else:
                self.cache[key] = dp.partition(self.p, stages)
        return self.cache[key][0] * (1 + DEVICE_TIE * (sum(len(st) for st in stages) - 1))

    def solve(self, stages) -> tuple[float, list[int]]:
        self.fitness(stages)
        return self.cache[self.canonical(stages)]

    # ---------------------------------------------------------------- PSO

    def pso(self, particles: int = 24, iterations: int = 40, seed: int = 0, mutation: float = 0.1) -> Result:
        t0 = time.perf_counter()
        rng = random.Random(seed)
        n = self.n
        lo, hi = -1.0, float(n) - 1e-9

        def encode(stages: list[tuple[int, ...]]) -> list[float]:
            x = [-0.5] * n
            for s, st in enumerate(stages):
                for d in st:
                    x[d] = s + 0.5
            return x

        seeds = [encode([tuple(self.order)]), encode([(d,) for d in self.order]), encode([(self.order[0],)])]
        if n >= 2:
            half = (n + 1) // 2
            seeds.append(encode([tuple(self.order[:half]), tuple(self.order[half:])]))
        pos = seeds[:particles] + [[rng.uniform(lo, hi) for _ in range(n)] for _ in range(particles - len(seeds))]
        vel = [[rng.uniform(-1, 1) for _ in range(n)] for _ in range(particles)]
        pbest = [list(p) for p in pos]
        pfit = [self.fitness(self.decode(p)) for p in pos]
        g = min(range(particles), key=pfit.__getitem__)
        gbest, gfit = list(pbest[g]), pfit[g]
        c1 = c2 = 1.5
        for it in range(iterations):
            w = 0.9 - 0.5 * it / max(1, iterations - 1)
            for i in range(particles):
                for d in range(n):
                    vel[i][d] = (w * vel[i][d] + c1 * rng.random() * (pbest[i][d] - pos[i][d])
                                 + c2 * rng.random() * (gbest[d] - pos[i][d]))
                    vel[i][d] = max(-n / 2, min(n / 2, vel[i][d]))
                    pos[i][d] = max(lo, min(hi, pos[i][d] + vel[i][d]))
                if rng.random() < mutation:
                    for d in rng.sample(range(n), k=max(1, n // 3)):
                        pos[i][d] = rng.uniform(lo, hi)
                f = self.fitness(self.decode(pos[i]))
                if f < pfit[i]:
                    pbest[i], pfit[i] = list(pos[i]), f
                    if f < gfit:
                        gbest, gfit = list(pos[i]), f
            # local search around the best: move one device to another stage or out of the pipeline
            stages = self.decode(gbest)
            base = encode(stages)
            for d in range(n):
                for label in [-0.5] + [s + 0.5 for s in range(len(stages) + 1)]:
                    if label == base[d]:
                        continue
                    cand = list(base)
                    cand[d] = label
                    f = self.fitness(self.decode(cand))
                    if f < gfit:
                        gbest, gfit = cand, f
        stages = self.decode(gbest)
        period, bounds = self.solve(stages)
        return Result(period, stages, bounds, len(self.cache), time.perf_counter() - t0)

    # ---------------------------------------------------------------- exhaustive

    def exhaustive(self) -> Result:
        if self.n > MAX_EXHAUSTIVE:
            raise ValueError(f"exhaustive search is for fleets of up to {MAX_EXHAUSTIVE} devices")
        t0 = time.perf_counter()
        best: tuple[float, list] = (INF, [])
        devices = [d for d in range(self.n) if self.usable[d]]
        for m in range(1, len(devices) + 1):
            for subset in itertools.combinations(devices, m):
                for stages in _ordered_partitions(list(subset)):
                    st = [self.head_first(list(s)) for s in stages]
                    if len(st) > self.p.n:
                        continue
                    f = self.fitness(st)
                    if f < best[0]:
                        best = (f, st)
        period, bounds = self.solve(best[1]) if best[1] else (INF, [])
        return Result(period, best[1], bounds, len(self.cache), time.perf_counter() - t0)


def _ordered_partitions(items: list[int]):
    """Every way to split `items` into an ordered sequence of non-empty blocks."""
    n = len(items)
    for labels in itertools.product(range(n), repeat=n):
        used = sorted(set(labels))
        if used != list(range(len(used))):
            continue
        yield [tuple(items[i] for i in range(n) if labels[i] == s) for s in used]
