"""A static (preallocated) key/value cache for the Llama decoder, written in place at the current slots."""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, one `[B, H_kv, max_tokens, head_dim]` tensor each, allocated once.

    All rows of a batch share the slot timeline (slot t holds the t-th token fed to the model, padding
    included); which slots are real is the caller's attention mask. Decoding one token writes one slot per
    layer and allocates nothing. Each layer has its own tensors (not views of one big tensor): a compiled decode
    step then writes its slot in place, where a view's write makes inductor copy the whole layer.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_tokens: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch_size, n_kv_heads, max_tokens, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]  # L x [B, H_kv, S, D]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0  # slots filled so far

    @property
    def max_tokens(self) -> int:
        """How many slots the cache holds."""
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held: 2 x layers x batch x kv_heads x head_dim x max_tokens x element size."""
        return sum(t.nbytes for t in self.k + self.v)

    def update(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k, v [B, H_kv, T, D]` at slots `start..start+T` of `layer`; return that layer's keys/values so far.

        With `start` a tensor of slot indices [T] (the compiled decode step), the write is an in-place
        `index_copy_` and every slot is returned, so shapes never change; the caller masks unused slots.
        """
        if isinstance(start, torch.Tensor):
            self.k[layer].index_copy_(2, start, k)
            self.v[layer].index_copy_(2, start, v)
            return self.k[layer], self.v[layer]  # [B, H_kv, S_max, D]
        end = start + k.shape[2]
        if end > self.max_tokens:
            raise ValueError(f"KV cache holds {self.max_tokens} tokens; writing slots {start}..{end} overflows it")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # [B, H_kv, end, D]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` [N'] of the batch, in that order (the hypotheses a beam search step selected)."""
        self.k = [k.index_select(0, index) for k in self.k]  # L x [N', H_kv, S, D]
        self.v = [v.index_select(0, index) for v in self.v]

    def reset(self) -> None:
        """Forget what is cached (the memory is kept)."""
        self.length = 0
