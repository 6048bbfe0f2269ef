"""Federated training on Flower with width-sliced sub-models (HeteroFL slicing, FedRolex rolling).

One Flower simulation (Ray backend) runs every method on the same clients, one after another, in
one ServerApp. `SubModelStrategy` extends Flower's own `FedAvg` strategy: each round it allocates
(LATTE: from the cost model's predictions; HeteroFL/FedRolex: static ratios from nominal compute;
FedAvg: the full model), sends each client its slice of the global model, and aggregates the
returned slices element-wise over the clients that trained each element.

Local training in the ClientApp is numpy minibatch SGD on the same MLP that TVM compiled and
measured; the *simulated* time of a round is the slowest selected client's measured TVM training
time on its emulated device (measured seconds per step at its width x its local steps).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

import numpy as np

from edgetvm.latte import allocate, models

METHODS = ("latte", "fedavg", "heterofl", "fedrolex")


# ----------------------------------------------------------------------------- data


def digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)


def partition(n_clients: int, alpha: float = 0.3, seed: int = 0) -> list[np.ndarray]:
    """Non-IID split of the training set: per class, Dirichlet(alpha) shares over the clients."""
    Xtr, _, ytr, _ = digits_split(seed)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for c in range(models.N_CLASSES):
        idx = rng.permutation(np.where(ytr == c)[0])
        shares = rng.dirichlet([alpha] * n_clients)
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k] += chunk.tolist()
    for k in range(n_clients):  # every client gets a few examples
        if len(parts[k]) < 8:
            parts[k] += rng.choice(len(ytr), 8, replace=False).tolist()
    return [np.array(sorted(p)) for p in parts]


# ----------------------------------------------------------------------------- the MLP in numpy


def init_params(arch: dict, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [models.N_IN, *arch["hidden"], models.N_CLASSES]
    out = []
    for k, n in zip(sizes[:-1], sizes[1:]):
        out.append((rng.uniform(-1, 1, (k, n)) * math.sqrt(6.0 / k)).astype(np.float32))
        out.append(np.zeros(n, np.float32))
    return out


def hidden_indices(arch: dict, width: float, server_round: int, rolling: bool) -> list[np.ndarray]:
    """Kept units of each hidden layer: the first ceil(w*H) (HeteroFL) or a window rolling by one unit
    per round (FedRolex)."""
    out = []
    for h in arch["hidden"]:
        k = models.scaled(h, width)
        start = (server_round - 1) % h if rolling else 0
        out.append((start + np.arange(k)) % h)
    return out


def _full_indices(arch: dict, hidden: list[np.ndarray]):
    return [np.arange(models.N_IN), *hidden, np.arange(models.N_CLASSES)]


def slice_params(params: list[np.ndarray], arch: dict, hidden: list[np.ndarray]) -> list[np.ndarray]:
    idx = _full_indices(arch, hidden)
    out = []
    for i in range(len(idx) - 1):
        W, b = params[2 * i], params[2 * i + 1]
        out.append(np.ascontiguousarray(W[np.ix_(idx[i], idx[i + 1])]))
        out.append(np.ascontiguousarray(b[idx[i + 1]]))
    return out


def aggregate(global_params: list[np.ndarray], arch: dict,
              contributions: list[tuple[list[np.ndarray], list[np.ndarray], float]]) -> list[np.ndarray]:
    """HeteroFL aggregation: each element is the weighted mean over the clients whose slice holds it;
    elements nobody trained keep their value."""
    sums = [np.zeros_like(p, dtype=np.float64) for p in global_params]
    wts = [np.zeros_like(p, dtype=np.float64) for p in global_params]
    for sub, hidden, weight in contributions:
        idx = _full_indices(arch, hidden)
        for i in range(len(idx) - 1):
            ix = np.ix_(idx[i], idx[i + 1])
            sums[2 * i][ix] += weight * sub[2 * i]
            wts[2 * i][ix] += weight
            sums[2 * i + 1][idx[i + 1]] += weight * sub[2 * i + 1]
            wts[2 * i + 1][idx[i + 1]] += weight
    return [np.where(w > 0, s / np.maximum(w, 1e-12), g).astype(np.float32)
            for s, w, g in zip(sums, wts, global_params)]


def forward(params, X):
    h = X
    n = len(params) // 2
    acts = [h]
    for i in range(n):
        h = h @ params[2 * i] + params[2 * i + 1]
        if i < n - 1:
            h = np.maximum(h, 0)
        acts.append(h)
    return acts


def local_train(params, X, y, steps: int, lr: float, batch: int, seed: int):
    """Minibatch SGD with softmax cross-entropy; returns (params, mean loss)."""
    params = [p.copy() for p in params]
    rng = np.random.default_rng(seed)
    n = len(params) // 2
    losses = []
    for _ in range(steps):
        bi = rng.choice(len(y), min(batch, len(y)), replace=len(y) < batch)
        acts = forward(params, X[bi])
        z = acts[-1] - acts[-1].max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        losses.append(float(-np.log(p[np.arange(len(bi)), y[bi]] + 1e-12).mean()))
        g = p
        g[np.arange(len(bi)), y[bi]] -= 1
        g /= len(bi)
        for i in range(n - 1, -1, -1):
            gW = acts[i].T @ g
            gb = g.sum(0)
            if i > 0:
                g = (g @ params[2 * i].T) * (acts[i] > 0)
            params[2 * i] -= lr * gW
            params[2 * i + 1] -= lr * gb
    return params, float(np.mean(losses)) if losses else 0.0


def accuracy(params, X, y) -> float:
    return float((forward(params, X)[-1].argmax(1) == y).mean())


# ----------------------------------------------------------------------------- Flower apps


def make_client_app():
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()
    cache: dict = {}

    def my_data(context: Context, cfg):
        pid = int(context.node_config["partition-id"])
        n = int(context.node_config["num-partitions"])
        key = (pid, n, float(cfg["alpha"]), int(cfg["seed"]))
        if key not in cache:
            Xtr, _, ytr, _ = digits_split(int(cfg["seed"]))
            idx = partition(n, float(cfg["alpha"]), int(cfg["seed"]))[pid]
            cache[key] = (Xtr[idx], ytr[idx])
        return pid, cache[key]

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"info": ConfigRecord({"partition-id": int(context.node_config["partition-id"])})}),
                       reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        pid, (X, y) = my_data(context, cfg)
        params = msg.content["arrays"].to_numpy_ndarrays()
        steps = int(cfg["local-steps"])
        crash_at = int(cfg.get("crash-at-step", -1))
        if crash_at >= 0:  # injected failure: the device drops out mid-round
            local_train(params, X, y, crash_at, float(cfg["lr"]), int(cfg["batch"]), 0)
            raise RuntimeError(f"client {pid} crashed after {crash_at} of {steps} local steps (injected)")
        new, loss = local_train(params, X, y, steps, float(cfg["lr"]), int(cfg["batch"]),
                                seed=int(cfg["server-round"]) * 1000 + pid)
        return Message(RecordDict({"arrays": ArrayRecord(new),
                                   "metrics": MetricRecord({"num-examples": len(y), "train-loss": loss})}),
                       reply_to=msg)

    return app


@dataclass
class History:
    method: str
    rounds: list = field(default_factory=list)   # dicts: round, sim_time_s, round_s, accuracy, ...

    def time_to(self, target: float) -> float | None:
        for r in self.rounds:
            if r["accuracy"] >= target:
                return r["sim_time_s"]
        return None


def _strategy_class():
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    class SubModelStrategy(FedAvg):
        """FedAvg extended with per-client sub-models; see the module docstring."""

        def __init__(self, method: str, plan: "Plan", history: History, rolling: bool | None = None):
            n = len(plan.fleet)
            super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1,
                             min_available_nodes=n)
            self.method, self.plan, self.history = method, plan, history
            self.rolling = (method == "fedrolex") if rolling is None else rolling
            self.node_of: dict[int, int] = {}
            self.round_plan: dict[int, tuple] = {}
            self.sim_time = 0.0
            self.rng = random.Random(plan.seed * 7919 + METHODS.index(method) if method in METHODS else 0)
            self.global_params: list[np.ndarray] = []

        def _discover(self, grid) -> None:
            ids = list(grid.get_node_ids())
            msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=i,
                            message_type=MessageType.QUERY) for i in ids]
            for r in grid.send_and_receive(msgs, timeout=300):
                if not r.has_error():
                    self.node_of[r.metadata.src_node_id] = int(r.content["info"]["partition-id"])

        def allocation(self, server_round: int) -> list[allocate.Assignment]:
            p = self.plan
            if self.method == "latte":
                a, _ = allocate.latte(p.fleet, p.predicted_step, p.arch, p.batch, p.local_steps, p.deadline)
                return a
            return allocate.static(p.fleet, p.arch, p.batch, p.local_steps, full=self.method == "fedavg")

        def configure_train(self, server_round, arrays, config, grid):
            if not self.node_of:
                self._discover(grid)
            self.global_params = arrays.to_numpy_ndarrays()
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assign = {a.client: a for a in self.allocation(server_round)}
            if server_round == 1:
                for w in caught:
                    logging.getLogger("edgetvm.latte").warning("%s: %s", self.method, w.message)
            self.round_plan = {}
            msgs = []
            for node, pid in sorted(self.node_of.items(), key=lambda kv: kv[1]):
                a = assign.get(pid)
                if a is None or a.width is None:
                    continue
                hidden = hidden_indices(self.plan.arch, a.width, server_round, self.rolling)
                cfg = ConfigRecord({"server-round": server_round, "local-steps": a.steps, "lr": self.plan.lr,
                                    "batch": self.plan.batch, "alpha": self.plan.alpha, "seed": self.plan.seed,
                                    "width": a.width})
                if self.rng.random() < self.plan.crash_rate:
                    cfg["crash-at-step"] = self.rng.randrange(max(1, a.steps))
                sub = slice_params(self.global_params, self.plan.arch, hidden)
                msgs.append(Message(RecordDict({"arrays": ArrayRecord(sub), "config": cfg}),
                                    dst_node_id=node, message_type=MessageType.TRAIN))
                measured = self.plan.measured_step(self.plan.fleet[pid], a.width) * a.steps
                self.round_plan[node] = (pid, a, hidden, measured)
            return msgs

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            ok = [r for r in replies if not r.has_error()]
            failed = [self.round_plan[r.metadata.src_node_id][0] for r in replies
                      if r.has_error() and r.metadata.src_node_id in self.round_plan]
            contrib, times = [], []
            for r in ok:
                pid, a, hidden, measured = self.round_plan[r.metadata.src_node_id]
                contrib.append((r.content["arrays"].to_numpy_ndarrays(), hidden,
                                float(r.content["metrics"]["num-examples"])))
                times.append(measured)
            if failed:
                logging.getLogger("edgetvm.latte").warning(
                    "%s round %d: client(s) %s crashed mid-round; aggregated the other %d",
                    self.method, server_round, ", ".join(map(str, failed)), len(ok))
            # simulated round time: the slowest selected client that reported (measured TVM step time x steps)
            round_s = max(times, default=0.0)
            self.sim_time += round_s
            self.global_params = aggregate(self.global_params, self.plan.arch, contrib) if contrib else self.global_params
            widths = sorted(a.width for _, a, _, _ in self.round_plan.values())
            self.history.rounds.append({"round": server_round, "round_s": round_s, "sim_time_s": self.sim_time,
                                        "clients": len(ok), "failed": failed, "widths": widths, "accuracy": None})
            return ArrayRecord(self.global_params), MetricRecord({"clients": len(ok), "failed": len(failed),
                                                                  "round-sim-s": round_s})

        def evaluate(self, server_round: int, arrays) -> MetricRecord:
            acc = accuracy(arrays.to_numpy_ndarrays(), self.plan.Xte, self.plan.yte)
            if server_round > 0 and self.history.rounds:
                self.history.rounds[-1]["accuracy"] = acc
            if self.plan.on_round:
                self.plan.on_round(self.method, server_round, acc, self.sim_time)
            return MetricRecord({"accuracy": acc})

    return SubModelStrategy


@dataclass
class Plan:
    fleet: dict                 # partition id -> Profile
    measured: dict              # (profile name, width) -> measured seconds per step (TVM, in its cgroup)
    predicted: dict             # (profile name, width) -> cost-model seconds per step
    arch: dict = field(default_factory=lambda: dict(models.ARCHS[models.FED_ARCH]))
    batch: int = 32
    lr: float = 0.05
    local_steps: int = 20
    deadline: float | None = None
    alpha: float = 0.3
    seed: int = 0
    crash_rate: float = 0.0
    rounds: int = 30
    # Methods after this one run until its simulated time is spent, however many rounds that takes (a
    # method with shorter rounds gets more of them), not a fixed round count. None: `rounds` for all.
    same_time_as: str | None = "fedavg"
    max_rounds: int = 400
    on_round: object = None
    Xte: np.ndarray | None = None
    yte: np.ndarray | None = None

    def measured_step(self, profile, width) -> float:
        return self.measured[(profile.name, width)]

    def predicted_step(self, profile, width) -> float:
        return self.predicted[(profile.name, width)]


def rounds_for(strategy, plan: Plan, budget: float) -> int:
    """Rounds that fill `budget` simulated seconds for a method whose allocation does not change between
    rounds: each round waits for its slowest client's measured training time (a crash only shortens it)."""
    times = [plan.measured_step(plan.fleet[a.client], a.width) * a.steps
             for a in strategy.allocation(1) if a.width is not None]
    if not times or max(times) <= 0:
        return plan.rounds
    return int(min(plan.max_rounds, max(1, math.ceil(budget / max(times) - 1e-9))))


def simulate(plan: Plan, methods=METHODS, verbose: bool = False) -> dict[str, History]:
    """Run every method in one Flower simulation (Ray backend); returns each method's history."""
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    if not verbose:
        # Flower logs a traceback per crashed client; the strategy reports crashes itself
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
    _, plan.Xte, _, plan.yte = digits_split(plan.seed)
    Strategy = _strategy_class()
    histories: dict[str, History] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        budget = None
        for m in methods:
            h = histories.setdefault(m, History(m))
            s = Strategy(m, plan, h)
            rounds = plan.rounds if budget is None else rounds_for(s, plan, budget)
            s.start(grid=grid, initial_arrays=ArrayRecord(init_params(plan.arch, plan.seed)),
                    num_rounds=rounds, evaluate_fn=s.evaluate, timeout=600)
            if m == plan.same_time_as and h.rounds:
                budget = h.rounds[-1]["sim_time_s"]

    run_simulation(server_app=server, client_app=make_client_app(), num_supernodes=len(plan.fleet),
                   backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False,
                                                 # injected crashes print Ray tracebacks otherwise
                                                 "log_to_driver": verbose}},
                   verbose_logging=verbose)
    missing = [m for m in methods if m not in histories or not histories[m].rounds]
    if missing:
        raise RuntimeError(f"the Flower simulation finished without results for {', '.join(missing)}")
    return histories
