"""Decoders: the shared Llama decoder, KV cache, generation, tokenizers and kernels."""
from .checkpoint import CheckpointError
from .generate import generate, sample_next, stream_text, stream_tokens
from .kv_cache import KVCache
from .llama import LlamaConfig, LlamaForCausalLM
from .loss import IGNORE_INDEX, next_token_loss

__all__ = [
    "CheckpointError", "IGNORE_INDEX", "KVCache", "LlamaConfig", "LlamaForCausalLM", "generate", "next_token_loss",
    "sample_next", "stream_text", "stream_tokens",
]
