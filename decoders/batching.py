"""Continuous batching: many requests share the decode steps of one Llama decoder over one static KV cache.

The cache has `max_batch` rows ("slots"), each holding one request's sequence from slot 0: its prompt at cache
positions 0..T-1, then one generated token per step. Between decode steps, waiting requests join (their prompt is
prefilled into a free row alone, exactly as `generate` prefills it) and finished ones leave (EOS, their token budget,
the context window, or cancelled), freeing their row for the next. Each step feeds the newest token of every active
row at once: per-row positions and cache slots, and a key mask [B, S] saying which cached slots each row sees (the
same mask `generate` uses for left-padded batches; stale slots of a row's previous request are masked out).

    engine = BatchingEngine(model, max_batch=8)
    engine.start()                                     # a daemon thread runs the steps
    req = engine.submit(prompt_ids, max_new_tokens=64, temperature=0.7, seed=1)
    for token in req:                                  # streamed as they are sampled
        ...

A request's tokens equal those of `generate` on its prompt alone (same greedy argmax, same seeded draws from
`sample_next` with the request's own generator), up to the float rounding of batched matmuls.
"""
from __future__ import annotations

import copy
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from .compile import aten_gemv, gemv_flags
from .generate import _eos_tensor, check_options, sample_next
from .kv_cache import KVCache

if TYPE_CHECKING:
    from .llama import LlamaForCausalLM


class SlotCache(KVCache):
    """A KVCache whose rows are independent sequences: a decode step writes each row at its own slot [B] and
    attends over the first `span` slots (the longest active row), not the whole preallocated length."""

    span: int = 0

    def update(self, layer, start, k, v):
        if not isinstance(start, torch.Tensor):
            return super().update(layer, start, k, v)
        B = k.shape[0]  # k, v [B, H_kv, 1, D]; start [B]: the slot each row writes
        rows = torch.arange(B, device=k.device)
        self.k[layer][rows, :, start] = k[:, :, 0]
        self.v[layer][rows, :, start] = v[:, :, 0]
        return self.k[layer][:B, :, :self.span], self.v[layer][:B, :, :self.span]  # [B, H_kv, span, D]

    def row(self, b: int) -> KVCache:
        """Row b as a batch-1 cache (views of this cache's tensors) starting empty: what a prefill writes into."""
        view = copy.copy(self)
        view.__class__ = KVCache
        view.k, view.v = [t[b:b + 1] for t in self.k], [t[b:b + 1] for t in self.v]
        view.length = 0
        return view


@dataclass(eq=False)
class Request:
    """One generation request; iterate it for its tokens as they come (the engine thread fills `tokens`)."""

    input_ids: torch.Tensor  # [T] prompt ids
    inputs_embeds: torch.Tensor | None = None  # [T, D] replaces the prompt's token embeddings (multimodal)
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos: torch.Tensor | None = None  # [E] ids that end the request (the EOS token is its last token)
    on_token: Callable[[int | None], None] | None = None  # from the engine thread: each new token, then None at the end
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS), "length" (budget or context), "cancelled", "error"
    error: BaseException | None = None
    cancelled: bool = False
    stream: queue.Queue = field(default_factory=queue.Queue)  # each token, then None at the end
    done: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None

    def __iter__(self) -> Iterator[int]:
        while (t := self.stream.get()) is not None:
            yield t
        if self.error is not None:
            raise self.error

    def result(self, timeout: float | None = None) -> list[int]:
        """All new tokens once the request has finished (re-raises the engine's error for it)."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.tokens


class BatchingEngine:
    """Continuous batching of `Request`s over `model`'s decoder: `submit` from any thread, `step` (or `start`'s
    thread) runs admissions and one decode step for all active rows."""

    def __init__(self, model: LlamaForCausalLM, max_batch: int = 8, max_tokens: int | None = None):
        cfg = model.config
        self.model, self.max_batch = model, max_batch
        self.aten_gemv = aten_gemv(model, 1)  # for steps of one row
        self.max_tokens = min(max_tokens or cfg.max_position_embeddings, cfg.max_position_embeddings)
        with torch.inference_mode():
            self.cache = SlotCache(cfg.num_hidden_layers, max_batch, cfg.num_key_value_heads, cfg.head_dim,
                                   self.max_tokens, model.dtype, model.device)
            self.key_mask = torch.zeros(max_batch, self.max_tokens, dtype=torch.bool, device=model.device)  # [B, S]
        self.rows: list[Request | None] = [None] * max_batch  # the request in each cache row
        self.length = [0] * max_batch  # tokens cached in each row
        self.next_token = [0] * max_batch  # the sampled token each active row feeds next
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = 0  # decode steps run (for tests and statistics)

    # ------------------------------------------------------------------------------------------ requests

    def submit(self, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, eos_token_id: int | list[int] | None = "config",
               inputs_embeds: torch.Tensor | None = None, on_token: Callable[[int | None], None] | None = None) -> Request:
        """Queue a prompt (ids [T] or a list; with `inputs_embeds` [T, D] as its embeddings); returns its Request.
        Options as `decoders.generate.stream_tokens`; bad options and prompts beyond the context are ValueErrors."""
        check_options(max_new_tokens, temperature, top_k, top_p)
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        T = ids.shape[0]
        if inputs_embeds is None:
            self.model.check_ids(ids[None])
        elif inputs_embeds.shape != (T, self.model.config.hidden_size):
            raise ValueError(f"inputs_embeds must be [tokens, hidden] = {(T, self.model.config.hidden_size)}, "
                             f"got {tuple(inputs_embeds.shape)}")
        if T == 0:
            raise ValueError("empty prompt: give at least one token (e.g. the BOS token)")
        if T >= self.max_tokens:
            raise ValueError(f"prompt of {T} tokens leaves no room to generate in the context window of {self.max_tokens}")
        cfg = self.model.config
        eos = _eos_tensor(cfg.eos_token_id if eos_token_id == "config" else eos_token_id, self.model.device)
        req = Request(ids, inputs_embeds, min(max_new_tokens, self.max_tokens - T), temperature, top_k, top_p, seed,
                      eos, on_token)
        if seed is not None:
            req.generator = torch.Generator(device=self.model.device).manual_seed(seed)
        if req.max_new_tokens == 0:
            self._finish(req, "length")
            return req
        with self.lock:
            self.waiting.append(req)
            self.lock.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request; it leaves at the next step with finish_reason "cancelled"."""
        req.cancelled = True
        with self.lock:
            self.lock.notify()

    @property
    def active(self) -> int:
        """Rows decoding now."""
        return sum(r is not None for r in self.rows)

    def idle(self) -> bool:
        """Nothing active and nothing waiting."""
        return not self.waiting and self.active == 0

    # ------------------------------------------------------------------------------------------- steps

    def _finish(self, req: Request, reason: str, error: BaseException | None = None) -> None:
        req.finish_reason, req.error = reason, error
        req.stream.put(None)
        req.done.set()
        if req.on_token is not None:
            req.on_token(None)

    def _emit(self, b: int, token: int) -> None:
        """Hand row b's new token to its request; free the row if the request is over."""
        req = self.rows[b]
        req.tokens.append(token)
        req.stream.put(token)
        if req.on_token is not None:
            req.on_token(token)
        stop = req.eos is not None and bool((req.eos == token).any())
        if stop or len(req.tokens) >= req.max_new_tokens:
            self.rows[b] = None
            self._finish(req, "stop" if stop else "length")
        else:
            self.next_token[b] = token

    def _sample(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """Next token of each row in `rows` from its logits [len(rows), V], with that request's options."""
        out = logits.argmax(dim=-1).tolist()  # greedy, unless the request samples
        for i, b in enumerate(rows):
            r = self.rows[b]
            if r.temperature > 0:
                out[i] = int(sample_next(logits[i:i + 1], r.temperature, r.top_k, r.top_p, r.generator)[0])
        return out

    def _admit(self, b: int, req: Request) -> None:
        """Prefill `req`'s prompt into row b alone and emit its first token."""
        T = req.input_ids.shape[0]
        m = self.model
        ids = req.input_ids[None].to(m.device)  # [1, T]
        embeds = None if req.inputs_embeds is None else req.inputs_embeds[None].to(m.device, m.dtype)  # [1, T, D]
        positions = torch.arange(T, device=m.device)[None]  # [1, T]
        logits = m(ids, None, inputs_embeds=embeds, position_ids=positions, kv_cache=self.cache.row(b),
                   last_only=True)  # [1, 1, V]
        self.key_mask[b] = False
        self.key_mask[b, :T] = True
        self.rows[b], self.length[b] = req, T
        self._emit(b, self._sample(logits[:, -1], [b])[0])

    @torch.inference_mode()
    def step(self) -> bool:
        """Drop cancelled requests, admit waiting ones into free rows, then decode one token for every active row.
        Returns whether anything is left to do."""
        for b, r in enumerate(self.rows):
            if r is not None and r.cancelled:
                self.rows[b] = None
                self._finish(r, "cancelled")
        while True:
            with self.lock:
                free = next((b for b, r in enumerate(self.rows) if r is None), None)
                if free is None or not self.waiting:
                    break
                req = self.waiting.popleft()
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            try:
                self._admit(free, req)
            except Exception as e:  # noqa: BLE001 - a request the model cannot take fails alone
                self.rows[free] = None
                self._finish(req, "error", e)
        active = [b for b, r in enumerate(self.rows) if r is not None]
        if active:
            self._decode(active)
        return not self.idle()

    def _decode(self, active: list[int]) -> None:
        B = active[-1] + 1  # rows 0..B-1 run (free ones in between too: cheaper than gathering cache rows)
        dev = self.model.device
        slots = torch.tensor([self.length[b] if self.rows[b] is not None else 0 for b in range(B)], device=dev)  # [B]
        tokens = torch.tensor([self.next_token[b] if self.rows[b] is not None else 0 for b in range(B)], device=dev)
        key_mask = self.key_mask[:B]
        key_mask[torch.arange(B, device=dev), slots] = True  # each row sees its new slot (a free row: slot 0 only)
        self.cache.span = max(self.length[b] for b in active) + 1
        with gemv_flags(B == 1 and self.aten_gemv):
            logits = self.model.decode_step(tokens[:, None], slots[:, None], slots, key_mask[:, :self.cache.span],
                                            self.cache)  # [B, 1, V]
        self.steps += 1
        for b in active:
            self.length[b] += 1
        for b, t in zip(active, self._sample(logits[active, -1], active)):
            self._emit(b, t)

    # ------------------------------------------------------------------------------------------ thread

    def start(self) -> "BatchingEngine":
        """Run steps in a daemon thread whenever there is work (idempotent)."""
        if self.thread is None:
            self.stopping = False
            self.thread = threading.Thread(target=self._loop, name="batching-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread after its current step; unfinished requests end as "cancelled"."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        for b, r in enumerate(self.rows):
            if r is not None:
                self.rows[b] = None
                self._finish(r, "cancelled")
        while self.waiting:
            self._finish(self.waiting.popleft(), "cancelled")

    def _loop(self) -> None:
        while True:
            with self.lock:
                while self.idle() and not self.stopping:
                    self.lock.wait()
                if self.stopping:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                for b, r in enumerate(self.rows):
                    if r is not None:
                        self.rows[b] = None
                        self._finish(r, "error", e)
