"""Small LLMs on edge CPUs: a GGUF loader, a numpy reference, a TVM-compiled decoder and a
fixed-capacity KV cache with eviction policies (full, window, StreamingLLM, H2O, TOVA).

Modules: `gguf_model` (any llama/qwen2 GGUF: config, weights + tokenizer from the metadata),
`quant` (kernel formats; the file's blocks repacked exactly), `requant` (requantized test copies), `reference` (numpy forward, ground truth),
`kernels` (TIR attention kernels + numpy attention reference), `kvcache` (policies),
`runtime` (compiled decoder, generate, perplexity), `cli` (`generate`, `ppl`, `compile-llm`).
On boards: `library` (the whole decoder as one cross-compiled library, state on the device),
`kvdevice` (the policies as TIR kernels), `board` (artifacts; driving a board over TVM RPC),
`memory` (--memory-budget plans; layer weights streamed through runtime/swap.py).
"""
