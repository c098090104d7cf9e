"""Vision Transformer patch encoder (ViT, arXiv 2010.11929) with timm weight names, and converters from timm / HF CLIP.

One image flows through: pixels [B, C, H, W] -> strided conv patches -> [CLS] + patches + position table
-> optional `norm_pre` (CLIP) -> pre-norm blocks -> optional final `norm`. Every intermediate can be taken out:
`hidden_states()[0]` is the embedding after `norm_pre`, `hidden_states()[i]` the output of block i (HF indexing).
Weight names are timm's (`cls_token`, `pos_embed`, `patch_embed.proj`, `norm_pre`, `blocks.N.*`, `norm`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from decoders.checkpoint import CheckpointError, check_config_keys
from decoders.linear import Linear


@dataclass
class ViTConfig:
    """Shape of a ViT; round-trips through `to_dict`/`from_dict` (config.json).

    pre_norm: CLIP's extra LayerNorm on the embeddings (`norm_pre`); the patch conv then has no bias.
    act: "gelu" (exact erf GELU, timm/Google ViT) or "quick_gelu" (`x * sigmoid(1.702 x)`, OpenAI CLIP).
    pos_embed_antialias: how the position table is resized for other image sizes; True = timm
        (`resample_abs_pos_embed`), False = HF `interpolate_pos_encoding` (plain bicubic).
    """

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    act: str = "gelu"
    pre_norm: bool = False
    norm_eps: float = 1e-6
    class_token: bool = True
    final_norm: bool = True
    qkv_bias: bool = True
    pos_embed_antialias: bool = True

    def __post_init__(self):
        if self.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"ViTConfig.act must be 'gelu' or 'quick_gelu', got {self.act!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"ViTConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        """Patches per side at `image_size`."""
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (the class token, if any)."""
        return int(self.class_token)

    def to_dict(self) -> dict:
        """Plain dict for config.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        """Inverse of `to_dict`; unknown keys are an error (they usually mean a typo or another format)."""
        check_config_keys(cls, d)
        return cls(**d)

    @classmethod
    def from_hf_clip_vision(cls, d: dict) -> "ViTConfig":
        """Config from an HF `CLIPVisionConfig` dict (or a CLIP / LLaVA config dict holding `vision_config`)."""
        if "vision_config" in d:
            d = d["vision_config"]
        # missing keys take CLIPVisionConfig's defaults, as HF does (LLaVA configs list only non-defaults)
        image_size, patch_size = d.get("image_size", 224), d.get("patch_size", 32)
        for name, v in (("image_size", image_size), ("patch_size", patch_size)):
            if isinstance(v, (list, tuple)):
                if len(v) != 2 or v[0] != v[1]:
                    raise ValueError(f"CLIP vision config: only square {name} is supported, got {v}")
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
        patch_size = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
        act = d.get("hidden_act", "quick_gelu")
        if act not in ("gelu", "quick_gelu"):
            raise ValueError(f"CLIP vision config: hidden_act {act!r} is not supported (gelu, quick_gelu)")
        return cls(
            image_size=image_size,
            patch_size=patch_size,
            in_chans=d.get("num_channels", 3),
            dim=d.get("hidden_size", 768),
            depth=d.get("num_hidden_layers", 12),
            num_heads=d.get("num_attention_heads", 12),
            mlp_dim=d.get("intermediate_size", 3072),
            act=act,
            pre_norm=True,
            norm_eps=d.get("layer_norm_eps", 1e-5),
            class_token=True,
            final_norm=True,
            qkv_bias=True,
            pos_embed_antialias=False,
        )

    @classmethod
    def from_timm(cls, model: nn.Module | str, **kwargs) -> "ViTConfig":
        """Config of a timm `VisionTransformer`, given the model or its name (+ create_model kwargs, e.g. depth=3).

        By name, the model is built on the meta device, so no memory is spent and nothing is downloaded.
        Features this ViT does not have (register tokens, layer scale, qk-norm, ...) raise ValueError.
        """
        if isinstance(model, str):
            import timm

            with torch.device("meta"):
                model = timm.create_model(model, pretrained=False, **kwargs)
        elif kwargs:
            raise ValueError("ViTConfig.from_timm: kwargs only apply when a model name is given")
        name = type(model).__name__
        blk = model.blocks[0]
        unsupported = {
            "not a VisionTransformer": name != "VisionTransformer",
            "non-standard block": type(blk).__name__ != "Block",
            "register tokens": getattr(model, "reg_token", None) is not None,
            "no_embed_class": getattr(model, "no_embed_class", False),
            "no pos_embed": getattr(model, "pos_embed", None) is None,
            "layer scale (ls1/ls2)": not isinstance(blk.ls1, nn.Identity),
            "qk norm": not isinstance(blk.attn.q_norm, nn.Identity),
            "attention/mlp scale norm": not isinstance(getattr(blk.attn, "norm", nn.Identity()), nn.Identity)
            or not isinstance(getattr(blk.mlp, "norm", nn.Identity()), nn.Identity),
            "patch embed norm": not isinstance(getattr(model.patch_embed, "norm", nn.Identity()), nn.Identity),
            "non-square image": model.patch_embed.img_size[0] != model.patch_embed.img_size[1],
            "attention pooling": getattr(model, "attn_pool", None) is not None,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"ViTConfig.from_timm: timm model has features this ViT lacks: {', '.join(bad)}")
        act = type(blk.mlp.act).__name__
        if act == "GELU" and blk.mlp.act.approximate == "none":
            act = "gelu"
        elif act == "QuickGELU":
            act = "quick_gelu"
        else:
            raise ValueError(f"ViTConfig.from_timm: activation {blk.mlp.act} is not supported (GELU, QuickGELU)")
        return cls(
            image_size=model.patch_embed.img_size[0],
            patch_size=model.patch_embed.patch_size[0],
            in_chans=model.patch_embed.proj.in_channels,
            dim=model.embed_dim,
            depth=len(model.blocks),
            num_heads=blk.attn.num_heads,
            mlp_dim=blk.mlp.fc1.out_features,
            act=act,
            pre_norm=not isinstance(model.norm_pre, nn.Identity),
            norm_eps=blk.norm1.eps,
            class_token=model.cls_token is not None,
            final_norm=not isinstance(model.norm, nn.Identity),
            qkv_bias=blk.attn.qkv.bias is not None,
            pos_embed_antialias=True,
        )


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1, antialias: bool = True
) -> torch.Tensor:
    """Resize the patch-grid part of a square position table [1, P+N, D] bicubically; prefix (CLS) rows are kept.

    antialias=True gives timm's `resample_abs_pos_embed`, False HF CLIP's `interpolate_pos_encoding`.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"position table has {grid.shape[1]} patch entries, not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)  # [1, D, old, old]
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)  # [1, h*w, D]
    return torch.cat([prefix, grid], dim=1)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation."""
    return x * torch.sigmoid(1.702 * x)


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv (holds `patch_embed.proj`)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=p, stride=p, bias=not cfg.pre_norm)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # [B, h*w, D]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and SDPA."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.dim // cfg.num_heads
        self.qkv = Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, T, hd]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """fc1 -> GELU/QuickGELU -> fc2."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = Linear(cfg.mlp_dim, cfg.dim)
        self.act = quick_gelu if cfg.act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT patch encoder returning token features [B, 1+N, D] of any layer (no classifier head)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        n = cfg.grid_size**2 + cfg.num_prefix_tokens
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n, cfg.dim))
        self.norm_pre = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch + class tokens with position embeddings, after `norm_pre`: hidden state 0, [B, 1+N, D]."""
        B, C, H, W = pixels.shape
        p = self.cfg.patch_size
        if H % p or W % p or C != self.cfg.in_chans:
            raise ValueError(f"ViT: pixels of shape {tuple(pixels.shape)} need {self.cfg.in_chans} channels and "
                             f"height/width divisible by the patch size {p}")
        x = self.patch_embed(pixels.to(self.patch_embed.proj.weight.dtype))  # [B, N, D]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # [B, 1+N, D]
        pos = resample_pos_embed(self.pos_embed, (H // p, W // p), self.cfg.num_prefix_tokens,
                                 self.cfg.pos_embed_antialias)
        return self.norm_pre(x + pos)

    def hidden_states(self, pixels: torch.Tensor, layers: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Hidden states [B, 1+N, D] at `layers` (HF indexing: 0 = embeddings, i = block i's output,
        negatives count from depth); all depth+1 when None. Blocks after the deepest asked-for layer are skipped."""
        n = self.cfg.depth + 1
        layers = list(range(n)) if layers is None else list(layers)
        for i in layers:
            if not -n <= i < n:
                raise IndexError(f"ViT: layer {i} out of range for {self.cfg.depth} blocks (valid {-n}..{n - 1})")
        want = [i % n for i in layers]
        if not want:
            return []
        keep = set(want)
        x = self.embed(pixels)
        out = {0: x} if 0 in keep else {}
        for i in range(1, max(want) + 1):
            x = self.blocks[i - 1](x)
            if i in keep:  # hold on only to what was asked for
                out[i] = x
        return [out[i] for i in want]

    def forward(self, pixels: torch.Tensor, layer: int = -1, final_norm: bool = True) -> torch.Tensor:
        """Token features [B, 1+N, D] of hidden state `layer` (HF indexing), with the final norm if asked.

        layer=-1, final_norm=True is timm's `forward_features`; LLaVA takes layer=-2, final_norm=False.
        """
        x = self.hidden_states(pixels, [layer])[0]
        return self.norm(x) if final_norm else x


def convert_timm_state_dict(sd: dict[str, torch.Tensor], cfg: ViTConfig | None = None) -> dict[str, torch.Tensor]:
    """timm VisionTransformer state dict -> ours: same names; the classifier (`head`, `fc_norm`) is dropped.

    `fc_norm` only normalises the pooled vector that feeds `head`, which this encoder does not compute.
    With `cfg`, a position table for another grid is resized to cfg's grid (as timm's checkpoint filter does).
    """
    out = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    for k in ("reg_token", "attn_pool.latent"):
        if k in out:
            raise CheckpointError(f"timm state dict: {k!r} is a feature this ViT does not have")
    if cfg is not None and "pos_embed" in out:
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], (cfg.grid_size, cfg.grid_size),
                                              cfg.num_prefix_tokens, cfg.pos_embed_antialias)
    return out


_HF_CLIP_NAMES = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def convert_hf_clip_vision_state_dict(
    sd: dict[str, torch.Tensor], cfg: ViTConfig | None = None
) -> dict[str, torch.Tensor]:
    """HF CLIP vision tower state dict -> ours (timm names). REFERENCE.md section 2.

    The prefix before `embeddings.class_embedding` (none, `vision_model.`, `vision_tower.vision_model.`,
    `model.vision_tower.vision_model.`, ...) is found and stripped; keys outside it (text tower, projector,
    language model) are ignored. With `cfg`, the position table is resized to cfg's grid.
    """
    anchors = [k for k in sd if k.endswith("embeddings.class_embedding")]
    if len(anchors) != 1:
        raise CheckpointError(f"HF CLIP vision state dict: expected one '*embeddings.class_embedding' key, "
                              f"found {anchors or 'none'}")
    prefix = anchors[0][: -len("embeddings.class_embedding")]
    src = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    src.pop("embeddings.position_ids", None)  # a buffer older checkpoints saved
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in src.items():
        if k == "embeddings.class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "embeddings.patch_embedding.weight":
            out["patch_embed.proj.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out["pos_embed"] = v.unsqueeze(0)
        elif k.startswith("pre_layrnorm."):
            out["norm_pre." + k.split(".", 1)[1]] = v
        elif k.startswith("post_layernorm."):
            out["norm." + k.split(".", 1)[1]] = v
        elif k.startswith("encoder.layers."):
            _, _, n, rest = k.split(".", 3)
            sub, param = rest.rsplit(".", 1)
            if sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(int(n), {})[sub.split(".")[1][0] + "." + param] = v  # "q.weight", ...
            elif sub in _HF_CLIP_NAMES:
                out[f"blocks.{n}.{_HF_CLIP_NAMES[sub]}.{param}"] = v
            else:
                raise CheckpointError(f"HF CLIP vision state dict: unknown key {prefix + k!r}")
        else:
            raise CheckpointError(f"HF CLIP vision state dict: unknown key {prefix + k!r}")
    for n, parts in qkv.items():
        for param in ("weight", "bias"):
            got = [parts.get(f"{c}.{param}") for c in "qkv"]
            if any(t is None for t in got):
                missing = [f"{prefix}encoder.layers.{n}.self_attn.{c}_proj.{param}" for c, t in zip("qkv", got) if t is None]
                raise CheckpointError(f"HF CLIP vision state dict: missing {missing}")
            out[f"blocks.{n}.attn.qkv.{param}"] = torch.cat(got, dim=0)  # [3D, D] / [3D]
    if cfg is not None and "pos_embed" in out:
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], (cfg.grid_size, cfg.grid_size),
                                              cfg.num_prefix_tokens, cfg.pos_embed_antialias)
    return out
