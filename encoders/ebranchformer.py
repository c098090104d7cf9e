"""E-Branchformer speech encoder (Kim et al., SLT 2022) as used by ESPnet, OWSM v3.1 and Dolphin.

One utterance flows: log-mel feats [B, T, 80] -> Conv2dSubsampling4 -> x*sqrt(d) (+ positions) [B, T', d]
-> num_blocks x EBranchformerLayer -> after_norm -> [B, T', d], T' = ((T - 1)//2 - 1)//2.

Each layer (macaron FFN halves around two parallel branches, merged by a depthwise conv):
    x = x + 0.5 * FFN(norm_ff_macaron(x))
    x1 = attention(norm_mha(x))             global branch (rel-pos or abs-pos multi-head attention)
    x2 = cgMLP(norm_mlp(x))                 local branch (convolutional gating MLP)
    c = [x1, x2];  x = x + merge_proj(c + depthwise_conv_fusion(c))
    x = x + 0.5 * FFN(norm_ff(x));  x = norm_final(x)

Weight names equal ESPnet's `EBranchformerEncoder` (minus the `encoder.` prefix), so converting an ESPnet
checkpoint is selecting keys. Like ESPnet, the convolutions see padded frames: outputs of a padded batch
match ESPnet's padded batch, not the same utterances run one by one. The attention modules and positions are
in `encoders/espnet_attention.py`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from decoders.checkpoint import check_config_keys
from decoders.linear import Linear, linear
from encoders.espnet_attention import (MultiHeadedAttention, PositionalEncoding, RelPositionalEncoding,
                                       RelPositionMultiHeadedAttention)

LAYER_NORM_EPS = 1e-12  # ESPnet's LayerNorm
SUBSAMPLING = 4  # Conv2dSubsampling (two stride-2 convolutions): one encoder frame per 4 feature frames
ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh, "hardtanh": nn.Hardtanh, "selu": nn.SELU}


class SpeechTooShortError(ValueError):
    """An input with fewer frames than the subsampling needs; says how many it had and the minimum."""


@dataclass
class EBranchformerConfig:
    """E-Branchformer hyper-parameters, named as in ESPnet's `encoder_conf` (defaults are ESPnet's).

    Dolphin: rel_pos + rel_selfattn (Transformer-XL positions), use_ffn + macaron_ffn, merge kernel 31.
    OWSM v3.1: abs_pos + selfattn (sinusoids added to the input, plain attention).
    """

    input_size: int = 80  # mel bins from the front end
    output_size: int = 256  # d
    attention_heads: int = 4
    attention_layer_type: str = "rel_selfattn"  # "rel_selfattn" | "selfattn"
    pos_enc_layer_type: str = "rel_pos"  # "rel_pos" | "abs_pos"
    rel_pos_type: str = "latest"  # only "latest" (ESPnet PR 2816); "legacy" is not supported
    cgmlp_linear_units: int = 2048
    cgmlp_conv_kernel: int = 31
    use_linear_after_conv: bool = False
    gate_activation: str = "identity"
    num_blocks: int = 12
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    input_layer: str = "conv2d"  # 4x Conv2dSubsampling, the only one supported
    zero_triu: bool = False
    layer_drop_rate: float = 0.0
    use_ffn: bool = False
    macaron_ffn: bool = False
    ffn_activation_type: str = "swish"
    linear_units: int = 2048
    merge_conv_kernel: int = 3

    def __post_init__(self):
        pairs = {("rel_selfattn", "rel_pos"), ("selfattn", "abs_pos")}
        if (self.attention_layer_type, self.pos_enc_layer_type) not in pairs:
            raise ValueError(
                f"attention_layer_type={self.attention_layer_type!r} with pos_enc_layer_type="
                f"{self.pos_enc_layer_type!r} is not supported; use rel_selfattn+rel_pos or selfattn+abs_pos"
            )
        if self.rel_pos_type != "latest":
            raise ValueError(f"rel_pos_type={self.rel_pos_type!r} is not supported (only 'latest')")
        if self.input_layer != "conv2d":
            raise ValueError(f"input_layer={self.input_layer!r} is not supported (only 'conv2d')")
        if self.zero_triu:
            raise ValueError("zero_triu=True is not supported")
        if self.output_size % 2 or self.output_size % self.attention_heads:
            raise ValueError(
                f"output_size {self.output_size} must be even and a multiple of {self.attention_heads} heads"
            )
        if self.cgmlp_linear_units % 2:
            raise ValueError(f"cgmlp_linear_units must be even (it is split in two), got {self.cgmlp_linear_units}")
        for name in ("cgmlp_conv_kernel", "merge_conv_kernel"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"{name} must be odd to keep the length ('same' padding), got {getattr(self, name)}")
        if self.input_size < Conv2dSubsampling4.MIN_FRAMES:
            raise ValueError(f"input_size {self.input_size} is too small for conv2d subsampling (minimum 7)")
        if self.gate_activation != "identity" and self.gate_activation not in ACTIVATIONS:
            raise ValueError(f"gate_activation {self.gate_activation!r} not in identity/{'/'.join(ACTIVATIONS)}")
        if self.ffn_activation_type not in ACTIVATIONS:
            raise ValueError(f"ffn_activation_type {self.ffn_activation_type!r} not in {'/'.join(ACTIVATIONS)}")

    # encoder_conf keys that do not change the numbers of inference
    _ESPNET_IGNORED = (
        "use_flash_attn", "gradient_checkpoint_layers", "padding_idx", "max_pos_emb_len",
        "interctc_layer_idx", "positionwise_layer_type", "qk_norm", "interctc_use_conditioning",
    )  # fmt: skip

    @classmethod
    def from_espnet(cls, encoder_conf: dict, input_size: int = 80) -> "EBranchformerConfig":
        """Build from ESPnet's `encoder_conf` (config.yaml, encoder: e_branchformer); input_size is the mel count."""
        conf = dict(encoder_conf or {})
        if conf.get("positionwise_layer_type", "linear") != "linear":
            raise ValueError(f"encoder_conf: positionwise_layer_type={conf['positionwise_layer_type']!r} unsupported")
        if conf.get("qk_norm", False):
            raise ValueError("encoder_conf: qk_norm=True is not supported")
        if conf.get("interctc_use_conditioning", False):
            raise ValueError("encoder_conf: interctc_use_conditioning=True is not supported")
        for key in cls._ESPNET_IGNORED:
            conf.pop(key, None)
        conf.setdefault("input_size", input_size)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(conf) - names)
        if unknown:
            raise ValueError(f"encoder_conf: unknown keys {unknown}")
        return cls(**conf)

    def to_dict(self) -> dict:
        """Plain dict for config.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EBranchformerConfig":
        """Inverse of to_dict; unknown keys are an error."""
        check_config_keys(cls, d)
        return cls(**d)


# ----------------------------------------------------------------------------------------------- subsampling


class Conv2dSubsampling4(nn.Module):
    """[B, T, F] -> [B, T', d]: two 3x3 stride-2 convs + ReLU, channel-major flatten, linear; T' = ((T-1)//2-1)//2."""

    MIN_FRAMES = 7  # the smallest T with T' >= 1

    def __init__(self, input_size: int, d: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, d, 3, 2), nn.ReLU(), nn.Conv2d(d, d, 3, 2), nn.ReLU())
        # a Sequential so the key is `embed.out.0` as in ESPnet (which keeps its positional encoding at out.1)
        self.out = nn.Sequential(Linear(d * (((input_size - 1) // 2 - 1) // 2), d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(1) < self.MIN_FRAMES:
            raise SpeechTooShortError(
                f"input has {x.size(1)} frames; conv2d subsampling needs at least {self.MIN_FRAMES} frames "
                f"(60 ms of audio at a 10 ms hop)"
            )
        conv1, _, conv2, _ = self.conv
        # The first convolution (one input channel) as a product of 3x3 patches; its output [B, T1, F1, d] is the
        # channels-last layout in which oneDNN runs the second one ~2x faster (10 s of audio, d = 512: both 130 ->
        # 70 ms); the same numbers as self.conv up to the order of float32 sums.
        # ReLUs in place: a new 40 MB tensor (10 s) costs ~8 ms of page faults, more than the ReLU itself.
        B, T, Fr = x.shape
        patches = F.unfold(x[:, None], 3, stride=2).transpose(1, 2).reshape(-1, 9)  # [B T1 F1, 9]
        h = linear(patches, conv1.weight.view(conv1.out_channels, 9), conv1.bias).relu_()  # [B T1 F1, d]
        h = h.view(B, (T - 1) // 2, (Fr - 1) // 2, -1).permute(0, 3, 1, 2)  # [B, d, T1, F1], channels-last
        x = conv2(h).relu_()  # [B, d, T', F']
        b, c, t, f = x.shape
        return self.out[0](x.transpose(1, 2).reshape(b, t, c * f))  # [B, T', d]

    @staticmethod
    def output_lengths(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """Valid output frames per utterance of a batch padded to `max_len`, as ESPnet counts them.

        ESPnet subsamples the padding mask with `[:-2:2]` twice, so an utterance shorter than the batch keeps
        ceil(L/2) frames per stage (at most (T-1)//2): up to two more frames than its own convolution yields.
        The longest utterance gets exactly ((L-1)//2 - 1)//2.
        """
        for _ in range(2):
            max_len = (max_len - 1) // 2
            lengths = torch.clamp((lengths + 1) // 2, max=max_len)
        return lengths


# ----------------------------------------------------------------------------------------------- cgMLP, FFN


def depthwise_conv_over_time(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """conv(x.transpose(1, 2)).transpose(1, 2) for a depthwise `conv` and x [B, T, C] -> [B, T, C], computed as a
    2-D convolution on x's own time-major layout (channels-last to oneDNN), whose depthwise kernel runs there ~14x
    faster than on the channel-major copy conv1d makes (1024 channels, 249 frames, kernel 31: 4.4 -> 0.3 ms)."""
    y = F.conv2d(x.contiguous().transpose(1, 2)[:, :, None], conv.weight[:, :, None], conv.bias,
                 padding=(0, conv.padding[0]), groups=conv.groups)  # [B, C, 1, T], channels-last
    return y[:, :, 0].transpose(1, 2)


class ConvolutionalSpatialGatingUnit(nn.Module):
    """CSGU: split channels into (x_r, x_g); gate x_r by a depthwise conv over time of norm(x_g)."""

    def __init__(
        self, units: int, kernel_size: int, dropout_rate: float, use_linear_after_conv: bool, gate_activation: str
    ):
        super().__init__()
        n = units // 2
        self.norm = nn.LayerNorm(n, eps=LAYER_NORM_EPS)
        self.conv = nn.Conv1d(n, n, kernel_size, 1, (kernel_size - 1) // 2, groups=n)
        self.linear = Linear(n, n) if use_linear_after_conv else None
        self.act = nn.Identity() if gate_activation == "identity" else ACTIVATIONS[gate_activation]()
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, U] -> [B, T, U/2]."""
        x_r, x_g = x.chunk(2, dim=-1)
        x_g = depthwise_conv_over_time(self.conv, self.norm(x_g))  # [B, T, U/2]
        if self.linear is not None:
            x_g = self.linear(x_g)
        return self.dropout(x_r * self.act(x_g))


class ConvolutionalGatingMLP(nn.Module):
    """cgMLP (Sakuma et al. 2021): Linear(d, U) + GELU -> CSGU -> Linear(U/2, d)."""

    def __init__(
        self, d: int, units: int, kernel_size: int, dropout_rate: float, use_linear_after_conv: bool,
        gate_activation: str,
    ):  # fmt: skip
        super().__init__()
        self.channel_proj1 = nn.Sequential(Linear(d, units), nn.GELU())
        self.csgu = ConvolutionalSpatialGatingUnit(
            units, kernel_size, dropout_rate, use_linear_after_conv, gate_activation
        )
        self.channel_proj2 = Linear(units // 2, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, d] -> [B, T, d]."""
        return self.channel_proj2(self.csgu(self.channel_proj1(x)))


class PositionwiseFeedForward(nn.Module):
    """FFN = w_2(dropout(act(w_1 x))), swish by default."""

    def __init__(self, d: int, units: int, dropout_rate: float, activation: str):
        super().__init__()
        self.w_1 = Linear(d, units)
        self.w_2 = Linear(units, d)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(self.act(self.w_1(x))))


# ----------------------------------------------------------------------------------------------- layer, encoder


class EBranchformerLayer(nn.Module):
    """One E-Branchformer block: [macaron FFN/2] -> attention || cgMLP -> depthwise-conv merge -> [FFN/2] -> norm."""

    def __init__(self, c: EBranchformerConfig):
        super().__init__()
        d = c.output_size
        if c.attention_layer_type == "rel_selfattn":
            self.attn = RelPositionMultiHeadedAttention(d, c.attention_heads, c.attention_dropout_rate)
        else:
            self.attn = MultiHeadedAttention(d, c.attention_heads, c.attention_dropout_rate)
        self.cgmlp = ConvolutionalGatingMLP(
            d, c.cgmlp_linear_units, c.cgmlp_conv_kernel, c.dropout_rate, c.use_linear_after_conv, c.gate_activation
        )
        self.feed_forward = self.feed_forward_macaron = None
        ffn_args = (d, c.linear_units, c.dropout_rate, c.ffn_activation_type)
        if c.use_ffn:
            self.feed_forward = PositionwiseFeedForward(*ffn_args)
            self.norm_ff = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        if c.use_ffn and c.macaron_ffn:
            self.feed_forward_macaron = PositionwiseFeedForward(*ffn_args)
            self.norm_ff_macaron = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.ff_scale = 0.5 if self.feed_forward_macaron is not None else 1.0  # two halves make one FFN
        self.norm_mha = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.norm_mlp = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.norm_final = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        k = c.merge_conv_kernel
        self.depthwise_conv_fusion = nn.Conv1d(2 * d, 2 * d, k, 1, (k - 1) // 2, groups=2 * d)
        self.merge_proj = Linear(2 * d, d)
        self.dropout = nn.Dropout(c.dropout_rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, d], mask [B, T] (True = real frame), pos_emb [1, 2T-1, d] or None -> [B, T, d]."""
        if self.feed_forward_macaron is not None:
            x = x + self.ff_scale * self.dropout(self.feed_forward_macaron(self.norm_ff_macaron(x)))
        x1 = self.dropout(self.attn(self.norm_mha(x), mask, pos_emb))  # global branch
        x2 = self.dropout(self.cgmlp(self.norm_mlp(x)))  # local branch
        both = torch.cat([x1, x2], dim=-1)  # [B, T, 2d]
        fused = depthwise_conv_over_time(self.depthwise_conv_fusion, both)  # [B, T, 2d]
        x = x + self.dropout(self.merge_proj(both + fused))
        if self.feed_forward is not None:
            x = x + self.ff_scale * self.dropout(self.feed_forward(self.norm_ff(x)))
        return self.norm_final(x)


class EBranchformerEncoder(nn.Module):
    """Log-mel feats [B, T, F] with lengths -> encoder states [B, T', d] with lengths (ESPnet EBranchformerEncoder)."""

    def __init__(self, config: EBranchformerConfig):
        super().__init__()
        self.config = c = config
        self.embed = Conv2dSubsampling4(c.input_size, c.output_size)
        if c.pos_enc_layer_type == "rel_pos":
            self.pos_enc = RelPositionalEncoding(c.output_size, c.positional_dropout_rate)
        else:
            self.pos_enc = PositionalEncoding(c.output_size, c.positional_dropout_rate)
        self.encoders = nn.ModuleList(EBranchformerLayer(c) for _ in range(c.num_blocks))
        self.after_norm = nn.LayerNorm(c.output_size, eps=LAYER_NORM_EPS)

    def output_size(self) -> int:
        """d, the width of the encoder states."""
        return self.config.output_size

    def forward(self, feats: torch.Tensor, feat_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, T, F], feat_lengths [B] -> (enc [B, T', d], enc_lengths [B]); frames past a length are padding."""
        if feats.dim() != 3 or feats.size(-1) != self.config.input_size:
            raise ValueError(f"feats must be [B, T, {self.config.input_size}], got shape {tuple(feats.shape)}")
        if feat_lengths.shape != (feats.size(0),):
            raise ValueError(f"feat_lengths must be [B]={feats.size(0)}, got shape {tuple(feat_lengths.shape)}")
        T = feats.size(1)
        if bool((feat_lengths < 1).any()) or bool((feat_lengths > T).any()):
            raise ValueError(f"feat_lengths must lie in 1..{T} (the padded length), got {feat_lengths.tolist()}")
        x = self.embed(feats)  # [B, T', d]
        enc_lengths = Conv2dSubsampling4.output_lengths(feat_lengths.to(x.device).long(), T)
        mask = torch.arange(x.size(1), device=x.device)[None, :] < enc_lengths[:, None]  # [B, T'] True = real
        x, pos_emb = self.pos_enc(x)
        for layer in self.encoders:
            # LayerDrop (Fan et al. 2019) skips whole blocks while training
            if self.training and self.config.layer_drop_rate > 0 and torch.rand(1).item() < self.config.layer_drop_rate:
                continue
            x = layer(x, mask, pos_emb)
        return self.after_norm(x), enc_lengths
