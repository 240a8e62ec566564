"""Attention layers and the KV caches they read, one file per attention kind (paged.py: dense paged
attention) plus the shared pieces: metadata.py (what one engine step tells every layer) and
kv_spec.py (the cache layout a model asks the engine for, through `model.kv_cache_spec`).
Triton kernels stay in leanserve/kernels."""
