"""Small LLMs on edge CPUs: a GGUF loader, a numpy reference, a TVM-compiled decoder and a
fixed-capacity KV cache with eviction policies (full, window, StreamingLLM, H2O, TOVA).

Modules: `gguf_model` (weights + tokenizer), `reference` (numpy forward, ground truth),
`kernels` (TIR attention kernels + numpy attention reference), `kvcache` (policies),
`runtime` (compiled decoder, generate, perplexity), `cli` (`generate`, `ppl`).
"""
