"""LLaVA: parity with transformers' LlavaForConditionalGeneration (both llava-hf key layouts, the original LLaVA
layout, default/full selection, a list of feature layers), image-token checks, our format, training hooks."""
import json

import pytest
import torch
import torch.nn.functional as F

from decoders.loss import IGNORE_INDEX
from mm.models.llava import LlavaForConditionalGeneration
from mm.train.llava import STAGE_LR, answer_loss, make_optimizer, set_trainable, train_step
from tests.mm.llava_fixtures import (HF_IMAGE_TOKEN, IMAGE_SIZE, layout_of, make_hf_llava, make_our_llava,
                                     rewrite_layout, write_original_llava)

N_NEW = 20


def prompt_ids(image_token: int, tokens_per_image: int, n_images: int = 1, seed: int = 0) -> torch.Tensor:
    """[1, T]: BOS, text, then per image its run of image tokens followed by more text."""
    g = torch.Generator().manual_seed(seed)
    ids = [1] + torch.randint(3, 100, (4,), generator=g).tolist()
    for _ in range(n_images):
        ids += [image_token] * tokens_per_image + torch.randint(3, 100, (3,), generator=g).tolist()
    return torch.tensor([ids])


def hf_greedy(hf, ids, pixels) -> list[int]:
    """transformers' greedy generate of exactly N_NEW tokens (EOS does not stop it)."""
    hf.generation_config.eos_token_id = None
    out = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=N_NEW, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + N_NEW
    return out[0, ids.shape[1]:].tolist()


def check_parity(hf, ours, image_token: int, n_images: int = 1):
    tpi = ours.config.tokens_per_image()
    ids = prompt_ids(image_token, tpi, n_images)
    hf_ids = ids.masked_fill(ids == image_token, hf.config.image_token_index)
    pixels = torch.randn(n_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=hf_ids, pixel_values=pixels).logits
        got = ours(ids, pixels).logits
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err < 1e-4, err
    assert ref.abs().max() > 1.0  # logits far from zero, so the comparison means something
    ref_tokens = hf_greedy(hf, hf_ids, pixels)
    got_tokens = ours.generate(ids, pixels, max_new_tokens=N_NEW, eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert got_tokens == ref_tokens
    return err


CASES = [  # (select strategy, vision_feature_layer, on-disk layout)
    ("default", -2, "as_saved"),
    ("default", -2, "rewritten"),
    ("full", -2, "as_saved"),
    ("full", [-2, -1], "rewritten"),
    ("default", [0, -2], "as_saved"),
]


@pytest.mark.parametrize("strategy,layer,layout", CASES)
def test_llava_hf_parity(tmp_path, strategy, layer, layout):
    hf = make_hf_llava(tmp_path, strategy, layer)
    if layout == "rewritten":  # the layout transformers did not write
        other = "newer" if layout_of(tmp_path) == "older" else "older"
        rewrite_layout(tmp_path, other)
        assert layout_of(tmp_path) == other
    ours = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert ours.config.vision_feature_select_strategy == strategy
    assert ours.config.tokens_per_image() == 4 + (strategy == "full")
    check_parity(hf, ours, HF_IMAGE_TOKEN)


def test_both_layouts_load_identically(tmp_path):
    hf = make_hf_llava(tmp_path / "a")
    make_hf_llava(tmp_path / "b")
    rewrite_layout(tmp_path / "a", "older")
    rewrite_layout(tmp_path / "b", "newer")
    a = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a").state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(tmp_path / "b").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["projector.linear_1.weight"], hf.model.multi_modal_projector.linear_1.weight)


def test_several_images_in_one_prompt(tmp_path):
    hf = make_hf_llava(tmp_path)
    ours = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    check_parity(hf, ours, HF_IMAGE_TOKEN, n_images=3)


@pytest.mark.parametrize("tower_inside", [False, True])
def test_original_llava_layout(tmp_path, tower_inside):
    hf = make_hf_llava(tmp_path / "hf", "default", -2)
    write_original_llava(tmp_path / "hf", hf, tmp_path / "orig", tower_inside)
    ours = LlavaForConditionalGeneration.from_pretrained(tmp_path / "orig")  # tower found via mm_vision_tower
    assert ours.config.image_token_index == 128  # original LLaVA's slot id sits just beyond the vocabulary
    assert ours.image_processor.mode == "pad"
    check_parity(hf, ours, image_token=128)
    # a tower named by a Hub id is not found; an explicit directory is
    cfg = json.loads((tmp_path / "orig" / "config.json").read_text())
    (tmp_path / "orig" / "config.json").write_text(json.dumps(dict(cfg, mm_vision_tower="someone/some-clip")))
    with pytest.raises(ValueError, match="vision_tower=DIR"):
        LlavaForConditionalGeneration.from_pretrained(tmp_path / "orig")
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "orig", vision_tower=tmp_path / "orig" / "clip")
    assert torch.equal(again.vision_tower.blocks[1].attn.qkv.weight, ours.vision_tower.blocks[1].attn.qkv.weight)


def test_original_llava_linear_projector(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = make_hf_llava(tmp_path / "hf", "full", -2)
    write_original_llava(tmp_path / "hf", hf, tmp_path / "orig")
    sd = {k: v for k, v in load_file(str(tmp_path / "orig" / "model.safetensors")).items() if "mm_projector" not in k}
    w, b = torch.randn(64, 32) / 32**0.5, torch.randn(64) * 0.1
    save_file(dict(sd, **{"model.mm_projector.weight": w, "model.mm_projector.bias": b}),
              str(tmp_path / "orig" / "model.safetensors"))
    cfg = json.loads((tmp_path / "orig" / "config.json").read_text())
    (tmp_path / "orig" / "config.json").write_text(json.dumps(dict(cfg, mm_projector_type="linear")))
    ours = LlavaForConditionalGeneration.from_pretrained(tmp_path / "orig")
    assert ours.projector.linear_2 is None
    # reference: transformers' CLIP tower and Llama, with the linear projection done here
    ids = prompt_ids(128, 5, n_images=2)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        feats = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]  # [2, 5, 32], CLS kept
        embeds = hf.model.language_model.embed_tokens(ids.clamp(max=127))
        embeds[ids == 128] = F.linear(feats, w, b).reshape(-1, 64)
        ref = hf.lm_head(hf.model.language_model(inputs_embeds=embeds).last_hidden_state)
        got = ours(ids, pixels).logits
    assert (got - ref).abs().max() < 1e-4


def test_preprocessor_config_and_defaults(tmp_path):
    from transformers import CLIPImageProcessor

    from mm.models.llava import LlavaConfig

    assert LlavaConfig().tokens_per_image() == 576  # LLaVA-1.5: CLIP-L/14 at 336 px, CLS dropped
    assert LlavaConfig(vision_feature_select_strategy="full").tokens_per_image() == 577
    make_hf_llava(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                       image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4]).save_pretrained(tmp_path)
    proc = LlavaForConditionalGeneration.from_pretrained(tmp_path).image_processor
    assert (proc.size, proc.crop_size, proc.mean, proc.std, proc.mode) == (32, 28, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4), "crop")


def test_image_token_count_mismatch(tmp_path):
    make_hf_llava(tmp_path)
    ours = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    ids = prompt_ids(HF_IMAGE_TOKEN, 3)  # 3 tokens, 4 features
    with pytest.raises(ValueError, match=r"3 image tokens .* 1 image\(s\) x 4 features = 4"):
        ours(ids, torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    ids = prompt_ids(HF_IMAGE_TOKEN, 4, n_images=2)
    with pytest.raises(ValueError, match=r"8 image tokens .* 1 image\(s\) x 4 features = 4"):
        ours(ids, torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(ValueError, match=r"8 image tokens .* 0 image\(s\)"):
        ours(ids)


def test_our_format_round_trip(tmp_path):
    model = make_our_llava(tmp_path / "ours", strategy="full")
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "mm-llava"
    assert loaded.config == model.config
    assert loaded.image_processor == model.image_processor
    assert loaded.tokenizer.encode("a red boat") == model.tokenizer.encode("a red boat")
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # and an HF checkpoint written back in our format gives the same logits
    hf = make_hf_llava(tmp_path / "hf")
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "hf_ours")
    check_parity(hf, LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf_ours"), HF_IMAGE_TOKEN)


def test_bad_checkpoints(tmp_path):
    make_hf_llava(tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["multi_modal_projector.linear_3.weight"] = torch.zeros(2, 2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="linear_3"):
        LlavaForConditionalGeneration.from_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(ValueError, match="not a LLaVA checkpoint"):
        LlavaForConditionalGeneration.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return make_our_llava(tmp_path_factory.mktemp("llava_train"))


def training_batch(model, template):
    proc = model.processor(template)
    images = [torch.randint(0, 255, (3, 40, 30), dtype=torch.uint8).permute(1, 2, 0).numpy() for _ in range(2)]
    from PIL import Image

    images = [Image.fromarray(a) for a in images]
    convs = [
        [{"role": "user", "content": "<image>\nWhat is in the picture?"}, {"role": "assistant", "content": "A red boat."}],
        [{"role": "user", "content": "<image>\nDescribe it."}, {"role": "assistant", "content": "Two dogs run on the field."}],
    ]
    return proc(convs, images, add_generation_prompt=False, labels=True), convs


def test_labels_cover_answer_tokens_only(ours):
    batch, convs = training_batch(ours, "llava_v1")
    tok = ours.tokenizer
    for b, conv in enumerate(convs):
        # answer = "A red boat." after "ASSISTANT:", then </s>; everything before it is prompt
        want = tok.encode(conv[1]["content"]) + [tok.eos_id]
        lab = batch["labels"][b]
        kept = lab[lab != IGNORE_INDEX].tolist()
        assert kept == want
        assert batch["input_ids"][b, -len(want):].tolist() == want  # the answer sits at the end (left padding)
        assert (lab[:-len(want)] == IGNORE_INDEX).all()


def test_loss_ignores_non_answer_tokens(ours):
    batch, _ = training_batch(ours, "llava_v1")
    with torch.no_grad():
        loss = answer_loss(ours, batch)
        logits = ours(**batch).logits
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            y = int(batch["labels"][b, t])
            if y != IGNORE_INDEX:
                total -= F.log_softmax(logits[b, t - 1].double(), -1)[y].item()
                count += 1
    assert count == int((batch["labels"] != IGNORE_INDEX).sum()) > 4
    assert abs(loss.item() - total / count) < 1e-5
    # the mask matters: the loss over every real next token is a different number
    every = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    every = every.masked_fill(every == ours.config.image_token_index, IGNORE_INDEX)
    with torch.no_grad():
        assert abs(answer_loss(ours, dict(batch, labels=every)).item() - loss.item()) > 1e-3


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("stage", [1, 2])
def test_training_stages(tmp_path, stage):
    model = make_our_llava(tmp_path / "m")
    batch, _ = training_batch(model, "plain" if stage == 1 else "llava_v1")
    opt = make_optimizer(model, stage)
    assert opt.param_groups[0]["lr"] == STAGE_LR[stage]
    learn = ("projector.",) if stage == 1 else ("projector.", "language_model.")
    grads = {k for k, p in model.named_parameters() if p.requires_grad}
    assert grads == {k for k, _ in model.named_parameters() if k.startswith(learn)}
    before = snapshot(model)
    loss = train_step(model, batch, opt)
    assert loss > 0
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed == grads  # every trainable tensor moved, nothing else did
    assert not any(k.startswith("vision_tower.") for k in changed)
    assert set_trainable(model, stage).keys() == grads
