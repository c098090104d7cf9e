"""The compiled decode step captured in a CUDA graph, with the static KV cache it writes, replayed once per token.

A decode step of a small model is hundreds of short kernels; launched one by one from Python they leave the GPU
idle most of the time. Captured once in a CUDA graph, a token costs one replay plus a few copies of the step's
inputs into the graph's own buffers. The graph reads and writes fixed addresses, so it is tied to one KV cache:
`StaticDecoder` owns both, one per model and (batch, cache length), kept across `generate` calls.
"""
from __future__ import annotations

import torch

from .kv_cache import KVCache


class StaticDecoder:
    """A KV cache [B, H_kv, S_max, D] per layer and, once `step` is first called, the CUDA graph of `step_fn` over it."""

    def __init__(self, model, batch: int, max_tokens: int):
        self.cache: KVCache = model.new_kv_cache(batch, max_tokens)
        self.shape = (batch, max_tokens)
        self.graph = None
        self.inputs: list[torch.Tensor | None] = []  # the graph's input buffers
        self.logits = None  # the graph's output buffer [B, 1, V]

    def step(self, step_fn, token, position, slot, key_mask, cache_lens) -> torch.Tensor:
        """Logits [B, 1, V] of one decode step (see `LlamaForCausalLM.decode_step`), valid until the next call.

        The first call runs `step_fn` twice on a side stream (compiling it and warming up cuBLAS), then captures it.
        Running the step again on the same inputs writes the same keys and values into the same slot, so the
        warm-up leaves the cache as one step would."""
        args = [token, position, slot, key_mask, cache_lens]
        if self.graph is None:
            self.inputs = [None if a is None else a.clone() for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step_fn(*self.inputs[:4], self.cache, self.inputs[4])
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = step_fn(*self.inputs[:4], self.cache, self.inputs[4])
        for buf, a in zip(self.inputs, args):
            if buf is not None:
                buf.copy_(a)
        self.graph.replay()
        return self.logits


def static_decoder(model, batch: int, max_tokens: int) -> StaticDecoder:
    """The model's StaticDecoder for this shape (made anew, and the old one freed, when the shape changes)."""
    current = getattr(model, "static_decoder", None)
    if current is None or current.shape != (batch, max_tokens):
        model.static_decoder = None  # free the old cache and graph first
        current = model.static_decoder = StaticDecoder(model, batch, max_tokens)
    current.cache.reset()
    return current
