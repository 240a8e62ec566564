from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineConfig:
    model: str                          # model directory (HF transformers layout)
    served_model_name: str | None = None  # default: the directory's basename
    device: str = "auto"                # auto = cuda if available else cpu
    dtype: str = "auto"                 # runtime.resolve_dtype: bfloat16 on cuda; on cpu, a bf16 checkpoint
                                        # stays bf16 where the CPU has bf16 dot products, else float32
    max_model_len: int | None = None    # default: config.max_position_embeddings
    max_num_seqs: int = 256             # vLLM's default; CUDA graphs are captured up to it
    # token budget of one engine step (chunked prefill); None = 2048 on CUDA, 512 on CPU, where a
    # 2,048-token prefill step of even the tiny chat model stalls every decoding stream for ~0.4 s
    max_num_batched_tokens: int | None = None
    # prompt tokens of a step that also decodes; None = the whole budget. What a decoding stream waits
    # for in such a step, so it bounds the inter-token gaps' tail (a step with no decodes is not capped)
    max_prefill_tokens_with_decodes: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None    # None = size from memory (gpu_memory_utilization / cpu_kv_cache_gib)
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True
    max_queued_requests: int = 256     # waiting-queue bound; admission beyond it -> QueueFullError (429)
    seed: int = 0
    load_format: str = "safetensors"    # "dummy": random weights from config.json (vLLM's name), for benchmarks
    enforce_eager: bool = False         # CUDA: no graphs, every decode step runs the model eagerly (vLLM's name)
    # launch each step before reading the previous step's sampled ids (they reach its inputs on the device),
    # so the host's scheduling and output work overlaps the GPU's; one process only (vLLM's name)
    async_scheduling: bool = False
    cuda_graph_batch_sizes: list[int] | None = None  # None = 1, 2, 4, 8, 16, 24, 32, 48, 64, ... up to max_num_seqs
    # N > 1: the model split over N devices, one process each (rank 0 is the engine core, ranks
    # 1..N-1 worker processes it starts: tp_workers.py); on CUDA rank r uses device r
    tensor_parallel_size: int = 1
    # overrides of the model directory's leanserve.json settings, applied before its method's
    # convert step (`leanserve serve --model-setting KEY=VALUE`); None = as the directory says
    model_settings: dict | None = None
