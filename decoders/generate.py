"""Generation: prefill the prompt into a static KV cache, then one token per step until EOS or the budget.

`stream_tokens` is the loop (a generator of one new token per row per step); `generate` collects it and
`stream_text` turns it into text pieces that are safe for multi-byte characters split across tokens.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator

import torch

from . import cpu_kernels
from .compile import aten_gemv, compile_decode, gemv_flags
from .cuda_graph import static_decoder
from .masks import positions_from_mask
from .stream_decoder import StreamDecoder

if TYPE_CHECKING:
    from .llama import LlamaForCausalLM


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Logits [B, V] / temperature, -inf outside the top k and outside the smallest set of most likely tokens whose
    probability reaches top_p (the token that crosses p is kept): what sampling draws from (float32)."""
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def check_options(max_new_tokens, temperature, top_k, top_p) -> None:
    """ValueError naming the first generation option out of its range."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 or None: no top-k), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] (or None), got {top_p!r}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]: greedy at temperature 0, else a draw from
    softmax(filter_logits(logits, temperature, top_k, top_p))."""
    if temperature <= 0:  # in float32: the same choice, and ATen's bf16 argmax is 5x slower (109 vs 23 us at 32k);
        return logits.float().max(dim=-1).indices  # max's first index, as argmax's, in half its time (19 vs 44 us)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _eos_tensor(eos_token_id, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, device=device) if ids else None


@torch.inference_mode()
def stream_tokens(model: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, eos_token_id: int | list[int] | None = "config",
                  pad_token_id: int | None = None, seed: int | None = None,
                  inputs_embeds: torch.Tensor | None = None, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B] once per step; a finished row (after EOS) yields `pad_token_id`.

    Left-padded batches: `attention_mask [B, T]` marks real tokens with 1. `inputs_embeds [B, T, D]` replaces
    the prompt's token embeddings (multimodal prompts); `input_ids` then only gives the shape and device.
    Decoding runs `model.decode_step` on a static cache; `compile=True` (or an earlier `decoders.compile.compile_decode(model)`)
    runs it through `torch.compile`: on CPU compiling takes 20-130 s and then decodes 2-5x faster, so it pays
    for itself after some thousands of tokens (a server, a benchmark, long generations), not for one short reply.
    Over 60 lines: prefill, the static cache, the eager/compiled/CUDA-graph step and sampling share one loop's state.
    """
    check_options(max_new_tokens, temperature, top_k, top_p)
    cfg = model.config
    if inputs_embeds is None:
        model.check_ids(input_ids)
    B, T = input_ids.shape[:2]
    if T == 0:
        raise ValueError("empty prompt: give at least one token (e.g. the BOS token)")
    room = cfg.max_position_embeddings - T
    if room <= 0:
        raise ValueError(f"prompt of {T} tokens leaves no room to generate in the context window of {cfg.max_position_embeddings}")
    max_new_tokens = min(max_new_tokens, room)
    if max_new_tokens <= 0:
        return
    device = model.device
    if device.type == "cpu":
        cpu_kernels.build()  # the decode attention kernel (once a process; built once a machine)
    eos = _eos_tensor(cfg.eos_token_id if eos_token_id == "config" else eos_token_id, device)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (int(eos[0]) if eos is not None else 0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    S_max = T + max_new_tokens
    if compile or model.compiled_decode_step is not None:
        S_max = -(-S_max // 256) * 256  # round up so the compiled step's shapes repeat across calls
    key_mask = torch.zeros(B, S_max, dtype=torch.bool, device=device)  # which cache slots hold real tokens
    key_mask[:, :T] = True if attention_mask is None else attention_mask.to(device).bool()
    positions = positions_from_mask(key_mask[:, :T])  # [B, T]
    graphed = device.type == "cuda" and (compile or model.compiled_decode_step is not None)
    static = static_decoder(model, B, S_max) if graphed else None  # the compiled step in a CUDA graph
    cache = static.cache if graphed else model.new_kv_cache(B, S_max)
    prompt_mask = None if bool(key_mask[:, :T].all()) else key_mask[:, :T]
    use_lens = prompt_mask is None and device.type == "cuda"
    logits = model(input_ids.to(device), prompt_mask, inputs_embeds=inputs_embeds, position_ids=positions,
                   kv_cache=cache, last_only=True)  # [B, 1, V]
    step_fn = compile_decode(model) if compile else (model.compiled_decode_step or  # eagerly on CPU: one C++ call
                                                     model.one_call_step(B, S_max) or model.decode_step)
    aten = aten_gemv(model, B)
    next_pos = positions[:, -1:] + 1  # [B, 1]
    # Step inputs live on the device and advance there: building them from Python ints would copy host -> device
    # (a wait for the GPU) every token.
    slot_t = torch.full((1,), T, device=device)  # [1] the cache slot the next step writes
    cache_lens = torch.full((B,), T + 1, device=device) if use_lens else None  # [B] tokens cached after it
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # [B]
        if eos is not None:  # (without it no row finishes)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
        yield token
        if eos is not None:
            done |= torch.isin(token, eos)
            if bool(done.all()):
                return
        if step + 1 == max_new_tokens:
            return
        key_mask[:, T + step] = True
        if graphed:
            logits = static.step(step_fn, token[:, None], next_pos, slot_t, key_mask, cache_lens)
        else:
            with gemv_flags(aten):
                logits = step_fn(token[:, None], next_pos, slot_t, key_mask, cache, cache_lens)
        next_pos, slot_t = next_pos + 1, slot_t + 1
        if use_lens:  # without padding each row's tokens are a cache prefix: on CUDA, FlashDecoding's lengths
            cache_lens = cache_lens + 1


def generate(model: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
    """Prompt followed by the generated tokens [B, T + new] (see `stream_tokens` for the options)."""
    new = list(stream_tokens(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs))
    out = [input_ids.to(model.device)] + [t[:, None] for t in new]
    return torch.cat(out, dim=1)


def stream_text(model: LlamaForCausalLM, tokenizer, input_ids: torch.Tensor, stats: dict | None = None,
                **kwargs) -> Iterator[str]:
    """Yield decoded text pieces of a single prompt as tokens arrive; stops at the tokenizer's stop ids.

    `stats`, if given, receives `new_tokens`: how many tokens were generated (a stop token included).
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"stream_text streams one prompt; got a batch of {input_ids.shape[0]}")
    kwargs.setdefault("eos_token_id", sorted(tokenizer.stop_ids))
    stops = set(kwargs["eos_token_id"] or [])
    decoder = StreamDecoder(tokenizer, context_ids=input_ids[0].tolist())
    stats = {} if stats is None else stats
    stats["new_tokens"] = 0
    for token in stream_tokens(model, input_ids, **kwargs):
        stats["new_tokens"] += 1
        t = int(token[0])
        if t in stops:
            break
        piece = decoder.push(t)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail
