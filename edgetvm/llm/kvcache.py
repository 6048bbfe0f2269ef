"""Fixed-capacity KV cache slots and eviction policies.

A policy manages the slots of ONE layer's cache: which slot a new token goes to (evicting a
victim when the cache is full), which RoPE position each slot's key is rotated with, and the
attention statistics it scores slots by. Keys are stored un-rotated; the attention kernel
rotates them with `rope_positions()`, so StreamingLLM can re-assign positions within the cache.

Policies (budget = capacity in tokens, including the token being decoded):
  full       no eviction; a token past capacity is an error.
  window     keep the `budget` most recent tokens.
  streaming  StreamingLLM: `sinks` first tokens + the most recent ones; RoPE positions are the
             ranks within the cache (0..n-1), not the original positions.
  h2o        Heavy-Hitter Oracle: a recent window of `recent` tokens (default budget/2) is kept;
             outside it, evict the token with the least attention accumulated (summed over
             heads and over all queries since it entered).
  tova       Token Omission Via Attention: evict the token with the least attention from the
             latest query (averaged over heads).
H2O and TOVA decide per layer (scores come from that layer's attention; one slot set per layer
shared by its KV heads). The victim for step t is chosen from the weights observed at step t-1,
so the cache never holds more than `budget` tokens.
"""

from __future__ import annotations

import numpy as np

from edgetvm.errors import UserError

POLICIES = ("full", "window", "streaming", "h2o", "tova")
KV_DTYPES = ("float32", "float16")
# A board library's default cache. fp16 halves it, but rounding to fp16 turns the last-bit
# differences between two CPUs' float32 (reduction orders, fused multiply-adds) into ~1e-4 relative
# in perplexity (SmolLM2 q4, 11 tokens, emulated aarch64 vs x86-64: 229.194 vs 229.214); fp32 keeps
# it at ~2e-6 (228.9900 vs 228.9894).
DEFAULT_KV_DTYPE = "float32"


class Policy:
    name = "base"

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.n_valid = 0
        self.pos = np.full(self.capacity, -1, dtype=np.int64)  # original position per slot

    def victim(self) -> int:
        raise NotImplementedError

    def slot_for(self, position: int) -> int:
        """The slot the token at `position` is written to (evicting a victim if full)."""
        if self.n_valid < self.capacity:
            slot = self.n_valid
            self.n_valid += 1
        else:
            slot = self.victim()
        self.pos[slot] = position
        self._reset(slot)
        return slot

    def _reset(self, slot: int) -> None:
        pass

    def observe(self, probs: np.ndarray) -> None:
        """probs [n_queries, heads, capacity]: softmax weights of the latest attention call."""

    def rope_positions(self) -> np.ndarray:
        """RoPE position per slot (int32 [capacity]); invalid slots are 0."""
        out = np.zeros(self.capacity, dtype=np.int32)
        out[: self.n_valid] = self.pos[: self.n_valid]
        return out

    def kept_positions(self) -> list[int]:
        return sorted(int(p) for p in self.pos[: self.n_valid])


class Full(Policy):
    name = "full"

    def victim(self) -> int:
        raise UserError(f"the full KV cache holds {self.capacity} tokens and the text is longer; "
                        "raise --kv-budget or pick an evicting --kv-policy")


class Window(Policy):
    name = "window"

    def victim(self) -> int:
        return int(np.argmin(self.pos[: self.n_valid]))


class Streaming(Policy):
    name = "streaming"

    def __init__(self, capacity: int, sinks: int = 4):
        super().__init__(capacity)
        self.sinks = int(sinks)

    def victim(self) -> int:
        p = np.where(self.pos[: self.n_valid] < self.sinks, np.iinfo(np.int64).max, self.pos[: self.n_valid])
        return int(np.argmin(p))

    def rope_positions(self) -> np.ndarray:
        out = np.zeros(self.capacity, dtype=np.int32)
        order = np.argsort(self.pos[: self.n_valid], kind="stable")
        out[order] = np.arange(self.n_valid, dtype=np.int32)
        return out


class H2O(Policy):
    name = "h2o"

    def __init__(self, capacity: int, recent: int | None = None):
        super().__init__(capacity)
        self.recent = max(1, capacity // 2) if recent is None else int(recent)
        self.score = np.zeros(self.capacity, dtype=np.float64)

    def _reset(self, slot):
        self.score[slot] = 0.0

    def observe(self, probs):
        self.score[: probs.shape[-1]] += probs.sum(axis=(0, 1))

    def victim(self) -> int:
        n = self.n_valid
        pos = self.pos[:n]
        cutoff = np.sort(pos)[n - self.recent] if self.recent < n else -1  # recent window: pos >= cutoff
        s = np.where(pos >= cutoff if cutoff >= 0 else np.zeros(n, bool), np.inf, self.score[:n])
        return int(np.argmin(s))


class TOVA(Policy):
    name = "tova"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.score = np.zeros(self.capacity, dtype=np.float64)

    def _reset(self, slot):
        self.score[slot] = np.inf  # a token not yet attended to is never the victim

    def observe(self, probs):
        self.score[: probs.shape[-1]] = probs[-1].mean(axis=0)
        self.score[self.n_valid:] = np.inf

    def victim(self) -> int:
        return int(np.argmin(self.score[: self.n_valid]))


def make_policy(name: str, budget: int, sinks: int = 4, recent: int | None = None) -> Policy:
    """A policy of capacity `budget`; UserError on an unknown name or a budget too small."""
    if name not in POLICIES:
        raise UserError(f"unknown KV policy '{name}'; use --kv-policy one of: {', '.join(POLICIES)}")
    if name == "streaming" and budget < sinks + 1:
        raise UserError(f"--kv-budget {budget} is smaller than sinks + 1 = {sinks + 1}; "
                        f"use --kv-budget {sinks + 1} or more")
    if budget < 2:
        raise UserError(f"--kv-budget {budget} is too small; use --kv-budget 2 or more")
    if name == "h2o" and recent is not None and not 0 < recent < budget:
        raise UserError(f"H2O recent window {recent} must be between 1 and the budget {budget} - 1")
    return {"full": lambda: Full(budget), "window": lambda: Window(budget),
            "streaming": lambda: Streaming(budget, sinks), "h2o": lambda: H2O(budget, recent),
            "tova": lambda: TOVA(budget)}[name]()
