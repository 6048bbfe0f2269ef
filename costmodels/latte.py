"""LATTE-style training-time cost model: per-kernel, algorithm-aware XGBoost + a per-step overhead term.

A training step's wall time on a device is modelled as

    step = (sum over TIR kernels of calls x per-call kernel time  +  per-step overhead) x wall/CPU

* Kernels: every TVM kernel of the step (forward, backward and SGD kernels of every layer) is one
  row: what it computes (main operator, ops fused into it), its size (FLOPs, bytes in and out), the
  loop structure of the TIR schedule TVM produced (loops, nesting, blocks, spatial/reduction extents,
  parallel/vectorised loops, the innermost loop's extent and stride and how far that strided stream
  overflows L1/L2 including set conflicts), the step around it, and the speed of one core of the
  device. XGBoost predicts log(CPU seconds per call). Measured per-kernel times are thread CPU time
  (measure.py), minus the instrument's own cost per call (the per-call time of the cheapest VM
  builtin, `vm.builtin.null_value`, in the same measurement).
* Device share: a device that gets a small share of a core also runs each kernel slower in CPU time
  (throttled every period, it comes back to cold caches), and short kernels most: at 0.1 of a core
  +42% for the width-1/8 models' kernels, +12% for the width-1 models'. That effect is linear in
  log(share), log(cpus) and log(share) x log(the kernel's work), fitted within each kernel across the
  devices that ran it, and added to the trees' margin: trees would give a device between two
  profiled shares the kernels of one of them.
* Overhead: what a step spends outside TIR kernels: the VM interpreting the step, its builtins
  (allocation, shape checks, tuples), the Python calls of `backbone_loss_adjoint` and `optimizer` and
  their argument lists, and CPU time that grows with the kernels' (the step uninstrumented is not the
  sum of instrumented kernels). Target: the step's uninstrumented CPU time minus its kernels; linear
  in the step's builtin calls, kernel calls and parameter tensors, the megabytes its kernel calls
  touch and its kernels' CPU time, times a power of the device's cores; least relative squares over
  the training measurements, every coefficient non-negative but the megabytes': timed one by one,
  kernels refill operands that each instrument callback evicted, so they add up to more than they
  take in the uninstrumented step (tuned mlp-a at width 1: 21.4 us outside kernels, its default
  build 31.7 us with the same VM calls), which the fit puts at -13.5 us per MB touched.
* Wall/CPU: a device with a CFS quota q gets q of a core, but no more than the host leaves it (c),
  so wall = CPU / min(q, c) plus the throttling slack; c, the slack and a core-count term fitted to
  measured wall x min(q, 1) / CPU (training devices only).
* Schedules: a kernel is TVM's default lowering or MetaSchedule's tuned schedule (the `tuned` flag;
  tuned kernels also differ in loop structure: tiled nests, parallel, vectorized and unrolled loops, a
  local accumulator) and carry the latency tuning measured for their schedule: a feature per unit
  of work and the trees' starting point (8 trials leave alike matmuls 30-80 GFLOP/s apart, which
  loop structure alone did not tell apart: held-out tuned steps 8.1% MAPE without it, 5.5% with it).
  Default kernels are serial; a tuned kernel's parallel loops run on every core of the device, so
  log(cpus) x (the kernel has a parallel loop) is one more device row. Kernel times are the calling thread's CPU time, which for a parallel
  kernel is its elapsed time (the thread spins until the pool is done), so wall = CPU / share holds
  for both.

* Machine: every absolute time the model holds (per-call kernel times, the overhead, tuning latencies)
  is in units of the host's reference step (the CPU time of one fixed compiled training step on the
  bare host, `calibrate` in measure.py, median over the profile's measuring processes), and the
  cache-conflict features use the caches of the machine that runs the kernel. A model fitted on one
  machine predicts another from that machine's record (`predict_parts(..., host=)`).

`FlopsBaseline` is the FLOPs-coefficient model: step = a x training FLOPs / nominal GFLOP/s + b.
Both are evaluated on whole-step measured wall times.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

KINDS = ["matmul", "conv2d", "conv2d_transpose", "max_pool2d", "max_pool2d_backward", "relu", "add",
         "multiply", "subtract", "transpose", "reshape", "collapse_sum", "sum", "log_softmax",
         "nll_loss_without_weight", "te", "tir_exp", "where", "less", "other"]
STATIC = ["n_fused", "flops", "bytes", "out_bytes", "n_args", "n_loops", "loop_depth", "n_blocks",
          "spatial_extent", "reduce_extent", "max_extent", "n_parallel", "n_vectorized",
          "inner_extent", "inner_reduce", "inner_stride", "inner_l1_overflow", "inner_l2_overflow",
          "tuned", "n_unrolled", "auto_unroll", "n_cache_stages"]
LOGGED = {"flops", "bytes", "out_bytes", "spatial_extent", "reduce_extent", "max_extent", "inner_extent",
          "inner_stride", "inner_l1_overflow", "inner_l2_overflow", "auto_unroll"}
FEATURES = [f"kind_{k}" for k in KINDS] + STATIC + ["log_flops_per_byte", "log_tune_per_work", "calls", "step_log_flops",
                                                     "step_log_bytes", "step_kernels", "log_core_gflops",
                                                     "log_core_bw"]
DEVICE = ["log_share", "log_cpus"]
KERNEL_DEVICE = DEVICE + ["log_share_x_log_work", "log_cpus_x_parallel"]
OVERHEAD = ["one", "builtin_calls", "kernel_calls", "n_params", "kernel_mbytes", "kernels_cpu"]
SIGNED = {"kernel_mbytes"}  # the instrument's refill, taken back out of the kernels' sum (overhead_fit)
VERSION = 9


def host_log(host: dict | None) -> float:
    """log seconds of the host's reference step (`calibrate` in measure.py): the unit every absolute time
    of the model is in, so a model fitted on one machine predicts another through its calibration.
    0 where a profile predates calibration (its times stay in seconds)."""
    ref = (host or {}).get("ref_step_s")
    return math.log(ref) if ref else 0.0


def norm(device: dict) -> float:
    """The share of one core a single-threaded kernel gets on the device."""
    return min(float(device["cpu_quota"]), 1.0)


def device_row(device: dict) -> list[float]:
    """What the device's share of the host changes in every kernel's per-call CPU time, smoothly."""
    return [math.log(norm(device)), math.log(float(device["cpus"]))]


def kernel_device_rows(device: dict, X: np.ndarray) -> np.ndarray:
    """Per kernel row: the device rows, log(share) x the kernel's log work, and log(cpus) for a kernel
    with a parallel loop. A small share slows short kernels most: at 0.1 of a core the width-1/8
    models' kernels took 1.42x their CPU time on a full core, the width-1 models' 1.12x (a throttled
    period comes back to cold caches, which a long kernel refills once over more work)."""
    ls, lc = device_row(device)
    z = work_margin(X) - WORK_CENTER
    parallel = (X[:, FEATURES.index("n_parallel")] > 0).astype(np.float64)
    return np.stack([np.full(len(X), ls), np.full(len(X), lc), ls * z, lc * parallel], 1)


def wall_log(device: dict, wall: list[float]) -> float:
    """log(wall x share / CPU) of a step: a + max(0, log(share / c)) + d log(cpus). A device gets its
    quota of a core, but no more than the host leaves it (c): a full core measured 1.068 x CPU, devices
    at 0.1-0.6 of a core 1.00-1.01 x CPU / share (there is always that much to take)."""
    a, log_c, d = wall
    return a + max(0.0, math.log(norm(device)) - log_c) + d * math.log(float(device["cpus"]))


def is_kernel(symbol: str, meta: dict) -> bool:
    return not symbol.startswith("vm.builtin") and symbol in meta["kernels"]


def _kernel_row(static: dict, calls: float, device: dict, context: list[float], host: dict | None) -> list[float]:
    kind = static.get("kind", "other")
    kind = kind if kind in KINDS else "other"
    row = [1.0 if kind == k else 0.0 for k in KINDS]
    static = dict(static)
    if host and "l1" in host and "inner_stride" in static:
        # set conflicts depend on the caches of the machine that runs the kernel, not the one that
        # compiled the profile's steps (Zen 4: 32 KiB 8-way L1d; Zen 5: 48 KiB 12-way)
        from edgetvm.latte.training import stream_overflow

        ext, stride = int(static.get("inner_extent", 0)), int(static.get("inner_stride", 0))
        static["inner_l1_overflow"] = stream_overflow(ext, stride, host["l1"])
        static["inner_l2_overflow"] = stream_overflow(ext, stride, host["l2"])
    for f in STATIC:
        v = float(static.get(f, 0.0))
        row.append(math.log1p(v) if f in LOGGED else v)
    row.append(math.log1p(static.get("flops", 0.0)) - math.log1p(static.get("bytes", 0.0)))
    # What tuning measured for the chosen schedule, per unit of work (missing for default kernels: the
    # trees route them apart): 8 trials leave schedules 30-80 GFLOP/s apart on alike matmuls, which
    # loop-structure features alone told apart to +-30-250% per kernel on held-out architectures.
    # In host units: tuning ran on the machine that runs the step, and its seconds are that machine's.
    tune_s = float(static.get("tune_s", 0.0))
    row.append(math.log(tune_s) - host_log(host) - _log_work(static.get("flops", 0.0), static.get("bytes", 0.0))
               if tune_s > 0 else float("nan"))
    row.append(calls)
    row += context
    # The trees see the speed of one core of the device (the kind of CPU), not its share of it: a
    # share is a number between the profiled ones, where trees can only pick a side (a device at
    # 0.15 of a core got the kernels of the 0.1 device, 8% slower); the share is the linear term.
    per_core = min(float(device["cpu_quota"]), float(device["cpus"]))
    row += [math.log(device["nominal_gflops"] / per_core), math.log(device["mem_bandwidth_gbs"] / per_core)]
    return row


def _log_work(flops, nbytes):
    return np.log(flops + nbytes / 4 + 2000.0) - math.log(1e9)


def work_margin(X: np.ndarray) -> np.ndarray:
    """log of a kernel's work (FLOPs + 4-byte elements moved, plus a fixed cost): the trees learn seconds
    per unit of work, which carries over to sizes the training set lacks better than seconds."""
    return _log_work(np.expm1(X[:, FEATURES.index("flops")]), np.expm1(X[:, FEATURES.index("bytes")]))


def prior_margin(X: np.ndarray) -> np.ndarray:
    """Where the trees start from, log seconds per call: the kernel's log work, or for a tuned kernel the
    latency tuning measured for its schedule (the trees then learn what a device does to it)."""
    return work_margin(X) + np.nan_to_num(X[:, FEATURES.index("log_tune_per_work")], nan=0.0)


WORK_CENTER = math.log(1e5) - math.log(1e9)  # a mid-sized kernel's work, so log(share) alone means its effect


def rows_for_model(meta: dict, calls: dict[str, float], device: dict,
                   host: dict | None = None) -> tuple[list[str], np.ndarray]:
    """Feature rows of the TIR kernels one step calls on `device` emulated on (or being) `host`; `calls`
    maps symbol -> calls per step."""
    ks = meta["kernels"]
    syms = sorted(s for s in calls if is_kernel(s, meta))
    context = [math.log1p(sum(ks[s]["flops"] * calls[s] for s in syms)),
               math.log1p(sum(ks[s]["bytes"] * calls[s] for s in syms)),
               float(sum(calls[s] for s in syms))]
    X = np.array([_kernel_row(ks[s], calls[s], device, context, host) for s in syms], dtype=np.float64)
    return syms, X


def overhead_row(meta: dict, calls: dict[str, float]) -> list[float]:
    builtin = sum(c for s, c in calls.items() if s.startswith("vm.builtin"))
    kernel = sum(c for s, c in calls.items() if is_kernel(s, meta))
    mbytes = sum(c * meta["kernels"][s]["bytes"] for s, c in calls.items() if is_kernel(s, meta)) / 1e6
    return [1.0, builtin, kernel, float(meta.get("n_params", 0)), mbytes]


def instrument_cost(result: dict) -> float:
    """CPU seconds the instrument adds to each timed call: the per-call time of the cheapest VM builtin."""
    per = [k["time_s"] / k["calls"] for s, k in result["kernels"].items()
           if s.startswith("vm.builtin") and k["calls"] > 0]
    return min(per) if per else 0.0


def cpu_step(result: dict) -> float:
    """CPU seconds of one uninstrumented step (older profile files: wall x share of a core)."""
    if "cpu_step_s" in result:
        return float(result["cpu_step_s"])
    return float(result["step_s"]) * norm(result["device"])


def decompose(result: dict, meta: dict) -> dict:
    """A measured step split into per-call CPU time of each TIR kernel and the CPU overhead outside them."""
    c = instrument_cost(result)
    scale = 1.0 if result.get("clock") == "thread_cpu" else norm(result["device"])
    per_call, total = {}, 0.0
    for s, k in result["kernels"].items():
        if not is_kernel(s, meta) or k["calls"] <= 0:
            continue
        t = max(k["time_s"] / k["calls"] * scale - c * scale, 2e-8)
        per_call[s] = t
        total += t * k["calls"]
    step_cpu = cpu_step(result)
    return {"per_call_s": per_call, "kernels_s": total, "overhead_s": step_cpu - total, "cpu_step_s": step_cpu,
            "instrument_s": c * scale}


class LatteModel:
    """Per-kernel XGBoost + overhead + wall/CPU calibration; `predict_step` is the whole step's wall time."""

    def __init__(self, booster=None, overhead: list[float] | None = None, wall: list[float] | None = None,
                 device: list[float] | None = None, overhead_cpus: float = 0.0, host: dict | None = None,
                 drop: tuple[str, ...] = ()):
        self.booster = booster
        self.overhead = overhead or [0.0] * len(OVERHEAD)
        self.wall = wall or [0.0, 0.0, 0.0]
        self.device = device or [0.0] * len(KERNEL_DEVICE)
        self.overhead_cpus = overhead_cpus
        self.host = host            # the machine the model was fitted on: predictions default to it
        self.drop = tuple(drop)     # features withheld from the trees (ablations); "device_rows": no share effect

    def _withheld(self, X: np.ndarray) -> np.ndarray:
        for f in self.drop:
            if f in FEATURES:
                X[:, FEATURES.index(f)] = np.nan
        return X

    @staticmethod
    def dataset(measurements: list[dict], metas: dict[str, dict]):
        """(X, y, weight, device rows, kernel ids, log host unit): one row per TIR kernel, y = log CPU
        seconds per call, weighted by the kernel's share of its step (the big kernels decide a step's
        time) plus a floor."""
        Xs, ys, ws, ds, ks, hs = [], [], [], [], [], []
        for m in measurements:
            meta = metas[m["dir"]]
            parts = decompose(m, meta)
            calls = {s: k["calls"] for s, k in m["kernels"].items()}
            syms, X = rows_for_model(meta, calls, m["device"], m.get("host"))
            hs.append(np.full(len(syms), host_log(m.get("host"))))
            t = np.array([parts["per_call_s"][s] for s in syms])
            c = np.array([calls[s] for s in syms])
            Xs.append(X)
            ys.append(np.log(t))
            ws.append(0.2 / len(syms) + t * c / max(parts["kernels_s"], 1e-12))
            ds.append(kernel_device_rows(m["device"], X))
            ks += [(m["dir"], s) for s in syms]
        return np.vstack(Xs), np.concatenate(ys), np.concatenate(ws), np.vstack(ds), ks, np.concatenate(hs)

    @staticmethod
    def device_effect(y: np.ndarray, w: np.ndarray, D: np.ndarray, kernels: list) -> list[float]:
        """Coefficients of the device rows on log per-call time, within each kernel (one compiled kernel
        measured on several devices: its own size and schedule cancel out)."""
        groups: dict = {}
        for i, k in enumerate(kernels):
            groups.setdefault(k, []).append(i)
        yc, Dc, wc = [], [], []
        for idx in groups.values():
            if len(idx) < 2:
                continue
            sw = w[idx].sum()
            yc.append(y[idx] - np.dot(w[idx], y[idx]) / sw)
            Dc.append(D[idx] - w[idx] @ D[idx] / sw)
            wc.append(w[idx])
        if not yc:
            return [0.0] * D.shape[1]
        yc, Dc, wc = np.concatenate(yc), np.vstack(Dc), np.sqrt(np.concatenate(wc))
        return [float(v) for v in np.linalg.lstsq(Dc * wc[:, None], yc * wc, rcond=None)[0]]

    def fit(self, measurements: list[dict], metas: dict[str, dict], seed: int = 0) -> "LatteModel":
        import xgboost as xgb

        X, y, w, D, kernels, H = self.dataset(measurements, metas)
        X = self._withheld(X)
        self.device = [0.0] * D.shape[1] if "device_rows" in self.drop else self.device_effect(y - H, w, D, kernels)
        hosts = [m["host"] for m in measurements if m.get("host")]
        self.host = hosts[0] if hosts else None
        dtrain = xgb.DMatrix(X, label=y, weight=w, base_margin=prior_margin(X) + H + D @ np.array(self.device),
                             feature_names=FEATURES)
        params = {"max_depth": 6, "eta": 0.05, "subsample": 0.8, "colsample_bytree": 0.8,
                  "min_child_weight": 2, "objective": "reg:squarederror", "seed": seed, "nthread": 2}
        self.booster = xgb.train(params, dtrain, num_boost_round=600)
        # overhead: CPU seconds outside kernels, relative errors weighted alike across step sizes
        A, b, w, cpus = [], [], [], []
        for m in measurements:
            meta = metas[m["dir"]]
            parts = decompose(m, meta)
            calls = {s: k["calls"] for s, k in m["kernels"].items()}
            unit = math.exp(host_log(m.get("host")))  # in host units, like the kernels
            A.append(overhead_row(meta, calls) + [parts["kernels_s"] / unit])
            b.append(parts["overhead_s"] / unit)
            w.append(unit / parts["cpu_step_s"])
            cpus.append(float(m["device"]["cpus"]))
        self.overhead, self.overhead_cpus = self.overhead_fit(np.array(A), np.array(b), np.array(w), np.array(cpus))
        # wall/CPU: the share of a core the host leaves (c) by a search, a and d (a second core may run
        # TVM's thread pool next to the kernels: CPU time, no wall time) by least squares for each c.
        r = np.array([math.log(m["step_s"] * norm(m["device"]) / cpu_step(m)) for m in measurements])
        share = np.log([norm(m["device"]) for m in measurements])
        L = np.array([[1.0, math.log(float(m["device"]["cpus"]))] for m in measurements])
        best = None
        for log_c in np.linspace(0.0, math.log(0.5), 71):  # from c = 1: where nothing pins c, no cap
            t = r - np.maximum(0.0, share - log_c)
            (a, d), *_ = np.linalg.lstsq(L, t, rcond=None)
            sse = float(((L @ np.array([a, d]) - t) ** 2).sum())
            if best is None or sse < best[0] - 1e-12:
                best = (sse, [float(a), float(log_c), float(d)])
        self.wall = best[1]
        return self

    @staticmethod
    def overhead_fit(A: np.ndarray, b: np.ndarray, w: np.ndarray, cpus: np.ndarray) -> tuple[list[float], float]:
        """overhead = (A @ coef) x cpus^e: coef >= 0 (but the SIGNED columns) by bounded least squares
        for each e, e by minimising what is left.

        The code around the kernels does not slow down with the device's share of a core as the
        kernels do (its share of the step, training architectures: 14.5% at 0.1 of a core, 14.3% on
        a full one), but it halves with a second core (6.7%); one factor for kernels and overhead put
        13% everywhere. Where every training device has one core, e stays 0 (it is not identified).
        Non-negative: plain least squares gave these collinear columns a negative intercept that made
        a one-layer MLP (fewer calls than any training step) a negative overhead: -0.53 ms of a 1.31 ms
        step."""
        from scipy.optimize import lsq_linear, minimize_scalar

        lc = np.log(cpus)
        lb = np.array([-np.inf if c in SIGNED else 0.0 for c in OVERHEAD])

        def solve(e):
            r = lsq_linear(A * (np.exp(lc * e) * w)[:, None], b * w, bounds=(lb, np.inf))
            return r.x, float(np.sum(r.fun ** 2))

        e = minimize_scalar(lambda e: solve(e)[1], bounds=(-3.0, 3.0), method="bounded").x if lc.std() > 0 else 0.0
        return [float(v) for v in solve(e)[0]], float(e)

    def predict_parts(self, meta: dict, device: dict, calls: dict[str, float] | None = None,
                      host: dict | None = None) -> dict:
        """Predicted wall seconds of one step on `device` emulated on `host` (default: the machine the
        model was fitted on), with its kernels and overhead separately."""
        import xgboost as xgb

        calls = dict(meta["calls"]) if calls is None else calls
        host = host or self.host
        syms, X = rows_for_model(meta, calls, device, host)
        X = self._withheld(X)
        margin = prior_margin(X) + host_log(host) + kernel_device_rows(device, X) @ np.array(self.device)
        per_call = np.exp(self.booster.predict(xgb.DMatrix(X, base_margin=margin, feature_names=FEATURES)))
        kernels_cpu = per_call * np.array([calls[s] for s in syms])
        kernels = float(kernels_cpu.sum())
        unit = math.exp(host_log(host))
        overhead_cpu = max(0.0, float(np.dot(self.overhead, overhead_row(meta, calls) + [kernels / unit]))) \
            * unit * float(device["cpus"]) ** self.overhead_cpus
        factor = math.exp(wall_log(device, self.wall)) / norm(device)
        return {"step_s": (kernels + overhead_cpu) * factor,
                "kernels_s": kernels * factor, "overhead_s": overhead_cpu * factor,
                "kernel_s": {s: float(t) * factor for s, t in zip(syms, kernels_cpu)},
                "per_call_cpu_s": {s: float(t) for s, t in zip(syms, per_call)}}

    def predict_step(self, meta: dict, device: dict, calls: dict[str, float] | None = None,
                     host: dict | None = None) -> float:
        """Predicted wall seconds of one training step of the compiled model `meta` on `device`."""
        return self.predict_parts(meta, device, calls, host)["step_s"]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(path / "latte.xgb.json"))
        (path / "features.json").write_text(json.dumps({"version": VERSION, "features": FEATURES,
                                                        "overhead": dict(zip(OVERHEAD, self.overhead)),
                                                        "wall": self.wall, "device": self.device,
                                                        "overhead_cpus": self.overhead_cpus,
                                                        "host": self.host, "drop": list(self.drop)}))

    @classmethod
    def load(cls, path: str | Path) -> "LatteModel":
        import xgboost as xgb

        from edgetvm.errors import UserError

        path = Path(path)
        f = path / "latte.xgb.json"
        if not f.exists():
            raise UserError(f"{path} holds no fitted LATTE model; run `edgetvm latte fit` first")
        saved = json.loads((path / "features.json").read_text())
        if saved.get("version") != VERSION or saved.get("features") != FEATURES:
            raise UserError(f"{path} was fitted by another version of the model; refit with `edgetvm latte fit`")
        b = xgb.Booster()
        b.load_model(str(f))
        return cls(b, [saved["overhead"][k] for k in OVERHEAD], saved["wall"], saved["device"],
                   saved["overhead_cpus"], saved.get("host"), tuple(saved.get("drop", ())))


class FlopsBaseline:
    """The FLOPs-coefficient model: step time = a * training FLOPs / nominal GFLOP/s + b (least squares on
    relative error)."""

    def fit(self, measurements: list[dict], metas: dict[str, dict]) -> "FlopsBaseline":
        x = np.array([self._x(metas[m["dir"]], m["device"]) for m in measurements])
        y = np.array([m["step_s"] for m in measurements])
        A = np.stack([x, np.ones_like(x)], 1)
        # weighted by 1/time: least relative error, the quantity MAPE scores (a fair baseline)
        self.a, self.b = np.linalg.lstsq(A / y[:, None], np.ones_like(y), rcond=None)[0]
        return self

    @staticmethod
    def _x(meta: dict, device: dict) -> float:
        # forward + backward ~ 3x forward FLOPs
        return 3.0 * meta["flops_per_sample"] * meta["batch"] / (device["nominal_gflops"] * 1e9)

    def predict_step(self, meta: dict, device: dict) -> float:
        return float(max(self.a * self._x(meta, device) + self.b, 1e-6))


def errors(pred: list[float], true: list[float]) -> dict:
    p, t = np.asarray(pred), np.asarray(true)
    ape = np.abs(p - t) / t
    return {"n": int(len(t)), "mape": float(ape.mean() * 100) if len(t) else float("nan"),
            "within10": float((ape <= 0.10).mean() * 100) if len(t) else float("nan")}
