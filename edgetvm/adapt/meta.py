"""Meta-training of Conv4 for few-shot adaptation: p-Meta against MAML, ANIL and bias-only, first-order.

Every method meta-trains the same Conv4 (train.conv4) on N-way K-shot tasks of kanji renders (data.py's
"kanji" few-shot set) and differs only in what the inner loop (the adaptation) may change:
  maml    every weight and bias, one step size (first-order MAML: the meta-gradient is the query
          gradient at the adapted weights, second derivatives dropped)
  anil    the classifier only (ANIL)
  bias    every bias and the classifier (TinyTL's bias-only updating, which trains the head too)
  pmeta   a learned step size per layer and channel, inner_lr times an attention in [0, 1], kept sparse by a proximal
          L1 step whose weight grows with what updating that layer costs in memory (the spatial size of
          its input, whose channels the weight gradient keeps, and the depth the backward pass must reach);
          channels whose step size reaches 0 are frozen: at deployment they are left out of the mask and
          the compiled step (passes/adapt_step.py) computes and keeps nothing for them.
With a memory budget (`memory_budget` MiB of planned step memory at `budget_shots` images per class), p-Meta's
selection is fitted to it at every meta-validation check (adapt/budget.py: the channels and layers with the
smallest learned step sizes are dropped until the planner's figure fits); what a fit drops stays frozen for
the rest of meta-training, so every checkpoint kept fits the budget and the weights learn around the cut.
The step sizes' meta-gradient is first-order too: d L_query / d alpha = -sum over inner steps of
(query gradient at the adapted weights) * (that step's support gradient), summed over each channel's slice.
p-Meta's attention comes in two kinds (`attention`):
  static  one learned set of channel-wise step sizes, the same for every task (the selection above);
  task    p-Meta's task-conditioned attention (adapt/attention.py): the static selection becomes the union of
          what any task may update, and per task small networks score its layers and channels from the
          gradients of a first step on one support image per class; the rates are static x layer score x
          channel score, and a layer scored 0 is left out of that task's compiled step. The networks are
          meta-trained jointly with the backbone and the static rates by the same first-order loop (their
          meta-gradient: TaskAttention.backward).

The weights kept are those of the best meta-validation accuracy (checked every `val_every` iterations):
short first-order runs without batch norm are unstable, and validation catches a collapse.
The inner loop on the host runs TVM's compiled gradient (the masked step with output="grad" over all
parameters, checked equal to relax.training's gradients); the outer update is Adam in numpy.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import tvm
from tvm import relax

from edgetvm import data as data_mod
from edgetvm import train
from edgetvm.adapt import attention as at
from edgetvm.adapt import step as st
from edgetvm.errors import UserError
from edgetvm.runtime.tensors import to_tvm

METHODS = ("maml", "anil", "bias", "pmeta")
ATTENTIONS = ("static", "task")


@dataclass
class MetaConfig:
    method: str = "pmeta"
    n_way: int = 5
    k_shot: int = 1
    q_query: int = 5
    inner_steps: int = 5
    inner_lr: float = 0.1
    meta_lr: float = 2e-3
    meta_batch: int = 4
    iterations: int = 300
    channels: int = 32
    # p-Meta: the step sizes' own meta learning rate and the sparsity weight
    rate_lr: float = 3e-3
    sparsity: float = 2.0
    # p-Meta: planned memory (MiB, the memory-lean step) the selection must fit at budget_shots images a class
    memory_budget: float = 0.0
    budget_shots: int = 5
    # p-Meta: "static" step sizes, or "task": scaled per task by the task-conditioned attention, whose
    # scores below attention_threshold are 0
    attention: str = "static"
    attention_threshold: float = 0.05
    seed: int = 0
    val_every: int = 50
    val_tasks: int = 30

    def check(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        for k in ("n_way", "k_shot", "q_query", "inner_steps", "meta_batch", "iterations", "channels"):
            if getattr(self, k) < 1:
                raise UserError(f"--{k.replace('_', '-')} must be at least 1, not {getattr(self, k)}")
        if self.n_way < 2:
            raise UserError("--n-way must be at least 2 (one class is no classification task)")
        if self.memory_budget < 0 or not math.isfinite(self.memory_budget):
            raise UserError(f"--memory-budget {self.memory_budget}: give a positive number of MiB (0: no budget)")
        if self.memory_budget and self.method != "pmeta":
            raise UserError(f"--memory-budget fits p-Meta's learned selection; {self.method} updates a fixed set "
                            "(use --method pmeta)")
        if self.budget_shots < 1:
            raise UserError(f"--budget-shots must be at least 1, not {self.budget_shots}")
        if self.attention not in ATTENTIONS:
            raise UserError(f"unknown --attention {self.attention!r}; use one of {', '.join(ATTENTIONS)}")
        if self.attention == "task" and self.method != "pmeta":
            raise UserError(f"--attention task is p-Meta's; {self.method} updates a fixed set (use --method pmeta)")
        if not 0.0 < self.attention_threshold < 1.0:
            raise UserError(f"--attention-threshold {self.attention_threshold}: give a score in (0, 1)")


def forward_fn(model: train.Model, batch: int):
    """The compiled forward pass (x, *params) -> logits for a fixed batch."""
    ex = train._build(("forward", model, batch), lambda: tvm.IRModule({"backbone": train.backbone(model, batch)}))
    f = relax.VirtualMachine(ex, tvm.cpu())["backbone"]
    names = list(train.param_shapes(model))

    def run(x, params):
        return f(to_tvm(np.asarray(x, np.float32)), *[to_tvm(params[n]) for n in names]).numpy()

    return run


def memory_weights(model: train.Model) -> dict[str, float]:
    """Relative memory cost of updating each parameter (1 for the most expensive): a weight keeps its
    layer's input (spatial size), and any update makes the backward pass reach its layer."""
    c, h, w = model.input_shape
    costs, n_conv, n_fc = {}, 0, 0
    for layer in model.layers:
        if isinstance(layer, train.Conv):
            n_conv += 1
            costs[f"conv{n_conv}.weight"] = costs[f"conv{n_conv}.bias"] = float(h * w)
            h, w = h + 2 * layer.pad - layer.kernel + 1, w + 2 * layer.pad - layer.kernel + 1
        elif isinstance(layer, train.MaxPool):
            h, w = h // layer.size, w // layer.size
        elif isinstance(layer, train.Linear):
            n_fc += 1
            costs[f"fc{n_fc}.weight"] = costs[f"fc{n_fc}.bias"] = 1.0
    top = max(costs.values())
    return {k: v / top for k, v in costs.items()}


def initial_rates(model: train.Model, method: str, lr: float) -> dict[str, np.ndarray]:
    """Inner step sizes per parameter and channel (0: frozen) before meta-training."""
    masks = {"maml": st.full_mask, "pmeta": st.full_mask, "anil": st.last_layer_mask, "bias": st.bias_mask}
    mask = masks[method](model)
    return {n: (lr * np.asarray(mask.get(n, np.zeros(st.mask_len(s), bool)), np.float32))
            for n, s in train.param_shapes(model).items()}


def _expand(rate: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    axis = st.mask_axis(shape)
    view = [1] * len(shape)
    view[axis] = len(rate)
    return rate.reshape(view)


def _per_channel(a: np.ndarray) -> np.ndarray:
    axis = st.mask_axis(a.shape)
    return a.sum(axis=tuple(i for i in range(a.ndim) if i != axis))


class Adam:
    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t, self.m, self.v = lr, b1, b2, eps, 0, {}, {}

    def step(self, params: dict, grads: dict) -> None:
        self.t += 1
        for n, g in grads.items():
            m = self.m[n] = self.b1 * self.m.get(n, 0) + (1 - self.b1) * g
            v = self.v[n] = self.b2 * self.v.get(n, 0) + (1 - self.b2) * g * g
            mh, vh = m / (1 - self.b1 ** self.t), v / (1 - self.b2 ** self.t)
            params[n] = (params[n] - self.lr * mh / (np.sqrt(vh) + self.eps)).astype(np.float32)


@dataclass
class Learner:
    """Meta-trained weights and inner step sizes (0 = frozen) of one method."""
    config: MetaConfig
    params: dict
    rates: dict
    history: list = field(default_factory=list)
    best_iteration: int = 0     # the meta-validation best, whose weights these are
    planned: int = 0            # with a memory budget: planned bytes of the kept selection's step
    attention: at.TaskAttention | None = None   # attention="task": the attention networks

    @property
    def model(self) -> train.Model:
        return train.conv4(self.config.n_way, channels=self.config.channels)

    def mask(self) -> dict[str, np.ndarray]:
        """What adaptation updates: the channels with a positive step size (with the task-conditioned
        attention: the union of what any task may update; each task updates a subset, `for_task`)."""
        return {n: r > 0 for n, r in self.rates.items() if (r > 0).any()}

    def for_task(self, grads: dict) -> dict:
        """The task-conditioned attention of one task: features, scores, mask (a subset of `mask()`) and
        rates, from `grads`, the union slices of the gradient of a first step on one support image per class
        (at these weights)."""
        return at.task_attention(self.attention, self.rates, self.mask(), grads, self.params)

    def updated_share(self) -> float:
        """Share of the parameters the mask updates."""
        shapes = train.param_shapes(self.model)
        total = sum(int(np.prod(s)) for s in shapes.values())
        upd = sum(int(np.prod(s)) // st.mask_len(s) * int((self.rates[n] > 0).sum()) for n, s in shapes.items())
        return upd / total


class _Grads:
    """Compiled full gradients for the support and query batch sizes (and, built when first needed, for the
    attention's statistics chunk of one image per class)."""

    def __init__(self, model: train.Model, support: int, query: int):
        full = st.full_mask(model)
        self.model = model
        self.s = st.MaskedStep(model, support, full, output="grad")
        self.q = st.MaskedStep(model, query, full, output="grad")
        self._chunk = {}

    def chunk(self, batch: int) -> st.MaskedStep:
        if batch == self.s.batch:
            return self.s
        if batch not in self._chunk:
            self._chunk[batch] = st.MaskedStep(self.model, batch, st.full_mask(self.model), output="grad")
        return self._chunk[batch]


def stats_chunk(y: np.ndarray, n_way: int) -> np.ndarray:
    """Indices of the attention's statistics chunk: the first support image of each class. The statistics
    step runs on these N images whatever the shot count, so its memory is that of a 1-shot step (over the
    union), and its statistics are distributed as in meta-training (1-shot tasks)."""
    return np.array([np.flatnonzero(y == c)[0] for c in range(n_way)], np.int64)


def task_rates(learner: Learner, g: _Grads, params: dict, sx, sy) -> tuple[dict, dict | None]:
    """(this task's attention, the full gradient of the first step if the chunk is the whole support set:
    the inner loop reuses it) on the host, from full gradients sliced to the union."""
    idx = stats_chunk(sy, learner.config.n_way)
    _, grads = g.chunk(len(idx)).run(sx[idx], sy[idx], params)
    return learner.for_task(at.union_slices(grads, learner.mask())), grads if len(idx) == len(sy) else None


def inner_loop(grads: st.MaskedStep, params: dict, rates: dict, sx, sy, steps: int, keep=False, first=None):
    """`steps` SGD steps with per-channel step sizes on the support set (host side, full gradients);
    `first`: the first step's gradient if already computed (same weights, same batch)."""
    history = []
    for i in range(steps):
        if i == 0 and first is not None:
            g = first
        else:
            _, g = grads.run(sx, sy, params)
        if keep:
            history.append(g)
        params = {n: (p - _expand(rates[n], p.shape) * g[n]).astype(np.float32) if rates[n].any() else p
                  for n, p in params.items()}
    return params, history


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def meta_train(config: MetaConfig, progress=None) -> Learner:
    """Meta-train one method; `progress(iteration, record)` is called after each iteration."""
    config.check()
    fs = data_mod.load_fewshot("kanji")
    model = train.conv4(config.n_way, channels=config.channels)
    params = train.init_params(model, config.seed)
    # a zero classifier: every task starts at chance (loss ln N) whatever its labels, the body's features
    # are what meta-training shapes
    params[f"fc{sum(isinstance(l, train.Linear) for l in model.layers)}.weight"][:] = 0.0
    rates = initial_rates(model, config.method, config.inner_lr)
    n_s, n_q = config.n_way * config.k_shot, config.n_way * config.q_query
    g = _Grads(model, n_s, n_q)
    fwd = forward_fn(model, n_q)
    opt, rate_opt = Adam(config.meta_lr), Adam(config.rate_lr)
    lam = {n: config.sparsity * c for n, c in memory_weights(model).items()}
    rng = np.random.default_rng([config.seed, 7])
    task = config.attention == "task"
    att = at.TaskAttention.init(model, config.attention_threshold) if task else None
    # scores live in [0, 1], the static rates in [0, inner_lr]: the attention's learning rate (and its proximal
    # step) is rate_lr / inner_lr, so both move by the same share of their range per iteration
    att_lr = config.rate_lr / config.inner_lr
    att_opt = Adam(att_lr)
    learner = Learner(config, params, rates, attention=att)
    best = (-1.0, 0, None, None)
    fitted = None     # with a budget: the last fit's mask; what it left out stays frozen
    if config.memory_budget:
        from edgetvm.adapt import budget as bu

        budget = int(config.memory_budget * bu.MIB)
        planner = bu.Planner(model, config.n_way * config.budget_shots)
        floor = bu.floor_bytes(model, planner.batch, planner)
        if floor > budget:
            raise UserError(f"--memory-budget {config.memory_budget:g} MiB is below the smallest step "
                            f"({bu.floor_name(model)} only: {floor / bu.MIB:.2f} MiB planned at "
                            f"{planner.batch} support images); raise it")

        def fit() -> "bu.Fit":
            f = bu.fit_budget(model, rates, budget, planner.batch, planner=planner)
            for n in rates:
                rates[n] = np.where(f.mask.get(n, False), rates[n], 0.0).astype(np.float32)
            return f
    t0 = time.perf_counter()
    for it in range(config.iterations):
        meta_g = {n: np.zeros_like(p) for n, p in params.items()}
        rate_g = {n: np.zeros_like(r) for n, r in rates.items()}
        att_g = {k: np.zeros_like(v) for k, v in att.theta.items()} if task else {}
        qloss = qacc = 0.0
        dropped_layers = 0.0
        for _ in range(config.meta_batch):
            sx, sy, qx, qy = data_mod.sample_task(fs, "train", config.n_way, config.k_shot, config.q_query, rng)
            first, ta = None, None
            task_r = rates
            if task:   # this task's rates, from the first step's gradient statistics
                ta, first = task_rates(learner, g, params, sx, sy)
                task_r = ta["rates"]
                dropped_layers += (len({at.layer_of(n) for n in learner.mask()}) -
                                   len({at.layer_of(n) for n in ta["mask"]})) / config.meta_batch
            adapted, hist = inner_loop(g.s, params, task_r, sx, sy, config.inner_steps,
                                       keep=config.method == "pmeta", first=first)
            loss, gq = g.q.run(qx, qy, adapted)
            qloss += loss / config.meta_batch
            qacc += accuracy(fwd(qx, adapted), qy) / config.meta_batch
            for n in params:
                meta_g[n] += gq[n] / config.meta_batch
            # first-order d L_query / d rate, per channel: minus the sum over inner steps of
            # (query gradient at the adapted weights) x (that step's support gradient)
            if config.method == "pmeta" and not task:
                for gs in hist:
                    for n in rates:
                        rate_g[n] -= _per_channel(gq[n] * gs[n]) / config.meta_batch
            elif task:   # this task's, then through rate = static x layer score x channel score (attention.py)
                d_rate = {n: -sum(_per_channel(gq[n] * gs[n]) for gs in hist) for n in rates}
                d_static, d_att = att.backward(d_rate, rates, learner.mask(), ta["features"], ta["scores"])
                for n in rates:
                    rate_g[n] += d_static[n] / config.meta_batch
                for k, v in d_att.items():
                    att_g[k] += v / config.meta_batch
        opt.step(params, meta_g)
        if config.method == "pmeta":
            rate_opt.step(rates, rate_g)
            for n in rates:   # proximal L1 step, weighted by memory cost; the attention stays in [0, 1]
                rates[n] = np.clip(rates[n] - config.rate_lr * lam[n], 0.0, config.inner_lr).astype(np.float32)
            if task:
                att_opt.step(att.theta, att_g)
                # the same memory-weighted proximal step on each layer's score offset: per task, an expensive
                # layer must earn its place from the task's statistics (a layer dropped per task is memory
                # saved on that task)
                for k in att.theta:
                    if k.startswith("layer_b/"):
                        att.theta[k] = (att.theta[k] - att_lr * lam[f"{k[8:]}.weight"]).astype(np.float32)
            if fitted is not None:   # what a budget fit dropped stays dropped
                for n in rates:
                    rates[n] = np.where(fitted.get(n, False), rates[n], 0.0).astype(np.float32)
            if not any(r.any() for r in rates.values()):   # never nothing: keep the classifier's bias
                rates["fc1.bias"][:] = config.inner_lr
        record = {"iteration": it + 1, "query_loss": qloss, "query_accuracy": qacc,
                  "updated_share": learner.updated_share(), "seconds": time.perf_counter() - t0}
        if task:
            record["task_layers_dropped"] = dropped_layers   # mean over the iteration's tasks
        if config.val_every and ((it + 1) % config.val_every == 0 or it + 1 == config.iterations):
            if config.memory_budget:   # fit before validating: every checkpoint kept fits the budget
                f = fit()
                fitted = f.mask
                record |= {"planned_mib": f.planned / bu.MIB, "updated_share": learner.updated_share()}
                if f.dropped:
                    record["budget_dropped"] = f.dropped
            record["val_accuracy"] = evaluate_host(learner, fs, "val", config.k_shot, config.val_tasks,
                                                   seed=config.seed + 1000, grads=g, fwd=fwd)["accuracy"]
        learner.history.append(record)
        if record.get("val_accuracy", -1.0) > best[0]:   # keep the best on meta-validation (early stopping)
            best = (record["val_accuracy"], it + 1, {n: p.copy() for n, p in params.items()},
                    {n: r.copy() for n, r in rates.items()},
                    {k: v.copy() for k, v in att.theta.items()} if task else None)
        if progress is not None:
            progress(it + 1, record)
    if best[2] is not None:
        learner.params, learner.rates, learner.best_iteration = best[2], best[3], best[1]
        if task:
            learner.attention = at.TaskAttention(best[4], config.attention_threshold)
    if config.memory_budget:   # the kept checkpoint's selection, fitted (a no-op unless never checked)
        rates = learner.rates
        learner.planned = fit().planned
    return learner


def evaluate_host(learner: Learner, fs, split: str, k_shot: int, tasks: int, seed: int = 0, steps=None,
                  grads=None, fwd=None) -> dict:
    """Mean query accuracy after adaptation, the inner loop run on the host (meta-validation)."""
    c = learner.config
    model = learner.model
    if grads is None or grads.s.batch != c.n_way * k_shot:
        grads = _Grads(model, c.n_way * k_shot, c.n_way * c.q_query)
    fwd = fwd or forward_fn(model, c.n_way * c.q_query)
    rng = np.random.default_rng([seed, 11])
    accs = []
    for _ in range(tasks):
        sx, sy, qx, qy = data_mod.sample_task(fs, split, c.n_way, k_shot, c.q_query, rng)
        rates, first = learner.rates, None
        if learner.attention is not None:
            ta, first = task_rates(learner, grads, learner.params, sx, sy)
            rates = ta["rates"]
        adapted, _ = inner_loop(grads.s, learner.params, rates, sx, sy, steps or c.inner_steps, first=first)
        accs.append(accuracy(fwd(qx, adapted), qy))
    return _summary(accs)


def _summary(accs) -> dict:
    a = np.asarray(accs)
    return {"accuracy": float(a.mean()), "ci95": float(1.96 * a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0,
            "tasks": int(len(a))}


def evaluate_compiled(learner: Learner, fs, split: str, k_shot: int, tasks: int, seed: int = 0,
                      steps=None, q_query=None) -> dict:
    """Mean query accuracy after adaptation by the compiled masked step (what runs on the device)."""
    c = learner.config
    q = q_query or c.q_query
    model = learner.model
    device = TaskAdapter(learner, c.n_way * k_shot) if learner.attention is not None else \
        st.MaskedStep(model, c.n_way * k_shot, learner.mask(), lr=learner.rates, output="update")
    fwd = forward_fn(model, c.n_way * q)
    rng = np.random.default_rng([seed, 11])
    accs, masks = [], {}
    for _ in range(tasks):
        sx, sy, qx, qy = data_mod.sample_task(fs, split, c.n_way, k_shot, q, rng)
        if learner.attention is not None:
            adapted, _, ta = device.adapt(sx, sy, steps or c.inner_steps)
            key = " ".join(dict.fromkeys(at.layer_of(n) for n in ta["mask"]))   # in the model's order
            masks[key] = masks.get(key, 0) + 1
        else:
            adapted, _ = device.adapt(sx, sy, learner.params, steps or c.inner_steps)
        accs.append(accuracy(fwd(qx, adapted), qy))
    out = _summary(accs)
    if masks:   # how often each set of layers was updated (task-conditioned attention)
        out["task_layers"] = dict(sorted(masks.items(), key=lambda kv: -kv[1]))
    return out


class TaskAdapter:
    """Adaptation with the task-conditioned attention, as the device runs it: (1) the statistics step, the
    union's compiled gradient step on one support image per class (memory of a 1-shot step over the union,
    whatever the shot count); (2) the attention (numpy, a few hundred multiply-adds); (3) the compiled masked
    step for the task's mask (a subset of the union, one of at most 2^layers: built once, cached by mask) with
    the task's rates as inputs (lr="input"), run `steps` times on the whole support set."""

    def __init__(self, learner: Learner, batch: int, conv_as_matmul: bool = True):
        self.learner, self.batch, self.conv_as_matmul = learner, int(batch), conv_as_matmul
        c = learner.config
        self.stats = st.MaskedStep(learner.model, c.n_way, learner.mask(), output="grad",
                                   conv_as_matmul=conv_as_matmul)
        self.steps: dict = {}

    def plan(self, x, y) -> dict:
        """This task's attention (features, scores, mask, rates) from the statistics step."""
        idx = stats_chunk(y, self.learner.config.n_way)
        _, grads = self.stats.run(x[idx], y[idx], self.learner.params)
        return self.learner.for_task(grads)

    def step_for(self, mask: dict) -> st.MaskedStep:
        key = st._mask_key(mask)
        if key not in self.steps:
            self.steps[key] = st.MaskedStep(self.learner.model, self.batch, mask, lr="input",
                                            conv_as_matmul=self.conv_as_matmul)
        return self.steps[key]

    def adapt(self, x, y, steps: int) -> tuple[dict, list[float], dict]:
        ta = self.plan(x, y)
        params, losses = self.step_for(ta["mask"]).adapt(x, y, self.learner.params, steps, rates=ta["rates"])
        return params, losses, ta


# ---- artifacts -----------------------------------------------------------------------------------

def save(learner: Learner, path) -> None:
    """A directory with meta.json (config, history, mask summary) and weights.npz (weights and step sizes),
    written beside the target and renamed into place."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        meta = {"kind": "edgetvm-adapt", "version": 1, "config": asdict(learner.config),
                "history": learner.history, "best_iteration": learner.best_iteration, "updated_share": learner.updated_share(),
                "planned_bytes": learner.planned,
                "mask": {n: int(m.sum()) for n, m in learner.mask().items()}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        arrays = {f"param/{n}": a for n, a in learner.params.items()}
        arrays |= {f"rate/{n}": r for n, r in learner.rates.items()}
        if learner.attention is not None:
            arrays |= learner.attention.arrays()
        with open(tmp / "weights.npz", "wb") as f:
            np.savez(f, **arrays)
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(path) -> Learner:
    """A Learner from an artifact written by `save`; a one-line UserError if it is not one."""
    import zipfile
    from pathlib import Path

    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("kind") != "edgetvm-adapt":
            raise ValueError("not an adaptation artifact")
        config = MetaConfig(**meta["config"])
        with np.load(path / "weights.npz", allow_pickle=False) as z:
            params = {k[6:]: z[k] for k in z.files if k.startswith("param/")}
            rates = {k[5:]: z[k] for k in z.files if k.startswith("rate/")}
            attn = {k: z[k] for k in z.files if k.startswith("attn/")}
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a meta-trained model ({e}); make one with `edgetvm adapt meta-train`") from None
    attention = at.TaskAttention.from_arrays(attn, config.attention_threshold)
    if (attention is None) != (config.attention != "task"):
        raise UserError(f"{path}: its attention networks are {'missing' if attention is None else 'unexpected'} "
                        f"for --attention {config.attention}; make it again with `edgetvm adapt meta-train`")
    learner = Learner(config, params, rates, meta.get("history", []), int(meta.get("best_iteration", 0)),
                      int(meta.get("planned_bytes", 0)), attention)
    shapes = train.param_shapes(learner.model)
    if set(params) != set(shapes) or any(params[n].shape != s for n, s in shapes.items()):
        raise UserError(f"{path}: its weights do not fit Conv4 with {config.channels} channels; make it again "
                        "with `edgetvm adapt meta-train`")
    return learner
