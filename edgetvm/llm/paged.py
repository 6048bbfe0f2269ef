"""Peer for the benchmark: the same model on TVM's own PagedKVCache (TIR kernels, CPU), with
its built-in sliding window + attention sinks. Built with tvm.relax.frontend.nn; the dense
parts go through the same edgetvm CPU pipeline as our decoder.

TVM's kernels rotate halves (pairs i, i + d/2), so the Q/K weights are un-permuted back from
llama.cpp's adjacent-pair layout.
"""

from __future__ import annotations

import time

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from edgetvm.errors import UserError
from edgetvm.llm import kernels
from edgetvm.llm.gguf_model import load_tokenizer, load_weights
from edgetvm.runtime.tensors import to_tvm


def _unpermute(w, n_heads, head_dim):
    """Rows of a Q/K weight from adjacent pairs (2i, 2i+1) to halves (i, i + d/2), per head."""
    w = w.reshape(n_heads, head_dim // 2, 2, -1)
    return w.transpose(0, 2, 1, 3).reshape(n_heads * head_dim, -1)


class _Layer(nn.Module):
    def __init__(self, cfg, layer_id):
        d, F = cfg.d_model, cfg.d_ff
        self.cfg, self.layer_id = cfg, layer_id
        self.attn_norm = nn.RMSNorm(d, -1, cfg.eps, bias=False)
        self.qkv = nn.Linear(d, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, d, bias=False)
        self.ffn_norm = nn.RMSNorm(d, -1, cfg.eps, bias=False)
        self.gate_up = nn.Linear(d, 2 * F, bias=False)
        self.down = nn.Linear(F, d, bias=False)

    def forward(self, x, cache: PagedKVCache):
        c = self.cfg
        b, s, _ = x.shape
        qkv = nn.op.reshape(self.qkv(self.attn_norm(x)), (b, s, c.n_heads + 2 * c.n_kv_heads, c.head_dim))
        a = cache.attention_with_fused_qkv(self.layer_id, qkv, c.n_heads, sm_scale=c.head_dim ** -0.5)
        x = x + self.o(nn.op.reshape(a, (b, s, c.n_heads * c.head_dim)))
        gu = self.gate_up(self.ffn_norm(x))
        g, u = nn.op.split(gu, 2, axis=-1)
        return x + self.down(nn.op.silu(g) * u)


class _Llama(nn.Module):
    def __init__(self, cfg):
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.layers = nn.ModuleList([_Layer(cfg, i) for i in range(cfg.n_layers)])
        self.norm = nn.RMSNorm(cfg.d_model, -1, cfg.eps, bias=False)
        self.head = nn.Parameter((cfg.d_model, cfg.vocab), "float32")  # tied, stored transposed

    def forward(self, ids, cache: PagedKVCache):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cache)
        x = self.norm(x)
        return nn.op.matmul(x, self.head), cache

    def create_kv(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var, prefill_chunk_size: tirx.Var,
                  page_size: tirx.Var, support_sliding_window: tirx.Var) -> PagedKVCache:
        c = self.cfg
        return TIRPagedKVCache(
            attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size, page_size=page_size,
            support_sliding_window=support_sliding_window, layer_partition=relax.ShapeExpr([0, c.n_layers]),
            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
            qk_head_dim=c.head_dim, v_head_dim=c.head_dim, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=c.rope_base, rope_scaling={},
            rope_ext_factors=relax.prim_value(0), rotary_dim=c.head_dim, enable_disaggregation=False,
            dtype="float32", target=tvm.target.Target.current())


class PagedModel:
    """f(ids chunk) -> logits, over TVM's PagedKVCache with an optional sliding window + sinks."""

    def __init__(self, name="smollm2-135m", target=None):
        from edgetvm.passes import pipeline

        self.cfg, w = load_weights(name)
        if self.cfg.rope_scaled:   # TVM's paged KV cache computes its own RoPE from the base alone
            raise UserError(f"{name}: the paged KV cache runtime does not apply RoPE scaling; run without it")
        self.tokenizer = load_tokenizer(name)
        cfg = self.cfg
        target = target or kernels.cpu_target()
        model = _Llama(cfg)
        spec = {
            "forward": {"ids": nn.spec.Tensor([1, "n"], "int32"), "cache": nn.spec.Object(object_type=PagedKVCache),
                        "$": {"param_mode": "packed", "effect_mode": "none"}},
            "create_kv": {"max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                          "page_size": int, "support_sliding_window": int,
                          "$": {"param_mode": "none", "effect_mode": "none"}},
        }
        t0 = time.perf_counter()
        with target:
            mod, params = model.export_tvm(spec=spec)
        self.ex = pipeline.finish(pipeline.fuse(mod, target), target)
        self.compile_s = time.perf_counter() - t0
        self.vm = relax.VirtualMachine(self.ex, tvm.cpu())
        src = {"embed.weight": w["token_embd.weight"]}
        for l in range(cfg.n_layers):
            p = f"blk.{l}."
            q = _unpermute(w[p + "attn_q.weight"], cfg.n_heads, cfg.head_dim)
            k = _unpermute(w[p + "attn_k.weight"], cfg.n_kv_heads, cfg.head_dim)
            src[f"layers.{l}.attn_norm.weight"] = w[p + "attn_norm.weight"]
            src[f"layers.{l}.qkv.weight"] = np.concatenate([q, k, w[p + "attn_v.weight"]], 0)
            src[f"layers.{l}.o.weight"] = w[p + "attn_output.weight"]
            src[f"layers.{l}.ffn_norm.weight"] = w[p + "ffn_norm.weight"]
            src[f"layers.{l}.gate_up.weight"] = np.concatenate([w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"]], 0)
            src[f"layers.{l}.down.weight"] = w[p + "ffn_down.weight"]
        src["norm.weight"] = w["output_norm.weight"]
        src["head"] = w["token_embd.weight"].T
        self.params = [to_tvm(np.asarray(src[n], np.float32)) for n, _ in params]
        self._fwd = self.vm["forward"]
        self._begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        self._end = tvm.get_global_func("vm.builtin.kv_state_end_forward")

    def new_cache(self, max_len: int, window: int = 0, sinks: int = 0, page_size: int = 16, chunk: int = 64):
        S = lambda v: tvm.runtime.ShapeTuple([int(v)])
        cache = self.vm["create_kv"](S(1), S(max_len), S(chunk), S(page_size), S(1 if window else 0))
        tvm.get_global_func("vm.builtin.kv_state_add_sequence")(cache, 0)
        if window:
            tvm.get_global_func("vm.builtin.attention_kv_cache_enable_sliding_window_for_seq")(cache, 0, window, sinks)
        return cache

    def forward(self, cache, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int32)[None, :]
        self._begin(cache, tvm.runtime.ShapeTuple([0]), tvm.runtime.ShapeTuple([ids.shape[1]]))
        out = self._fwd(tvm.runtime.tensor(ids), cache, self.params)
        self._end(cache)
        return out[0].numpy()[0]
