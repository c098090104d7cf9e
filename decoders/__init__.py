"""Decoders: the shared Llama decoder, KV cache, generation, tokenizers and kernels; the ASR decoder, CTC, beam search."""
from .batching import BatchingEngine
from .checkpoint import CheckpointError
from .deepseek import DeepseekConfig, DeepseekForCausalLM
from .generate import generate, sample_next, stream_text, stream_tokens
from .kv_cache import KVCache
from .llama import LlamaConfig, LlamaForCausalLM
from .loss import IGNORE_INDEX, next_token_loss
from .stream_decoder import StreamDecoder
from .tokenizer import SentencePieceTokenizer, TiktokenTokenizer, load_tokenizer
from .tokenizer_train import train_sentencepiece

__all__ = [
    "BatchingEngine", "CheckpointError", "DeepseekConfig", "DeepseekForCausalLM", "IGNORE_INDEX", "KVCache", "LlamaConfig",
    "LlamaForCausalLM", "SentencePieceTokenizer",
    "StreamDecoder", "TiktokenTokenizer", "generate", "load_tokenizer", "next_token_loss", "sample_next",
    "stream_text", "stream_tokens", "train_sentencepiece",
]
