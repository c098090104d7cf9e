"""Tiny random LLaVA checkpoints for the tests: transformers' own (saved with `save_pretrained`), rewritten into the
other llava-hf key layout or the original LLaVA layout, and ours with a sentencepiece tokenizer trained here."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

IMAGE_SIZE = 28  # 2 x 2 patches of 14 px
HF_IMAGE_TOKEN = 120  # inside the text vocabulary of 128, as transformers needs
CORPUS = """A small red boat floats on a calm lake under a grey sky.
Two dogs run across the green field, chasing a yellow ball.
The old man reads a newspaper on the bench near the station.
A cat sleeps on the warm windowsill next to a pot of basil.
Children build a sand castle on the beach while waves roll in.
The city skyline glows orange as the sun sets behind the towers.
A bowl of fresh fruit sits on the wooden kitchen table.
Snow covers the mountain peaks and the pine trees below them.
"""


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every weight at a scale where logits are far from uniform, so greedy choices are not near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def make_hf_llava(path: Path, strategy: str = "default", layer=-2, seed: int = 0):
    """Save a random transformers LlavaForConditionalGeneration (CLIP 2 layers, Llama 2 layers with GQA); return it."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=HF_IMAGE_TOKEN,
                      vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    model = LlavaForConditionalGeneration(cfg).eval()
    randomize_(model, seed)
    model.save_pretrained(path)
    return model


def _parts(sd: dict) -> dict[str, dict]:
    """Split a llava-hf state dict of either layout into language model (HF Llama keys), tower, projector."""
    out = {"language": {}, "vision": {}, "projector": {}}
    for k, v in sd.items():
        for prefix, part, new in (("model.language_model.", "language", "model."), ("language_model.model.", "language", "model."),
                                  ("language_model.lm_head.", "language", "lm_head."), ("lm_head.", "language", "lm_head."),
                                  ("model.vision_tower.vision_model.", "vision", ""), ("model.vision_tower.", "vision", ""),
                                  ("vision_tower.vision_model.", "vision", ""), ("vision_tower.", "vision", ""),
                                  ("model.multi_modal_projector.", "projector", ""), ("multi_modal_projector.", "projector", "")):
            if k.startswith(prefix):
                out[part][new + k[len(prefix):]] = v
                break
        else:
            raise AssertionError(f"unexpected key {k}")
    return out


def layout_of(path: Path) -> str:
    """'older' or 'newer': the llava-hf key layout of path/model.safetensors."""
    keys = load_file(str(path / "model.safetensors")).keys()
    return "newer" if any(k.startswith("model.language_model.") for k in keys) else "older"


def rewrite_layout(path: Path, layout: str) -> None:
    """Rewrite path/model.safetensors in the older (`language_model.model.*`, `vision_tower.vision_model.*`) or
    newer (`model.language_model.*`, `model.vision_tower.vision_model.*`, `lm_head.weight`) llava-hf layout."""
    parts = _parts(load_file(str(path / "model.safetensors")))
    out = {}
    for k, v in parts["language"].items():
        if layout == "older":
            out["language_model." + k] = v
        else:
            out[k if k.startswith("lm_head.") else "model.language_model." + k.removeprefix("model.")] = v
    tower, proj = ("vision_tower.vision_model.", "multi_modal_projector.") if layout == "older" else \
        ("model.vision_tower.vision_model.", "model.multi_modal_projector.")
    out.update({tower + k: v for k, v in parts["vision"].items()})
    out.update({proj + k: v for k, v in parts["projector"].items()})
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})


def write_original_llava(hf_dir: Path, hf_model, out_dir: Path, tower_inside: bool = False) -> None:
    """Write hf_dir's model in the original LLaVA layout: `model.*` Llama + `model.mm_projector.{0,2}`, a
    `llava_llama` config, and the CLIP tower as a separate CLIPVisionModel directory out_dir/clip (keys
    `vision_model.*`, as on the Hub). tower_inside: the tower weights go into the checkpoint instead
    (`model.vision_tower.vision_tower.vision_model.*`) and out_dir/clip holds only its config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = _parts(load_file(str(hf_dir / "model.safetensors")))
    sd = dict(parts["language"])
    hf_model.model.vision_tower.save_pretrained(out_dir / "clip")
    tower = {"vision_model." + k: v for k, v in parts["vision"].items()}
    (out_dir / "clip" / "model.safetensors").unlink()
    if tower_inside:
        sd.update({"model.vision_tower.vision_tower." + k: v for k, v in tower.items()})
    else:
        save_file(tower, str(out_dir / "clip" / "model.safetensors"), metadata={"format": "pt"})
    for i, name in (("0", "linear_1"), ("2", "linear_2")):
        for param in ("weight", "bias"):
            sd[f"model.mm_projector.{i}.{param}"] = parts["projector"][f"{name}.{param}"]
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    text = hf_cfg["text_config"]
    cfg = dict(text, model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower="clip",
               mm_projector_type="mlp2x_gelu", mm_hidden_size=hf_cfg["vision_config"]["hidden_size"],
               mm_vision_select_layer=hf_cfg["vision_feature_layer"],
               mm_vision_select_feature="patch" if hf_cfg["vision_feature_select_strategy"] == "default" else "cls_patch",
               mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="pad")
    (out_dir / "config.json").write_text(json.dumps(cfg))


def train_tokenizer(out_dir: Path, vocab_size: int = 450):
    """A Llama-style sentencepiece tokenizer trained on a few sentences, with `<image>` as a control piece (id 3)."""
    from decoders.tokenizer_train import train_sentencepiece

    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text(CORPUS * 4)
    return train_sentencepiece(corpus, out_dir, vocab_size=vocab_size, special_tokens=["<image>"])


def make_our_llava(path: Path, seed: int = 0, strategy: str = "default"):
    """Save a random LLaVA in our format with a trained tokenizer (image token = the `<image>` control piece)."""
    from decoders.llama import LlamaConfig
    from encoders.vit import ViTConfig
    from mm.models.llava import LlavaConfig, LlavaForConditionalGeneration

    tok = train_tokenizer(path / "tok")
    vision = ViTConfig.from_hf_clip_vision({"image_size": IMAGE_SIZE, "patch_size": 14, "hidden_size": 32,
                                            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4})
    text = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg = LlavaConfig(text=text, vision=vision, image_token_index=tok.special_tokens["<image>"],
                      vision_feature_select_strategy=strategy)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    randomize_(model, seed)
    model.tokenizer = tok
    model.save_pretrained(path)
    return model
