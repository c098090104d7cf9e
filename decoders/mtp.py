"""DeepSeek-V3 multi-token prediction (MTP): extra modules that predict the tokens after the next one, trained with a
weighted loss beside next-token prediction, and used at inference as the drafter of self-speculative decoding.

    depth k, position i:  h^k_i = norm_k(block_k(eh_proj_k([enorm_k(emb(t_{i+k})) ; hnorm_k(h^{k-1}_i)])))
                          logits^k_i = head(h^k_i) predicts t_{i+k+1}      (emb and head: the main model's)
    h^0 = the main model's final (normalised) hidden states; block_k: a decoder layer (MLA + MoE)
    loss = weight / depth x sum_k CE(logits^k, t shifted by k + 1)        (weight 0.3, later 0.1, in the report)

In DeepSeek-V3 checkpoints module k is `model.layers.{num_hidden_layers + k}.` (`enorm`, `hnorm`, `eh_proj`, the
block's keys, `shared_head.norm`, and copies of the embedding and head); transformers' loader drops them, ours loads
them into `DeepseekForCausalLM.mtp`.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .convert_deepseek import convert_layer, to_hf_layer
from .llama import Pass, RMSNorm
from .masks import attention_mask_4d
from .mla import LatentCache, rope_cos_sin

if TYPE_CHECKING:
    from .deepseek import DeepseekConfig, DeepseekForCausalLM

OWN_KEYS = ("enorm.weight", "hnorm.weight", "eh_proj.weight")  # the module's own weights, beside its block's


class MTPLayer(nn.Module):
    """One prediction depth: (previous hidden h [B, T, D], embeddings of the tokens one further [B, T, D]) -> h'."""

    def __init__(self, cfg: DeepseekConfig, block: nn.Module):
        super().__init__()
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = block
        self.norm = RMSNorm(D, cfg.rms_norm_eps)  # `shared_head.norm` in checkpoints

    def forward(self, h: torch.Tensor, emb: torch.Tensor, p: Pass) -> torch.Tensor:
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1))  # [B, T, D]
        return self.norm(self.block(x, p, 0))


class MTP(nn.Module):
    """The multi-token-prediction modules; `make_block(i)` builds decoder layer i (an MoE layer)."""

    def __init__(self, cfg: DeepseekConfig, depth: int, make_block):
        super().__init__()
        self.layers = nn.ModuleList(MTPLayer(cfg, make_block(cfg, cfg.num_hidden_layers + k)) for k in range(depth))


def make_pass(model: DeepseekForCausalLM, positions: torch.Tensor, start: int, cache, dtype) -> Pass:
    """Everything a layer needs for a causal block of tokens at `positions` [B, T] after `start` cached ones."""
    mask, is_causal = attention_mask_4d(None, start, positions.shape[1], positions.device)
    if mask is not None:
        mask = torch.zeros(mask.shape, dtype=dtype, device=positions.device).masked_fill_(~mask, float("-inf"))
    cos, sin = rope_cos_sin(model.inv_freq, model.rope_factor, positions, dtype)
    return Pass(cos, sin, mask, is_causal, cache, start)


def mtp_logits(model: DeepseekForCausalLM, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per depth k = 1..K the logits [B, T-k, V] whose position i predicts token i + k + 1; hidden [B, T, D] is the
    main model's final normalised hidden states (`model(ids, return_hidden=True)`)."""
    if model.mtp is None:
        raise ValueError("the model has no multi-token-prediction modules (the checkpoint had none)")
    T = input_ids.shape[1]
    out, h = [], hidden
    for k, layer in enumerate(model.mtp.layers, start=1):
        if T - k < 1:
            break
        positions = torch.arange(k, T, device=input_ids.device).expand(input_ids.shape[0], T - k)
        h = layer(h[:, :T - k], model.embed_tokens(input_ids[:, k:]), make_pass(model, positions, 0, None, hidden.dtype))
        out.append(model.head(h))
    return out


def mtp_loss(model: DeepseekForCausalLM, hidden: torch.Tensor, input_ids: torch.Tensor, weight: float = 0.3) -> torch.Tensor:
    """weight / depth x the sum over depths of the cross entropy of logits^k against the tokens k + 1 ahead."""
    logits = mtp_logits(model, hidden, input_ids)
    losses = [F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]).float(), input_ids[:, k + 1:].reshape(-1))
              for k, lg in enumerate(logits, start=1) if lg.shape[1] > 1]
    return weight / len(model.mtp.layers) * torch.stack(losses).sum()


@torch.inference_mode()
def speculative_generate(model: DeepseekForCausalLM, input_ids: torch.Tensor, max_new_tokens: int = 32,
                         eos_token_id: int | list[int] | None = "config", stats: dict | None = None) -> torch.Tensor:
    """Greedy decoding with the first MTP module drafting one token ahead: the main model checks [last, draft] in
    one pass, keeps the draft when it is its own greedy choice (then its next choice comes free), and rolls its cache
    back otherwise. Returns exactly `model.generate`'s greedy tokens [1, T + new]; `stats` receives `acceptance`
    (accepted drafts / drafts), `tokens_per_pass` and `seconds`."""
    if model.mtp is None:
        raise ValueError("speculative decoding needs the model's MTP modules (the checkpoint had none)")
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative_generate decodes one prompt; got a batch of {input_ids.shape[0]}")
    model.check_ids(input_ids)
    cfg, device, t0 = model.config, model.device, time.perf_counter()
    eos = cfg.eos_token_id if eos_token_id == "config" else eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or [])
    T = input_ids.shape[1]
    max_new_tokens = min(max_new_tokens, cfg.max_position_embeddings - T - 1)
    if max_new_tokens <= 0:
        return input_ids.to(device)
    S = T + max_new_tokens + 2
    cache = model.new_kv_cache(1, S)
    mtp_cache = LatentCache(1, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, S, model.dtype, device)
    layer = model.mtp.layers[0]

    def draft(hidden: torch.Tensor, next_ids: list[int]) -> int:
        """Add MTP positions for confirmed tokens (main hidden states [1, n, D], each one's next token); draft."""
        start = mtp_cache.length
        positions = torch.arange(start + 1, start + 1 + len(next_ids), device=device)[None]
        emb = model.embed_tokens(torch.tensor([next_ids], device=device))
        h = layer(hidden, emb, make_pass(model, positions, start, mtp_cache, hidden.dtype))
        mtp_cache.length = start + len(next_ids)
        return int(model.head(h[:, -1]).argmax(-1))

    logits, hidden = model(input_ids.to(device), kv_cache=cache, return_hidden=True)
    out = [int(logits[0, -1].argmax())]
    guess = draft(hidden, input_ids[0, 1:].tolist() + out)
    passes = drafted = accepted = 0
    while len(out) < max_new_tokens and out[-1] not in eos:
        logits, hidden = model(torch.tensor([[out[-1], guess]], device=device), kv_cache=cache, return_hidden=True)
        choice = logits[0].argmax(-1).tolist()  # the main model's token after `last`, and after the draft
        passes, drafted = passes + 1, drafted + 1
        if choice[0] == guess:
            accepted += 1
            new = choice  # the draft, and the token after it, both confirmed
        else:
            new, hidden = choice[:1], hidden[:, :1]
            cache.length -= 1  # forget the draft's slot
        out += new
        guess = draft(hidden, new)
    out = out[:max_new_tokens]
    out = out[:next((i + 1 for i, t in enumerate(out) if t in eos), len(out))]  # up to the first EOS, included
    if stats is not None:
        stats.update(acceptance=accepted / max(drafted, 1), tokens_per_pass=(len(out) - 1) / max(passes, 1),
                     seconds=time.perf_counter() - t0, new_tokens=len(out))
    return torch.cat((input_ids.to(device), torch.tensor([out], device=device)), dim=1)


def convert_mtp_state_dict(mtp: dict[int, dict[str, torch.Tensor]], cfg: DeepseekConfig, source: str) -> dict:
    """Checkpoint keys of each depth (prefix `model.layers.{N + k}.` removed) -> ours under `mtp.layers.{k}.`;
    the copies of the embedding and head (`embed_tokens`, `shared_head.head`) are dropped: they are the main ones."""
    out = {}
    for k, sd in sorted(mtp.items()):
        own = {n: sd.pop(n) for n in OWN_KEYS if n in sd}
        if "shared_head.norm.weight" in sd:
            own["norm.weight"] = sd.pop("shared_head.norm.weight")
        for n in ("embed_tokens.weight", "shared_head.head.weight"):
            sd.pop(n, None)
        block = convert_layer(sd, cfg, cfg.num_hidden_layers + k, "", source)
        out.update({f"mtp.layers.{k}.{n}": v for n, v in own.items()})
        out.update({f"mtp.layers.{k}.block.{n}": v for n, v in block.items()})
    return out


def mtp_to_hf_state_dict(model: DeepseekForCausalLM) -> dict[str, torch.Tensor]:
    """Our MTP modules -> DeepSeek-V3 checkpoint keys `model.layers.{N + k}.*` (with the embedding and head copies)."""
    out, N = {}, model.config.num_hidden_layers
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    for k, layer in enumerate(model.mtp.layers):
        prefix = f"model.layers.{N + k}."
        sd = layer.state_dict()
        block = {n.removeprefix("block."): v for n, v in sd.items() if n.startswith("block.")}
        out.update({prefix + n: v for n, v in to_hf_layer(block, model.config).items()})
        out.update({prefix + n: sd[n] for n in OWN_KEYS})
        out.update({prefix + "shared_head.norm.weight": sd["norm.weight"], prefix + "shared_head.head.weight": head.clone(),
                    prefix + "embed_tokens.weight": model.embed_tokens.weight.clone()})  # copies: safetensors stores no aliases
    return out
