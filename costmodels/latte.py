"""LATTE-style training-time cost model: per-kernel, algorithm-aware features + device figures -> XGBoost.

Every TVM kernel of a training step (forward, backward and SGD kernels of every layer, plus the VM
builtins) is one row: what it computes (main operator, how many ops were fused into it), its size
(FLOPs, bytes in and out), the loop structure of the TIR schedule TVM produced for it (loops,
nesting depth, blocks, spatial and reduction extents, parallel/vectorised loops), how often a step
calls it, and the device's figures (CPU quota, cpuset size, nominal GFLOP/s and bandwidth). The
regressor predicts log(time x device speed); a step's time is the sum over its kernels.

Measured per-kernel times come from `vm.set_instrument`, whose callbacks add a fixed cost to every
call; `kernel_targets` removes that cost (calibrated per measurement run) and rescales the kernels
so they sum to the uninstrumented step time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

KINDS = ["matmul", "conv2d", "conv2d_transpose", "max_pool2d", "max_pool2d_backward", "relu", "add",
         "multiply", "subtract", "transpose", "reshape", "collapse_sum", "sum", "log_softmax",
         "nll_loss_without_weight", "te", "tir_exp", "where", "less", "builtin", "other"]
STATIC = ["n_fused", "flops", "bytes", "out_bytes", "n_args", "n_loops", "loop_depth", "n_blocks",
          "spatial_extent", "reduce_extent", "max_extent", "n_parallel", "n_vectorized"]
LOGGED = {"flops", "bytes", "out_bytes", "spatial_extent", "reduce_extent", "max_extent"}
DEVICE = ["speed", "cpus", "nominal_gflops", "mem_bandwidth_gbs"]
FEATURES = [f"kind_{k}" for k in KINDS] + STATIC + ["calls", "builtin_alloc", "builtin_other",
                                                     "step_log_flops", "step_log_bytes", "step_calls",
                                                     "log_speed", "cpus", "log_gflops", "log_bw"]


def _kernel_row(static: dict | None, symbol: str, calls: float, device: dict, context: list[float]) -> list[float]:
    kind = (static or {}).get("kind", "builtin" if symbol.startswith("vm.builtin") else "other")
    kind = kind if kind in KINDS else "other"
    row = [1.0 if kind == k else 0.0 for k in KINDS]
    for f in STATIC:
        v = float((static or {}).get(f, 0.0))
        row.append(math.log1p(v) if f in LOGGED else v)
    row += [calls, float("alloc" in symbol), float(symbol.startswith("vm.builtin") and "alloc" not in symbol)]
    row += context
    speed = min(device["cpu_quota"], device["cpus"])
    row += [math.log(speed), float(device["cpus"]), math.log(device["nominal_gflops"]),
            math.log(device["mem_bandwidth_gbs"])]
    return row


def kernel_targets(result: dict, overhead_per_call: float) -> dict[str, float]:
    """Per-kernel seconds per step, instrument overhead removed, summing to the measured step time."""
    raw = {s: max(k["time_s"] - k["calls"] * overhead_per_call, 1e-9) for s, k in result["kernels"].items()}
    total = sum(raw.values())
    return {s: v * result["step_s"] / total for s, v in raw.items()}


def calibrate_overhead(results: list[dict]) -> float:
    """Instrument cost per call: the smallest (instrumented kernel sum - step time) / calls over a run."""
    c = []
    for r in results:
        calls = sum(k["calls"] for k in r["kernels"].values())
        ksum = sum(k["time_s"] for k in r["kernels"].values())
        c.append(max(0.0, (ksum - r["step_s"]) / calls))
    return min(c) if c else 0.0


def rows_for_model(meta: dict, calls: dict[str, float], device: dict) -> tuple[list[str], np.ndarray]:
    """Feature rows for one compiled step on one device; `calls` maps kernel symbol -> calls per step."""
    syms = sorted(calls)
    ks = meta["kernels"]
    # the step around the kernel: a kernel of a tiny step runs with a warm cache and amid VM overhead
    context = [math.log1p(sum(ks[s]["flops"] * calls[s] for s in syms if s in ks)),
               math.log1p(sum(ks[s]["bytes"] * calls[s] for s in syms if s in ks)),
               float(sum(calls.values()))]
    X = np.array([_kernel_row(ks.get(s), s, calls[s], device, context) for s in syms], dtype=np.float64)
    return syms, X


class LatteModel:
    """XGBoost regressor of per-kernel time; `predict_step` sums a step's kernels."""

    def __init__(self, booster=None, call_templates: dict | None = None):
        self.booster = booster
        # builtins a step calls, by kernel-set signature: taken from measurements of any device
        self.call_templates = call_templates or {}

    @staticmethod
    def dataset(measurements: list[dict], metas: dict[str, dict]):
        """(X, y, group) with one row per kernel; group = index of the (device, model) measurement."""
        Xs, ys, groups = [], [], []
        for gi, m in enumerate(measurements):
            targets = m["kernel_s"]
            calls = {s: k["calls"] for s, k in m["kernels"].items()}
            syms, X = rows_for_model(metas[m["dir"]], calls, m["device"])
            speed = min(m["device"]["cpu_quota"], m["device"]["cpus"])
            Xs.append(X)
            ys.append(np.log(np.array([targets[s] for s in syms]) * speed))
            groups += [gi] * len(syms)
        return np.vstack(Xs), np.concatenate(ys), np.array(groups)

    def fit(self, measurements: list[dict], metas: dict[str, dict], seed: int = 0) -> "LatteModel":
        import xgboost as xgb

        X, y, _ = self.dataset(measurements, metas)
        dtrain = xgb.DMatrix(X, label=y, feature_names=FEATURES)
        params = {"max_depth": 10, "eta": 0.08, "subsample": 0.9, "colsample_bytree": 0.9,
                  "min_child_weight": 1, "objective": "reg:squarederror", "seed": seed, "nthread": 2}
        self.booster = xgb.train(params, dtrain, num_boost_round=1000)
        for m in measurements:
            self.call_templates.setdefault(m["dir"], {s: k["calls"] for s, k in m["kernels"].items()})
        return self

    def predict_step(self, meta: dict, device: dict, calls: dict[str, float] | None = None) -> float:
        """Predicted seconds of one training step of the compiled model `meta` on `device`."""
        import xgboost as xgb

        if calls is None:
            calls = default_calls(meta)
        syms, X = rows_for_model(meta, calls, device)
        speed = min(device["cpu_quota"], device["cpus"])
        pred = np.exp(self.booster.predict(xgb.DMatrix(X, feature_names=FEATURES))) / speed
        return float(pred.sum())

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(path / "latte.xgb.json"))
        (path / "features.json").write_text(json.dumps({"features": FEATURES}))

    @classmethod
    def load(cls, path: str | Path) -> "LatteModel":
        import xgboost as xgb

        from edgetvm.errors import UserError

        path = Path(path)
        f = path / "latte.xgb.json"
        if not f.exists():
            raise UserError(f"{path} holds no fitted LATTE model; run `edgetvm latte fit` first")
        saved = json.loads((path / "features.json").read_text())["features"]
        if saved != FEATURES:
            raise UserError(f"{path} was fitted with other features; refit with `edgetvm latte fit`")
        b = xgb.Booster()
        b.load_model(str(f))
        return cls(b)


def default_calls(meta: dict) -> dict[str, float]:
    """Calls per step of every kernel and VM builtin, counted once at compile time (training.count_calls)."""
    return dict(meta["calls"])


class FlopsBaseline:
    """The FLOPs-coefficient model: step time = a * training FLOPs / nominal GFLOP/s + b (least squares)."""

    def fit(self, measurements: list[dict], metas: dict[str, dict]) -> "FlopsBaseline":
        x = np.array([self._x(metas[m["dir"]], m["device"]) for m in measurements])
        y = np.array([m["step_s"] for m in measurements])
        A = np.stack([x, np.ones_like(x)], 1)
        self.a, self.b = np.linalg.lstsq(A, y, rcond=None)[0]
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
