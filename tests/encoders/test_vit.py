"""ViT parity against timm (`forward_intermediates`, dynamic image size) and HF `CLIPVisionModel`, on random weights."""
import json

import pytest
import timm
import torch

from decoders.checkpoint import CheckpointError, load_state_dict_strict, read_json, read_safetensors
from encoders.vit import (
    ViT,
    ViTConfig,
    convert_hf_clip_vision_state_dict,
    convert_timm_state_dict,
    resample_pos_embed,
)

TOL = 1e-5


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Perturb every parameter so zero biases / unit norms cannot hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _timm_hidden_states(m, x):
    """timm's own hidden states: index 0 from its embedding path, then `forward_intermediates` per block."""
    emb = m.norm_pre(m._pos_embed(m.patch_embed(x)))
    blocks = m.forward_intermediates(x, indices=None, output_fmt="NLC", return_prefix_tokens=True,
                                     intermediates_only=True)
    if not m.num_prefix_tokens:
        return [emb] + blocks
    return [emb] + [torch.cat([prefix, tokens], dim=1) for tokens, prefix in blocks]


def _ours_from_timm(m, **cfg_overrides):
    cfg = ViTConfig.from_timm(m)
    if cfg_overrides:
        cfg = ViTConfig.from_dict({**cfg.to_dict(), **cfg_overrides})
    ours = ViT(cfg).eval()
    load_state_dict_strict(ours, convert_timm_state_dict(m.state_dict(), cfg), "timm")
    return ours


def _max_err(a, b):
    """The largest difference, relative to b's largest magnitude when that exceeds 1: float32 products summed in
    another order (ours on oneDNN, timm's on MKL) differ by ~1e-6 of the values (checked against float64 below)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def test_config_round_trip_and_unknown_keys():
    cfg = ViTConfig(image_size=56, patch_size=14, dim=64, depth=2, num_heads=4, mlp_dim=96, act="quick_gelu",
                    pre_norm=True, norm_eps=1e-5, pos_embed_antialias=False)
    assert ViTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown keys.*'dims'"):
        ViTConfig.from_dict({**cfg.to_dict(), "dims": 3})
    with pytest.raises(ValueError, match="act"):
        ViTConfig(act="relu")


def test_timm_config_by_name():
    # the real timm architectures, built on the meta device (no memory, no download)
    base = ViTConfig.from_timm("vit_base_patch16_224")
    assert (base.image_size, base.patch_size, base.dim, base.depth, base.num_heads, base.mlp_dim) == (
        224, 16, 768, 12, 12, 3072)
    assert (base.act, base.pre_norm, base.norm_eps, base.final_norm) == ("gelu", False, 1e-6, True)
    large = ViTConfig.from_timm("vit_large_patch14_clip_336")
    assert (large.image_size, large.patch_size, large.dim, large.depth, large.num_heads, large.mlp_dim) == (
        336, 14, 1024, 24, 16, 4096)
    assert (large.act, large.pre_norm, large.norm_eps) == ("gelu", True, 1e-5)
    assert ViTConfig.from_timm("vit_large_patch14_clip_quickgelu_336").act == "quick_gelu"
    assert ViTConfig.from_timm("vit_base_patch16_224", depth=3).depth == 3
    # a model built on the meta device from our config has exactly timm's parameter names and shapes
    with torch.device("meta"):
        ours = ViT(large)
        theirs = timm.create_model("vit_large_patch14_clip_336", pretrained=False)
    expected = {k: v.shape for k, v in ours.state_dict().items()}
    converted = convert_timm_state_dict(theirs.state_dict())
    assert {k: v.shape for k, v in converted.items()} == expected


def test_timm_unsupported_features_are_refused():
    m = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=1,
                          num_heads=2, reg_tokens=2)
    with pytest.raises(ValueError, match="register tokens"):
        ViTConfig.from_timm(m)
    m = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=1,
                          num_heads=2, init_values=1e-5)
    with pytest.raises(ValueError, match="layer scale"):
        ViTConfig.from_timm(m)


@torch.no_grad()
def test_timm_vit_base_patch16_224_parity():
    # timm's real vit_base_patch16_224 (768 wide, 12 heads, 224 px, GELU, eps 1e-6), depth reduced 12 -> 3 for speed
    m = timm.create_model("vit_base_patch16_224", pretrained=False, depth=3).eval()
    _randomize(m)
    ours = _ours_from_timm(m)
    assert ours.cfg == ViTConfig.from_timm("vit_base_patch16_224", depth=3)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ref = _timm_hidden_states(m, x)
    got = ours.hidden_states(x)
    assert len(got) == len(ref) == 4
    errs = [_max_err(a, b) for a, b in zip(got, ref)]
    assert max(errs) < TOL, errs
    assert _max_err(ours(x), m.forward_features(x)) < TOL  # layer -1 with the final norm
    assert _max_err(ours(x, layer=-2, final_norm=False), ref[-2]) < TOL
    assert _max_err(ours(x, layer=1, final_norm=True), m.norm(ref[1])) < TOL
    exact = _timm_hidden_states(m.double(), x.double())  # as close to float64 as timm's own float32 forward
    for a, b, c in zip(got, ref, exact):
        assert (a.double() - c).abs().max() <= 2 * (b.double() - c).abs().max() + 1e-6


@torch.no_grad()
def test_timm_clip_quickgelu_pre_norm_parity():
    # CLIP tower layout (norm_pre, bias-free patch conv, QuickGELU, eps 1e-5), shrunk
    m = timm.create_model("vit_large_patch14_clip_quickgelu_336", pretrained=False, img_size=56, embed_dim=64,
                          depth=3, num_heads=4, mlp_ratio=2.0).eval()
    _randomize(m, seed=2)
    ours = _ours_from_timm(m)
    assert (ours.cfg.act, ours.cfg.pre_norm, ours.cfg.norm_eps, ours.cfg.mlp_dim) == ("quick_gelu", True, 1e-5, 128)
    assert ours.patch_embed.proj.bias is None
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    errs = [_max_err(a, b) for a, b in zip(ours.hidden_states(x), _timm_hidden_states(m, x))]
    assert len(errs) == 4 and max(errs) < TOL, errs
    assert _max_err(ours(x), m.forward_features(x)) < TOL


@torch.no_grad()
def test_timm_no_class_token_avg_pool_parity():
    # global average pooling: timm moves the final norm to `fc_norm` (pooled-vector only), which we drop
    m = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=48, embed_dim=48, depth=2,
                          num_heads=3, class_token=False, global_pool="avg", qkv_bias=False).eval()
    _randomize(m, seed=9)
    assert "fc_norm.weight" in m.state_dict() and "head.weight" in m.state_dict()
    ours = _ours_from_timm(m)
    assert (ours.cfg.class_token, ours.cfg.final_norm, ours.cfg.qkv_bias) == (False, False, False)
    assert ours.cls_token is None and ours.pos_embed.shape == (1, 9, 48)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(10))
    errs = [_max_err(a, b) for a, b in zip(ours.hidden_states(x), _timm_hidden_states(m, x))]
    assert len(errs) == 3 and max(errs) < TOL, errs
    assert _max_err(ours(x), m.forward_features(x)) < TOL


@torch.no_grad()
@pytest.mark.parametrize("size", [(84, 84), (42, 98)])
def test_timm_other_image_size_resized_pos_embed(size):
    # timm's dynamic-size path resamples the 4x4 table with resample_abs_pos_embed (bicubic, antialias)
    m = timm.create_model("vit_large_patch14_clip_quickgelu_336", pretrained=False, img_size=56, embed_dim=64,
                          depth=2, num_heads=4, dynamic_img_size=True).eval()
    _randomize(m, seed=4)
    ours = _ours_from_timm(m)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    errs = [_max_err(a, b) for a, b in zip(ours.hidden_states(x), _timm_hidden_states(m, x))]
    assert max(errs) < TOL, errs
    if size[0] == size[1]:
        # a checkpoint resampled by the converter to the new size gives the same numbers without resizing per call
        ours84 = _ours_from_timm(m, image_size=size[0])
        assert ours84.pos_embed.shape[1] == 1 + 36
        assert _max_err(ours84(x), m.forward_features(x)) < TOL


def test_resample_pos_embed_keeps_cls_and_identity():
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pe, (4, 4)) is pe
    out = resample_pos_embed(pe, (6, 5))
    assert out.shape == (1, 31, 8) and torch.equal(out[:, :1], pe[:, :1])
    # a constant table stays constant under bicubic resizing (weights sum to one)
    const = torch.ones(1, 17, 8)
    assert _max_err(resample_pos_embed(const, (7, 7), antialias=False)[:, 1:], torch.ones(1, 49, 8)) < 1e-6
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(torch.randn(1, 1 + 15, 8), (4, 4))


def _hf_clip(tmp_path, act="quick_gelu"):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf_cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14, hidden_act=act, layer_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = CLIPVisionModel(hf_cfg).eval()
    _randomize(hf, seed=6)
    hf.save_pretrained(tmp_path)
    return hf


def _load_ours_hf(path, cfg_overrides=None):
    """The way a user loads a saved HF CLIP vision tower: config.json + model.safetensors through our converter."""
    cfg = ViTConfig.from_hf_clip_vision(read_json(path / "config.json"))
    if cfg_overrides:
        cfg = ViTConfig.from_dict({**cfg.to_dict(), **cfg_overrides})
    sd = convert_hf_clip_vision_state_dict(read_safetensors(path / "model.safetensors"), cfg)
    return load_state_dict_strict(ViT(cfg), sd, str(path)).eval()


@torch.no_grad()
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clip_vision_parity(tmp_path, act):
    hf = _hf_clip(tmp_path, act)
    ours = _load_ours_hf(tmp_path)
    assert (ours.cfg.act, ours.cfg.pre_norm, ours.cfg.dim, ours.cfg.depth) == (act, True, 64, 3)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(7))
    out = hf(pixel_values=x, output_hidden_states=True)
    errs = [_max_err(a, b) for a, b in zip(ours.hidden_states(x), out.hidden_states)]
    assert len(errs) == 4 and max(errs) < TOL, errs
    # HF's last_hidden_state has no post_layernorm; its pooled output is post_layernorm of CLS
    assert _max_err(ours(x, final_norm=False), out.last_hidden_state) < TOL
    assert _max_err(ours(x)[:, 0], out.pooler_output) < TOL
    assert _max_err(ours(x, layer=-2, final_norm=False), out.hidden_states[-2]) < TOL


@torch.no_grad()
@pytest.mark.parametrize("size", [(84, 84), (70, 42)])
def test_hf_clip_interpolate_pos_encoding(tmp_path, size):
    # HF's interpolate_pos_encoding is bicubic without antialias: from_hf_clip_vision sets pos_embed_antialias=False
    hf = _hf_clip(tmp_path)
    ours = _load_ours_hf(tmp_path)
    assert ours.cfg.pos_embed_antialias is False
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(8))
    out = hf(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True)
    errs = [_max_err(a, b) for a, b in zip(ours.hidden_states(x), out.hidden_states)]
    assert max(errs) < TOL, errs
    # timm's antialiased formula gives different numbers here, so the switch matters
    timm_style = _load_ours_hf(tmp_path, {"pos_embed_antialias": True})
    assert _max_err(timm_style.embed(x), out.hidden_states[0]) > 1e-3


@torch.no_grad()
def test_hf_clip_prefixes_and_bad_checkpoints(tmp_path):
    _hf_clip(tmp_path)
    saved = read_safetensors(tmp_path / "model.safetensors")
    # transformers 5 saves CLIPVisionModel keys without the `vision_model.` prefix that 4.x (and CLIPModel) wrote
    bare = {k.removeprefix("vision_model."): v for k, v in saved.items()}
    ref = convert_hf_clip_vision_state_dict(saved)
    sd = {"vision_model." + k: v for k, v in bare.items()}
    llava = {"vision_tower." + k: v for k, v in sd.items()} | {"multi_modal_projector.linear_1.weight": torch.ones(2)}
    llava_new = {"model.vision_tower." + k: v for k, v in sd.items()} | {"lm_head.weight": torch.ones(2)}
    clip = sd | {"text_model.embeddings.token_embedding.weight": torch.ones(2), "logit_scale": torch.ones(())}
    for variant in (bare, sd, llava, llava_new, clip):
        got = convert_hf_clip_vision_state_dict(variant)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert ref["cls_token"].shape == (1, 1, 64) and ref["pos_embed"].shape == (1, 17, 64)
    q, k, v = (sd[f"vision_model.encoder.layers.1.self_attn.{c}_proj.weight"] for c in "qkv")
    assert torch.equal(ref["blocks.1.attn.qkv.weight"], torch.cat([q, k, v]))

    cfg = ViTConfig.from_hf_clip_vision(read_json(tmp_path / "config.json"))
    broken = dict(ref)
    del broken["blocks.2.mlp.fc1.bias"]
    with pytest.raises(CheckpointError, match="missing 1: blocks.2.mlp.fc1.bias"):
        load_state_dict_strict(ViT(cfg), broken, "ckpt")
    with pytest.raises(CheckpointError, match="unknown key 'vision_model.encoder.layers.0.self_attn.rope.weight'"):
        convert_hf_clip_vision_state_dict(sd | {"vision_model.encoder.layers.0.self_attn.rope.weight": torch.ones(1)})
    no_k = {k: v for k, v in sd.items() if k != "vision_model.encoder.layers.0.self_attn.k_proj.bias"}
    with pytest.raises(CheckpointError, match="layers.0.self_attn.k_proj.bias"):
        convert_hf_clip_vision_state_dict(no_k)
    with pytest.raises(CheckpointError, match="class_embedding"):
        convert_hf_clip_vision_state_dict({"text_model.embeddings.token_embedding.weight": torch.ones(1)})


def test_hf_config_from_llava_style_dict_uses_clip_defaults():
    # llava-hf configs list only what differs from CLIPVisionConfig's defaults
    llava = {"model_type": "llava", "vision_config": {"hidden_size": 1024, "image_size": 336, "patch_size": 14,
                                                      "intermediate_size": 4096, "num_attention_heads": 16,
                                                      "num_hidden_layers": 24, "projection_dim": 768}}
    cfg = ViTConfig.from_hf_clip_vision(llava)
    assert (cfg.dim, cfg.image_size, cfg.patch_size, cfg.depth, cfg.grid_size) == (1024, 336, 14, 24, 24)
    assert (cfg.act, cfg.norm_eps, cfg.pre_norm, cfg.in_chans) == ("quick_gelu", 1e-5, True, 3)
    with pytest.raises(ValueError, match="hidden_act 'silu'"):
        ViTConfig.from_hf_clip_vision({"hidden_act": "silu"})


def test_bad_inputs_raise_clear_errors():
    ours = ViT(ViTConfig(image_size=32, patch_size=8, dim=32, depth=2, num_heads=2, mlp_dim=64))
    with pytest.raises(ValueError, match=r"\(1, 3, 30, 32\).*patch size 8"):
        ours(torch.randn(1, 3, 30, 32))
    with pytest.raises(IndexError, match="layer 3 out of range"):
        ours(torch.randn(1, 3, 32, 32), layer=3)
    # hidden state indexing: negative = from the end, and the deepest asked-for block bounds the work
    x = torch.randn(1, 3, 32, 32)
    hs = ours.hidden_states(x)
    assert torch.equal(ours.hidden_states(x, [-3, -1])[0], hs[0]) and torch.equal(ours(x, -1, False), hs[2])
    assert ours.hidden_states(x, []) == []
