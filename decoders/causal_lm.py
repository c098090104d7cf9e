"""What every causal decoder here shares (`LlamaForCausalLM`, `DeepseekForCausalLM`): where its weights live, the
check of a prompt's token ids, the embedding, and `generate` (decoders.generate)."""
from __future__ import annotations

import torch
from torch import nn

from .generate import generate
from .masks import attention_mask_4d, positions_from_mask


class CausalLM(nn.Module):
    """Base of the decoders: a subclass has `config` (vocab_size, max_position_embeddings), `embed_tokens`, and the
    methods `decoders.generate` calls (`forward`, `decode_step`, `new_kv_cache`)."""

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`, `.half()`, `.cuda()`...: the RoPE frequencies `inv_freq` only move; they stay float32 (in
        bfloat16 the angle at position p is off by up to p * 2^-9 radians: 2 at p = 1000)."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def check_ids(self, input_ids: torch.Tensor) -> None:
        """Raise a clear error for empty input, ids outside the vocabulary, or more tokens than the context window."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("empty prompt: give at least one token (e.g. the BOS token)")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"prompt of {input_ids.shape[1]} tokens exceeds the context window of "
                             f"{self.config.max_position_embeddings} (max_position_embeddings)")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, D]; checks the ids first."""
        self.check_ids(input_ids)
        return self.embed_tokens(input_ids)

    def prepare(self, input_ids, attention_mask, inputs_embeds, position_ids, kv_cache):
        """A forward pass's checks and what the layers take: (h [B, T, D], position_ids [B, T], boolean mask or None,
        is_causal, start: the first cache slot written)."""
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        B, T, _ = h.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ValueError(f"{start + T} tokens exceed the context window of {self.config.max_position_embeddings}")
        if attention_mask is not None and attention_mask.shape != (B, start + T):
            raise ValueError(f"attention_mask must be [batch, past + new] = {(B, start + T)}, "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, start:]
            else:
                position_ids = torch.arange(start, start + T, device=h.device).expand(B, T)
        mask, is_causal = attention_mask_4d(attention_mask, start, T, h.device)
        return h, position_ids, mask, is_causal, start

    def one_call_step(self, batch_size: int, max_tokens: int):
        """`decode_step` as one native call a token, where a subclass has one (Llama: `decode_block.stepper`)."""
        return None

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 **kwargs) -> torch.Tensor:
        """Prompt + new tokens [B, T + new]; greedy unless `temperature` > 0 (see `decoders.generate.generate`)."""
        return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs)
