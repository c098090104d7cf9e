"""The fusion model on the other decoders: a ViT + projector in front of a tiny DeepSeek-V3 (MLA + MoE) or Mixtral
decoder learns to answer from the image in a few steps, and saves and loads back as one directory."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import mm
from decoders import DeepseekConfig, DeepseekForCausalLM
from decoders.loss import next_token_loss
from encoders.vit import ViTConfig
from mm.models.llava import LlavaConfig, LlavaForConditionalGeneration
from mm.train.text import init_weights

V = 40  # text vocabulary; the image token is id V
DECODERS = {
    "deepseek_v3": dict(model_type="deepseek_v3", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                        qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                        moe_intermediate_size=32),
    "mixtral": dict(model_type="mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
}
ANSWER = {"red": 5, "blue": 7}  # the token the model must say after an image of that colour


def fusion_model(kind: str) -> LlavaForConditionalGeneration:
    text = DeepseekConfig.from_hf(dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64, **DECODERS[kind]))
    vision = ViTConfig(image_size=32, patch_size=16, dim=32, depth=1, num_heads=2, mlp_dim=64)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(text=text, vision=vision, image_token_index=V))
    init_weights(model.language_model)
    return model


def batch(model, colours):
    images = [Image.new("RGB", (32, 32), colour) for colour in colours]
    pixels = model.image_processor(images)
    n = model.config.tokens_per_image()  # 4 image tokens, then the prompt token 1, then the answer
    ids = torch.tensor([[V] * n + [1, ANSWER[c]] for c in colours])
    return ids, pixels


@pytest.mark.parametrize("kind", list(DECODERS))
def test_fusion_model_learns_on_a_moe_decoder_and_round_trips(kind, tmp_path):
    model = fusion_model(kind)
    assert isinstance(model.language_model, DeepseekForCausalLM)
    assert sum(".experts." in name for name, _ in model.named_parameters()) >= 2  # a real MoE layer is trained
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, pixels = batch(model, ["red", "blue"] * 4)
    losses = []
    for _ in range(40):
        logits = model(ids, pixels).logits
        loss = next_token_loss(logits[:, -2:], ids[:, -2:])  # only the answer after the prompt token counts
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    model.eval()
    ids, pixels = batch(model, ["blue", "red"])
    out = model.generate(ids[:, :-1], pixels, max_new_tokens=1, eos_token_id=None)
    assert out[:, -1].tolist() == [ANSWER["blue"], ANSWER["red"]]  # it reads the image, not the position

    model.save_pretrained(tmp_path)
    loaded = mm.load(tmp_path)
    assert isinstance(loaded.language_model, DeepseekForCausalLM)
    assert loaded.config.text.model_type == kind
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixels).logits, model(ids, pixels).logits)
