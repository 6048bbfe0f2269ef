"""A memory budget for a whole LLM run: weights + KV cache + activations + scratch.

The plan keeps the head group (final norm, the tied head that also serves the embedding, the
RoPE tables) resident: every token reads all of it. The layers' weights are resident too when
they fit; otherwise they stream through the swap runtime (runtime/swap.py): each layer's range of
the weight file is mapped before its call and dropped after it (page cache included), the next
one prefetched by a thread while a layer computes, if two fit. What is left of the budget goes
to the KV cache (`library.state_bytes`: keys, values, rotated keys and the policies' state),
whose capacity in tokens the plan picks unless --kv-budget is given.

Activations are estimated from the functions' shapes for a step of n tokens (prefill chunks are
shrunk to fit) and the runtime's own reserve (swap.RUNTIME_RESERVE, measured there) is set aside.
As for `edgetvm compile --memory-budget`, the budget counts what the model holds above the
runtime loaded and idle: Python, TVM and the library itself are not in it.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import tvm

from edgetvm.errors import UserError
from edgetvm.llm import kernels, library
from edgetvm.llm.board import BoardModel, BoardSession

MIB = 1 << 20
MIN_KV_TOKENS = 16  # the smallest cache a plan offers: a short prompt and a few tokens


def act_bytes(cfg, n: int, cap: int, logit_rows: int) -> int:
    """Live tensors of one step of n tokens at capacity cap, besides weights and state (fp32): the
    residual and its normalised copy, the QKV projection, queries/keys/values, attention output and
    weights, the MLP's gate/up and product; then the logits of `logit_rows` rows."""
    d, H, KH, D, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab
    per_token = 4 * (3 * d + 2 * (H + 2 * KH) * D + 2 * H * D + H * kernels.padded(cap) + 3 * F)
    return n * per_token + 4 * V * (logit_rows + 1)


@dataclasses.dataclass
class Plan:
    budget: int
    head_bytes: int
    layer_bytes: int
    n_layers: int
    stream: bool
    prefetch: bool
    kv_tokens: int
    chunk: int
    act: int
    reserve: int
    cfg: object = dataclasses.field(repr=False, default=None)
    kvd: str = library.DEFAULT_KV_DTYPE

    @property
    def resident_weights(self) -> int:
        if not self.stream:
            return self.head_bytes + self.n_layers * self.layer_bytes
        return self.head_bytes + (2 if self.prefetch else 1) * self.layer_bytes

    def state(self, tokens: int | None = None) -> int:
        return library.state_bytes(self.cfg, self.kvd, tokens or self.kv_tokens)

    @property
    def planned_peak(self) -> int:
        return self.resident_weights + self.state() + self.act + self.reserve

    def check_kv(self, tokens: int) -> None:
        """A --kv-budget that the plan cannot hold is refused with the most it can."""
        if tokens > self.kv_tokens and self.state(tokens) + self.resident_weights + self.act + self.reserve > self.budget:
            raise UserError(f"--kv-budget {tokens} does not fit in --memory-budget {self.budget / MIB:.1f} MiB with "
                            f"{'streamed' if self.stream else 'resident'} weights: it holds at most {self.kv_tokens} "
                            f"tokens; lower --kv-budget or raise --memory-budget")
        self.kv_tokens = tokens

    def describe(self) -> str:
        w = (f"weights resident {self.resident_weights / MIB:.1f} MiB" if not self.stream else
             f"head {self.head_bytes / MIB:.1f} MiB resident, layers streamed {self.layer_bytes / MIB:.2f} MiB each"
             f" ({'next one prefetched' if self.prefetch else 'one at a time'})")
        return (f"{w}; KV cache {self.kv_tokens} tokens {self.state() / MIB:.1f} MiB; activations "
                f"{self.act / MIB:.1f} MiB (prefill chunks of {self.chunk}); reserve {self.reserve / MIB:.1f} MiB")


def sizes(index: list, layout) -> tuple[int, int]:
    """(head group bytes, largest layer's bytes) of an artifact's weights."""
    nb = [w["nbytes"] for w in index]
    head = sum(nb[:layout.n_head])
    layer = max(sum(nb[layout.n_head + l * layout.n_layer: layout.n_head + (l + 1) * layout.n_layer])
                for l in range(layout.n_layers))
    return head, layer


def plan(cfg, kvd: str, group_sizes: tuple[int, int], budget: int, board=None, kv_tokens: int | None = None,
         logits: bool = False) -> Plan:
    """The plan for `budget` bytes, or a UserError naming the smallest budget any plan needs."""
    from edgetvm.passes.swap import RUNTIME_RESERVE

    head, layer = group_sizes
    base = dict(budget=budget, head_bytes=head, layer_bytes=layer, n_layers=cfg.n_layers, reserve=RUNTIME_RESERVE,
                cfg=cfg, kvd=kvd)
    want = kv_tokens or MIN_KV_TOKENS
    if board is not None and budget > board.memory_bytes:
        raise UserError(f"--memory-budget {budget / MIB:.1f} MiB is more than board '{board.name}' has "
                        f"({board.memory_mib} MiB); lower it")
    for stream, prefetch in ((False, False), (True, True), (True, False)):
        for chunk in (64, 16, 4, 1):
            p = Plan(stream=stream, prefetch=prefetch, kv_tokens=want, chunk=chunk, act=0, **base)
            p.act = act_bytes(cfg, chunk, want, chunk if logits else 1)
            if p.planned_peak > budget:
                continue
            if kv_tokens is None:  # the largest cache that fits (activations grow with it too)
                lo, hi = want, cfg.max_pos
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    p.kv_tokens, p.act = mid, act_bytes(cfg, chunk, mid, chunk if logits else 1)
                    lo, hi = (mid, hi) if p.planned_peak <= budget else (lo, mid - 1)
                p.kv_tokens, p.act = lo, act_bytes(cfg, chunk, lo, chunk if logits else 1)
            return p
    smallest = Plan(stream=True, prefetch=False, kv_tokens=want, chunk=1, act=act_bytes(cfg, 1, want, 1), **base)
    raise UserError(f"--memory-budget {budget / MIB:.1f} MiB cannot hold even the smallest plan: it needs at least "
                    f"{smallest.planned_peak / MIB:.1f} MiB (head {head / MIB:.1f} MiB, one layer {layer / MIB:.2f} MiB, "
                    f"KV cache for {want} tokens {smallest.state() / MIB:.2f} MiB, activations "
                    f"{smallest.act / MIB:.2f} MiB, reserve {smallest.reserve / MIB:.1f} MiB)")


def check_board_fits(cfg, fmt, kvd: str, board) -> None:
    """A board whose memory cannot hold the smallest plan is refused before anything is built or sent."""
    try:
        plan(cfg, kvd, library.group_bytes(cfg, fmt), board.memory_bytes)
    except UserError as e:
        need = str(e).split("it needs at least ", 1)[-1]
        raise UserError(f"board '{board.name}' has {board.memory_mib} MiB of memory and cannot hold even the "
                        f"smallest plan for the model with {fmt if isinstance(fmt, str) else '/'.join(sorted(set(fmt.values())))} "
                        f"weights: it needs at least {need}") from None


def budgeted_model(art, remote, where, board, budget: int, args):
    cfg_ = art.manifest["llm"]
    from edgetvm.llm.gguf_model import Config

    cfg = Config(**cfg_["config"])
    layout = library.Layout(cfg_["head_tensors"], cfg_["layer_tensors"], cfg.n_layers)
    p = plan(cfg, cfg_["kv_dtype"], sizes(art.manifest["weights"], layout), budget, board, args.kv_budget,
             logits=hasattr(args, "file"))
    if p.stream and remote is not None:
        raise UserError(f"--memory-budget {budget / MIB:.1f} MiB cannot hold the {art.manifest['weight_bytes'] / MIB:.1f} "
                        f"MiB of weights, and streaming them runs where the weight file is: copy {art.path} to the "
                        f"board and run `edgetvm generate --artifact` there (over RPC each layer would cross the network "
                        f"every token)")
    if not p.stream:
        return BudgetedModel(art, remote, where, p), where, p
    return StreamingModel(art, p), where, p


class BudgetedModel(BoardModel):
    """All weights resident; the plan fixes the KV capacity and the prefill chunk."""

    def __init__(self, art, remote, where, p: Plan):
        from edgetvm.runtime.swap import reset_hwm

        self.plan = p
        super().__init__(art, remote, where)
        if remote is None:
            reset_hwm()

    def session(self, policy="full", budget=256, sinks=4, recent=None, **_):
        s = super().session(policy, budget, sinks, recent)
        s.chunk = self.plan.chunk
        return s


class StreamingModel(BoardModel):
    """Layer weights streamed through the swap runtime: mapped per layer per step, then dropped."""

    def __init__(self, art, p: Plan):
        from edgetvm.runtime.artifact import Artifact
        from edgetvm.runtime.swap import SwapRunner, reset_hwm

        self.plan = p
        lay = library.Layout(art.manifest["llm"]["head_tensors"], art.manifest["llm"]["layer_tensors"],
                             art.manifest["llm"]["config"]["n_layers"])
        index = art.manifest["weights"]
        blocks = []
        for l in range(lay.n_layers):
            ids = list(range(lay.n_head + l * lay.n_layer, lay.n_head + (l + 1) * lay.n_layer))
            lo, hi = index[ids[0]]["offset"], index[ids[-1]]["offset"] + index[ids[-1]]["nbytes"]
            blocks.append({"function": "layer1", "inputs": [], "outputs": [], "weights": ids, "range": [lo, hi - lo],
                           "weight_bytes": hi - lo, "act_bytes": p.act, "planned_bytes": p.planned_peak})
        swap_plan = {"budget": p.budget, "prefetch": p.prefetch, "predicted_peak": p.planned_peak,
                     "reserve": p.reserve, "data_inputs": [], "outputs": [], "blocks": blocks}
        # The swap runtime maps, prefetches and drops the blocks; this class calls them per step.
        self.swap = SwapRunner(Artifact(art.path, {**art.manifest, "swap": swap_plan}), prefetch=p.prefetch)
        weights = [tvm.runtime.from_dlpack(w) for w in art.weights()[:lay.n_head]]
        super().__init__(art, None, "this machine", weights=[weights])
        self.vm = self.swap.vm  # the naive allocator: each call's activations are freed when it returns
        self.hw = tvm.runtime.convert(weights)
        self.lw = [tvm.runtime.convert(ws) for ws in self.swap.block_weights]
        self.blocks = blocks
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="llm-prefetch") if p.prefetch else None
        reset_hwm()

    def session(self, policy="full", budget=256, sinks=4, recent=None, **_):
        return StreamingSession(self, policy, budget, sinks, recent)

    def layers(self, x, S, ctl, n: int):
        """x through every layer, each layer's weights mapped only around its call."""
        sw, blocks = self.swap, self.blocks
        fn = self.vm["layer1" if n == 1 else "layer"]
        cos, sin = self.hw[len(self.hw) - 2], self.hw[len(self.hw) - 1]
        pending = self.pool.submit(sw._swap, None, blocks[0]) if self.pool else None
        stale = None
        for l, b in enumerate(blocks):
            if pending is not None:
                pending.result()
            else:
                sw._touch(b)
            if self.pool and l + 1 < len(blocks):
                pending, stale = self.pool.submit(sw._swap, stale, blocks[l + 1]), None
            else:
                pending = None
                if stale is not None:
                    sw._release(stale)
                    stale = None
            x = fn(x, self.lw[l], S[l + 1], ctl, cos, sin)[0]
            if self.pool:
                stale = b
            else:
                sw._release(b)
        if pending is not None:
            pending.result()
        if stale is not None:
            sw._release(stale)
        return x


class StreamingSession(BoardSession):
    def __init__(self, model: StreamingModel, *a):
        super().__init__(model, *a)
        self.chunk = model.plan.chunk

    def _call(self, kind: str, ids):
        m = self.model
        t = self._ids(ids)
        n = int(t.shape[0]) - (1 if kind == "nll" else 0)
        ctl = self.S[0]
        # nll feeds all but the last id (the last one is only a target)
        x = m.vm["embed"](t if kind != "nll" else self._ids(list(ids)[:-1]), m.hw)
        x = m.layers(x, self.S, ctl, n)
        if kind == "nll":
            return m.vm["nll_head"](x, t, ctl, m.hw)
        if kind == "logits":
            raise UserError("logits are not offered by a streaming run")
        return m.vm["greedy"](x, t, ctl, m.hw)


def report(model, p: Plan | None, kv_tokens: int) -> None:
    from edgetvm.runtime.swap import vm_hwm_bytes

    print("memory report:")
    if p is not None:
        print(f"  plan for --memory-budget {p.budget / MIB:.1f} MiB: {p.describe()}")
        print(f"  planned peak {p.planned_peak / MIB:.1f} MiB (model data, above the runtime itself)")
    else:
        st = library.state_bytes(model.cfg, model.kv_dtype, kv_tokens)
        print(f"  weights {model.weight_bytes / MIB:.1f} MiB resident, KV cache {kv_tokens} tokens {st / MIB:.1f} MiB "
              f"(no --memory-budget: no plan)")
    if model.remote is not None:
        print(f"  measured peak: only for runs on this machine (this one ran on {model.where}); "
              f"{model.bytes_sent / MIB:.1f} MiB sent to the board")
        return
    print(f"  measured peak resident set (VmHWM) of this process: {vm_hwm_bytes() / MIB:.1f} MiB (runtime included)")
