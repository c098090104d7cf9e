"""Transformer attention decoder for ASR in the ESPnet / Dolphin layout.

Pre-norm blocks of causal self-attention, cross-attention over the speech encoder output and a ReLU
feed-forward (Vaswani et al. 2017; ESPnet `espnet2/asr/decoder/transformer_decoder.py`). Weight names are
ESPnet's, so a Dolphin / ESPnet `decoder.*` state dict loads after stripping its prefix:

    embed.0.weight                                   token embedding [V, D]
    decoders.N.{self_attn,src_attn}.linear_{q,k,v,out}.{weight,bias}
    decoders.N.feed_forward.w_{1,2}.{weight,bias}    D -> ffn_dim -> D, ReLU
    decoders.N.norm{1,2,3}.{weight,bias}             LayerNorm eps 1e-12 before each sub-block
    after_norm.{weight,bias}, output_layer.{weight,bias}

Teacher forcing runs the whole target at once (`forward`); decoding appends one token per `step`
with a key/value cache (self-attention keys/values per layer, cross-attention keys/values computed once),
which gives the same numbers as ESPnet's `forward_one_step` (that re-runs every layer over the prefix).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import check_config_keys

LAYER_NORM_EPS = 1e-12  # ESPnet's LayerNorm


@dataclass
class ASRDecoderConfig:
    """Sizes of the attention decoder; names follow ESPnet's `decoder_conf` where they exist."""

    vocab_size: int
    d_model: int  # = encoder output size (ESPnet ties them)
    n_heads: int = 4  # attention_heads
    ffn_dim: int = 2048  # linear_units
    n_layers: int = 6  # num_blocks
    dropout: float = 0.1  # dropout_rate
    positional_dropout: float = 0.1  # positional_dropout_rate
    self_attention_dropout: float = 0.0  # self_attention_dropout_rate
    src_attention_dropout: float = 0.0  # src_attention_dropout_rate

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")

    # ESPnet decoder_conf keys we cannot honour: key -> the only value we support
    _FIXED = {"input_layer": "embed", "use_output_layer": True, "normalize_before": True,
              "concat_after": False, "qk_norm": False}
    _RENAME = {"attention_heads": "n_heads", "linear_units": "ffn_dim", "num_blocks": "n_layers",
               "dropout_rate": "dropout", "positional_dropout_rate": "positional_dropout",
               "self_attention_dropout_rate": "self_attention_dropout",
               "src_attention_dropout_rate": "src_attention_dropout"}
    # training-only switches that do not change the numbers at inference
    _IGNORED = {"layer_drop_rate", "use_flash_attn", "gradient_checkpoint_layers"}

    @classmethod
    def from_espnet(cls, decoder_conf: dict, vocab_size: int, encoder_output_size: int) -> "ASRDecoderConfig":
        """Build from an ESPnet `config.yaml` `decoder_conf` (transformer decoder) plus vocab and encoder sizes."""
        kw = {"vocab_size": vocab_size, "d_model": encoder_output_size}
        for key, value in (decoder_conf or {}).items():
            if key in cls._RENAME:
                kw[cls._RENAME[key]] = value
            elif key in cls._FIXED:
                if value != cls._FIXED[key]:
                    raise ValueError(f"decoder_conf.{key}={value!r} is not supported (only {cls._FIXED[key]!r})")
            elif key not in cls._IGNORED:
                raise ValueError(f"decoder_conf.{key} is not a transformer decoder option we know")
        return cls(**kw)

    def to_dict(self) -> dict:
        """Plain dict for `config.json`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ASRDecoderConfig":
        """Inverse of `to_dict`; unknown keys are an error."""
        check_config_keys(cls, d)
        return cls(**d)


def sinusoid_positions(start: int, length: int, d_model: int, device=None) -> torch.Tensor:
    """Absolute sin/cos position table rows [start, start+length) as ESPnet computes it (float32). # [L, D]"""
    position = torch.arange(start, start + length, dtype=torch.float32, device=device).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=device)
                         * -(math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model, device=device)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


class MultiHeadAttention(nn.Module):
    """Multi-head attention with ESPnet's `linear_{q,k,v,out}` names over precomputed keys/values (`kv`)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.d_k, self.dropout = n_heads, d_model // n_heads, dropout
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, H, L, d_k]."""
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_k).transpose(1, 2)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `x`, each [B, H, L, d_k]."""
        return self.split(self.linear_k(x)), self.split(self.linear_v(x))

    def attend(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        """Attention of `query` [B, Lq, D] over projected k, v; mask is bool, True = may attend."""
        q = self.split(self.linear_q(query))  # [B, H, Lq, d_k]
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B, H, Lq, d_k]
        out = out.transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)
        return self.linear_out(out)


class FeedForward(nn.Module):
    """Position-wise FFN w_2(ReLU(w_1 x)) as ESPnet's transformer decoder."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(d_model, ffn_dim)
        self.w_2 = nn.Linear(ffn_dim, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        """[..., D] -> [..., D]."""
        return self.w_2(self.dropout(F.relu(self.w_1(x))))


class DecoderLayer(nn.Module):
    """Pre-norm block: x += SelfAttn(norm1 x); x += SrcAttn(norm2 x, enc); x += FFN(norm3 x)."""

    def __init__(self, cfg: ASRDecoderConfig):
        super().__init__()
        d = cfg.d_model
        self.self_attn = MultiHeadAttention(d, cfg.n_heads, cfg.self_attention_dropout)
        self.src_attn = MultiHeadAttention(d, cfg.n_heads, cfg.src_attention_dropout)
        self.feed_forward = FeedForward(d, cfg.ffn_dim, cfg.dropout)
        self.norm1 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.norm3 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, self_k, self_v, self_mask, src_k, src_v, src_mask):
        """One block given precomputed self-attention and source keys/values."""
        x = x + self.dropout(self.self_attn.attend(self.norm1(x), self_k, self_v, self_mask))
        x = x + self.dropout(self.src_attn.attend(self.norm2(x), src_k, src_v, src_mask))
        return x + self.dropout(self.feed_forward(self.norm3(x)))


@dataclass
class DecoderCache:
    """Incremental decoding state for N hypotheses.

    self_kv: per layer (k, v) of the prefix, each [N, H, L, d_k]; src_kv: per layer (k, v) of the encoder
    output, each [N or 1, H, T, d_k] (1 = shared by all hypotheses of one utterance); src_mask: bool
    [N or 1, 1, 1, T] or None; length: tokens consumed so far (= next position).
    """

    self_kv: list[tuple[torch.Tensor, torch.Tensor]]
    src_kv: list[tuple[torch.Tensor, torch.Tensor]]
    src_mask: torch.Tensor | None
    length: int = 0

    def select(self, idx: torch.Tensor) -> "DecoderCache":
        """Keep hypotheses `idx` [N'] (beam reordering); shared encoder keys/values stay shared."""
        def pick(t):
            return t if t.shape[0] == 1 else t.index_select(0, idx)
        self_kv = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.self_kv]
        src_kv = [(pick(k), pick(v)) for k, v in self.src_kv]
        mask = None if self.src_mask is None else pick(self.src_mask)
        return DecoderCache(self_kv, src_kv, mask, self.length)


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """True at valid positions. # [B, max_len]"""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class TransformerDecoder(nn.Module):
    """ESPnet/Dolphin Transformer attention decoder (pre-norm, absolute sinusoid positions, x*sqrt(D))."""

    def __init__(self, cfg: ASRDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Sequential(nn.Embedding(cfg.vocab_size, cfg.d_model))  # key `embed.0` as ESPnet
        self.pos_dropout = nn.Dropout(cfg.positional_dropout)
        self.decoders = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.after_norm = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)
        self.output_layer = nn.Linear(cfg.d_model, cfg.vocab_size)

    def embed_tokens(self, ys: torch.Tensor, start: int) -> torch.Tensor:
        """Token embedding * sqrt(D) + positions start.. . # [B, L, D]"""
        if ys.numel() and (int(ys.min()) < 0 or int(ys.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got min {int(ys.min())} "
                             f"max {int(ys.max())} (pad decoder inputs with eos, not ignore_id)")
        x = self.embed(ys) * math.sqrt(self.cfg.d_model)
        pe = sinusoid_positions(start, ys.shape[1], self.cfg.d_model, ys.device).to(x.dtype)
        return self.pos_dropout(x + pe)

    def _check_enc(self, enc: torch.Tensor, enc_lengths: torch.Tensor | None):
        if enc.dim() != 3 or enc.shape[-1] != self.cfg.d_model:
            raise ValueError(f"enc must be [B, T, {self.cfg.d_model}], got {tuple(enc.shape)}")
        if enc_lengths is not None and (int(enc_lengths.min()) < 1 or int(enc_lengths.max()) > enc.shape[1]):
            raise ValueError(f"enc_lengths must lie in [1, {enc.shape[1]}], got {enc_lengths.tolist()}")

    def forward(self, enc: torch.Tensor, enc_lengths: torch.Tensor, ys_in: torch.Tensor,
                ys_in_lengths: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for every target position. enc [B, T, D], ys_in [B, L] -> [B, L, V]."""
        self._check_enc(enc, enc_lengths)
        if int(ys_in_lengths.min()) < 1:
            raise ValueError(f"ys_in_lengths must be >= 1 (sos is always there), got {ys_in_lengths.tolist()}")
        L = ys_in.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=ys_in.device).tril()
        self_mask = (length_mask(ys_in_lengths, L)[:, None, :] & causal)[:, None]  # [B, 1, L, L]
        src_mask = length_mask(enc_lengths, enc.shape[1])[:, None, None, :]  # [B, 1, 1, T]
        x = self.embed_tokens(ys_in, 0)  # [B, L, D]
        for layer in self.decoders:
            h = layer.norm1(x)
            k, v = layer.self_attn.kv(h)
            sk, sv = layer.src_attn.kv(enc)
            x = layer(x, k, v, self_mask, sk, sv, src_mask)
        return self.output_layer(self.after_norm(x))

    def init_cache(self, enc: torch.Tensor, enc_lengths: torch.Tensor | None = None) -> DecoderCache:
        """Cache for decoding from `enc` [N, T, D] (N = 1 shares one utterance among all hypotheses)."""
        self._check_enc(enc, enc_lengths)
        src_kv = [layer.src_attn.kv(enc) for layer in self.decoders]
        mask = None if enc_lengths is None else length_mask(enc_lengths, enc.shape[1])[:, None, None, :]
        empty = enc.new_zeros(enc.shape[0], self.cfg.n_heads, 0, self.cfg.d_model // self.cfg.n_heads)
        return DecoderCache([(empty, empty) for _ in self.decoders], src_kv, mask, 0)

    def step(self, ys: torch.Tensor, cache: DecoderCache) -> tuple[torch.Tensor, DecoderCache]:
        """Feed new tokens ys [N, l] (l >= 1, e.g. the prefix first, then one token at a time).

        Returns log-probs of the token after the last one [N, V] and the extended cache.
        """
        N, l = ys.shape
        if cache.length > 0 and cache.self_kv[0][0].shape[0] != N:
            raise ValueError(f"cache holds {cache.self_kv[0][0].shape[0]} hypotheses, got ys for {N}")
        x = self.embed_tokens(ys, cache.length)  # [N, l, D]
        # new queries see every cached position and the new ones causally
        total = cache.length + l
        self_mask = torch.ones(l, total, dtype=torch.bool, device=ys.device).tril(cache.length) if l > 1 else None
        new_self = []
        for layer, (ck, cv), (sk, sv) in zip(self.decoders, cache.self_kv, cache.src_kv):
            k, v = layer.self_attn.kv(layer.norm1(x))
            if cache.length > 0:
                k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
            new_self.append((k, v))
            if sk.shape[0] != N:
                sk, sv = sk.expand(N, -1, -1, -1), sv.expand(N, -1, -1, -1)
            x = layer(x, k, v, self_mask, sk, sv, cache.src_mask)
        logp = torch.log_softmax(self.output_layer(self.after_norm(x[:, -1])), dim=-1)  # [N, V]
        return logp, DecoderCache(new_self, cache.src_kv, cache.src_mask, total)


def add_sos_eos(ys: torch.Tensor, ys_lengths: torch.Tensor, sos: int, eos: int, ignore_id: int = -1):
    """Decoder input `<sos> y` (padded with eos) and target `y <eos>` (padded with ignore_id), as ESPnet.

    ys [B, L] padded (any pad value beyond ys_lengths) -> ys_in, ys_out [B, L+1], ys_in_lengths [B].
    """
    B, L = ys.shape
    valid = length_mask(ys_lengths, L)  # [B, L]
    ys_in = torch.full((B, L + 1), eos, dtype=ys.dtype, device=ys.device)
    ys_in[:, 0] = sos
    ys_in[:, 1:] = torch.where(valid, ys, ys_in[:, 1:])
    ys_out = torch.full((B, L + 1), ignore_id, dtype=ys.dtype, device=ys.device)
    ys_out[:, :L] = torch.where(valid, ys, ys_out[:, :L])
    ys_out[torch.arange(B, device=ys.device), ys_lengths] = eos
    return ys_in, ys_out, ys_lengths + 1


def label_smoothing_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1,
                         ignore_id: int = -1, normalize_length: bool = False) -> torch.Tensor:
    """ESPnet `LabelSmoothingLoss`: KL(q || softmax(logits)) summed, over batch size (or token count).

    q puts 1 - smoothing on the target and smoothing / (V - 1) on every other class.
    """
    B, _, V = logits.shape
    logp = torch.log_softmax(logits.reshape(-1, V), dim=-1)  # [B*L, V]
    target = target.reshape(-1)
    ignore = target == ignore_id
    off, on = smoothing / (V - 1), 1.0 - smoothing
    q = torch.full_like(logp, off).scatter_(1, target.masked_fill(ignore, 0).unsqueeze(1), on)
    kl = torch.xlogy(q, q) - q * logp  # [B*L, V]
    total = kl.masked_fill(ignore.unsqueeze(1), 0.0).sum()
    return total / (int((~ignore).sum()) if normalize_length else B)


def convert_espnet_decoder_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "decoder.") -> dict:
    """Select an ESPnet/Dolphin model's `decoder.*` tensors and strip the prefix (names already match)."""
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no '{prefix}*' keys in the state dict (first keys: {list(state_dict)[:5]})")
    out.pop("embed.1.pe", None)  # very old ESPnet saved the position table
    return out
