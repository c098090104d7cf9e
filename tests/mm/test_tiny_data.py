"""The tiny recipe's data beyond the scene grammar: word sequences, clips without speech, rationales; and that the
shipped recipe's rows are drawn exactly as before when they are off."""
from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
import torch

from decoders.loss import IGNORE_INDEX
from mm.data import scenes
from mm.data.scenes import COT_INSTRUCTION, split_cot
from mm.data.words import SCENE_WORDS, common_words, word_list
from mm.models.fusion import FusionModel
from mm.train.recipe_tiny import TinyRecipe, train_tiny
from mm.train.tiny_model import SPEC_AUGMENT
from mm.train.tiny_data import ctc_targets, lookup_rows, make_data, padded, sample_batch, transcribe_pool

OPEN = replace(TinyRecipe.smoke(), n_open=3, n_silence=3, open_share=0.4, silence_share=0.3, cot_share=0.5,
               pad_silence=0.3, read_share=0.4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(OPEN, tmp_path_factory.mktemp("speech"), log=lambda _: None)


def test_the_shipped_recipe_draws_its_rows_as_before():
    rng = random.Random(7)
    pool = {"transcribe": ["scene"], "open": ["open"], "silence": ["silence"]}
    assert transcribe_pool(TinyRecipe(), pool, rng) is pool["transcribe"]
    assert rng.random() == random.Random(7).random()  # no draw spent when the shares are zero
    counts = {"scene": 0, "open": 0, "silence": 0}
    for _ in range(3000):
        counts[transcribe_pool(OPEN, pool, rng)[0]] += 1
    assert counts["silence"] / 3000 == pytest.approx(0.3, abs=0.04)
    assert counts["open"] / 3000 == pytest.approx(0.4, abs=0.04)


def test_open_speech_and_silence_data(data):
    vocabulary = set(word_list()) | set(SCENE_WORDS)
    assert len(data["open"]) == 3 and len(data["silence"]) == 3
    for wave, text in data["open"]:
        assert 3 <= len(text.split()) <= 8 and set(text.split()) <= vocabulary
        assert wave.abs().max() > 0.05
    assert all(text == "" for _, text in data["silence"])
    assert data["rationale"] and all(COT_INSTRUCTION in line and "answer:" in line for line in data["rationale"])


def test_clips_padded_with_quiet_before_and_after():
    wave = torch.rand(8000) * 0.5 + 0.25  # loud, never near zero
    rng = random.Random(3)
    assert padded(TinyRecipe(), wave, rng) is wave and rng.random() == random.Random(3).random()  # off: no draw
    r = replace(TinyRecipe(), pad_silence=0.5)
    leads, faint = [], 0
    for seed in range(40):
        out = padded(r, wave, random.Random(seed))
        assert torch.equal(out, padded(r, wave, random.Random(seed)))
        start = int((out > 0.2).nonzero()[0])
        assert torch.equal(out[start:start + 8000], wave) and len(out) - 8000 <= 16000
        quiet = torch.cat([out[:start], out[start + 8000:]])
        assert quiet.abs().max() < 0.02
        leads.append(start)
        faint += bool(quiet.abs().max() > 0)
    assert min(leads) < 2000 and max(leads) > 6000 and 5 < faint < 40  # lengths spread over 0-0.5 s; some noise


def test_open_speech_from_common_words(tmp_path):
    common = replace(OPEN, n_open=4, n_silence=0, open_words=3000)
    texts = [text for _, text in make_data(common, tmp_path, log=lambda _: None)["open"]]
    assert len(texts) == 4 and set(" ".join(texts).split()) <= set(common_words(3000)) | set(SCENE_WORDS)


def test_rows_with_rationales_and_empty_transcripts(data):
    rng = random.Random(0)
    convs = sum((sample_batch(OPEN, data, "question", 4, rng)[0] for _ in range(10)), [])
    turns = [(q["content"], a["content"]) for c in convs for q, a in zip(c[::2], c[1::2])]
    cot = [(q, a) for q, a in turns if q.endswith(COT_INSTRUCTION)]
    assert 0.3 < len(cot) / len(turns) < 0.7
    for q, a in cot:
        rationale, answer = split_cot(a)
        assert rationale.startswith("i see ") and answer and "answer:" not in answer
    assert all("answer:" not in a for q, a in turns if not q.endswith(COT_INSTRUCTION))
    texts = sum((sample_batch(OPEN, data, "transcribe", 8, rng)[4] for _ in range(10)), [])
    assert "" in texts and any(t in [x for _, x in data["open"]] for t in texts)
    ys, lens = ctc_targets(_Chars(), ["", "ab"])
    assert lens.tolist() == [0, 2] and ys.tolist() == [[-1, -1], [1, 2]]


class _Chars:
    def encode(self, text):
        return [ord(c) - 96 for c in text]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke run of the recipe with open speech, silence and rationales: (output directory, model directory)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("open")
    return out, train_tiny(out, OPEN, progress=False)


def test_the_recipe_trains_with_open_speech_silence_and_rationales(trained):
    tmp_path, model_dir = trained
    rows = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert len(rows) == sum(OPEN.steps) and all(math.isfinite(h["loss"]) for h in rows)
    assert all(math.isfinite(h["ctc_loss"]) for h in rows if "ctc_loss" in h)
    assert "read" in {h.get("task") for h in rows if h["stage"] == 2}  # text-only rows (read_share)
    tok = FusionModel.from_pretrained(model_dir).tokenizer
    for text in ("answer", "look first", "i see a big red star", "faithless orphan"):
        assert tok.decode(tok.encode(text)) == text  # rationales and open words round-trip


def test_tiny_open_continues_from_the_model_it_is_given(trained, tmp_path):
    """`TinyRecipe.open_vocab(init)` starts from init's config, weights and tokenizer (not the recipe's own model
    sizes, 256 wide where the smoke model is 64): with no steps it saves init's weights unchanged; with steps it
    trains them on."""
    _, init = trained
    base = FusionModel.from_pretrained(init)
    small = dict(n_text=24, n_speech=6, n_spoken=6, n_open=4, n_silence=2, batch=(2, 2, 2, 2), save_every=2)
    same = FusionModel.from_pretrained(train_tiny(tmp_path / "none", replace(
        TinyRecipe.open_vocab(str(init)), steps=(0, 0, 0), **small), progress=False))
    assert same.config.to_dict() == base.config.to_dict()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in same.state_dict().items())
    assert (tmp_path / "none" / "tokenizer" / "tokenizer.model").read_bytes() == (init / "tokenizer.model").read_bytes()
    moved = FusionModel.from_pretrained(train_tiny(tmp_path / "two", replace(
        TinyRecipe.open_vocab(str(init)), steps=(2, 0, 2), speech_steps=2, **small), progress=False))
    assert moved.config.to_dict() == base.config.to_dict()
    changed = [k for k, v in moved.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert any(k.startswith("speech_encoder.") for k in changed) and any(k.startswith("language_model.") for k in changed)
    masked = FusionModel.from_pretrained(train_tiny(tmp_path / "spec", replace(
        TinyRecipe.open_vocab(str(init)), steps=(1, 0, 0), speech_steps=1, specaug=True, **small), progress=False))
    changed = [k for k, v in masked.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert any(k.startswith("vision_tower.") for k in changed) and any(k.startswith("speech_encoder.") for k in changed)
    speech_only = FusionModel.from_pretrained(train_tiny(tmp_path / "speech", replace(  # grid_batch 0: no ViT training
        TinyRecipe.open_vocab(str(init)), steps=(1, 0, 0), speech_steps=1, grid_batch=0, **small), progress=False))
    changed = [k for k, v in speech_only.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(k.startswith(("speech_encoder.", "ctc.")) for k in changed)
    with pytest.raises(ValueError, match="grid_batch=0 leaves stage 0 nothing to train after speech_steps=1"):
        train_tiny(tmp_path / "none", replace(TinyRecipe.open_vocab(str(init)), steps=(2, 0, 0), speech_steps=1,
                                              grid_batch=0, **small), progress=False)
    assert masked.config.speech.specaug == SPEC_AUGMENT and masked.speech_encoder.specaug is not None
    wave = torch.randn(1, 16000)
    enc, n = masked.speech_encoder, torch.tensor([16000])
    torch.manual_seed(0)
    masked_feats, feats = enc.train().features(wave, n)[0], enc.eval().features(wave, n)[0]  # [1, T, 80]
    zeros = enc.normalize(torch.zeros_like(feats), torch.tensor([feats.shape[1]]))[0]  # a zero-filled band, normalised
    differ = masked_feats != feats
    assert differ.any() and torch.equal(masked_feats[differ], zeros[differ])  # masked bands in training only


def test_lookup_warmup_rows_one_direction_after_another_with_the_tail_in_thirds(trained):
    """`lookup_rows`: each step's direction and tail (none, "?", then the chat turn) by its place in the warm-up; the
    labels are the named object's attribute, then EOS; after the first phase about a quarter of the rows rehearse the
    earlier directions as chat turns; no held-out pair; a step past the warm-up is refused."""
    _, model_dir = trained
    processor = FusionModel.from_pretrained(model_dir).processor()
    tok = processor.tokenizer
    r = replace(OPEN, lookup_warmup="col_of_shape:6,where_cs:3:2")
    held = scenes.heldout_pairs()
    rehearsed = 0
    for step in range(9):
        rows = lookup_rows(r, processor, step, 40, random.Random(step))
        assert len(rows) == 40
        for ids, labels in rows:
            k = next(i for i, v in enumerate(labels) if v != IGNORE_INDEX)
            assert labels[:k] == [IGNORE_INDEX] * k and labels[k:] == ids[k:] and ids[-1] == tok.eos_id
            prompt, answer = tok.decode(ids[:k]), tok.decode(ids[k:-1]).strip()
            chat = "USER:" in prompt
            items, question = prompt.split("USER:")[-1].replace("ASSISTANT:", "").strip().split("\n")
            objects = [part.split(" ", 2) for part in items.split(", ")]  # colour, shape[, place]
            assert not held.intersection((o[1], o[0]) for o in objects)
            if question.startswith("what colour is the "):  # col_of_shape, this phase's or rehearsed
                shape = question.removeprefix("what colour is the ").rstrip("?")
                assert [o[0] for o in objects if o[1] == shape] == [answer] and 2 <= len(objects) <= 3
                rehearsed += step >= 6
            else:
                assert step >= 6 and len(objects) == 2  # where_cs on its two objects
                colour, shape = question.removeprefix("where is the ").rstrip("?").split(" ")
                assert [o[2] for o in objects if o[:2] == [colour, shape]] == [answer]
            if step < 6 or not question.startswith("what colour"):  # a rehearsed row is always the chat turn
                third = step // 2 if step < 6 else step - 6
                assert chat == (third == 2) and question.endswith("?") == (third >= 1)
    assert 0.1 < rehearsed / (3 * 40) < 0.4
    with pytest.raises(ValueError, match="step 9 is past the lookup warm-up"):
        lookup_rows(r, processor, 9, 1, random.Random(0))


def test_a_fresh_decoder_warmed_up_on_lookups(trained, tmp_path):
    """`fresh_decoder` with `init`: every decoder weight starts again, everything else is init's; `lookup_warmup`
    makes the first joint steps lookup rows; a warm-up longer than stage 2 or malformed is refused before training."""
    _, init = trained
    base = FusionModel.from_pretrained(init)
    small = dict(n_text=24, n_speech=6, n_spoken=6, n_open=4, n_silence=2, batch=(2, 2, 2, 2), save_every=2)
    recipe = replace(TinyRecipe.agent(str(init)), **small, fresh_decoder=True)
    fresh = FusionModel.from_pretrained(train_tiny(tmp_path / "fresh", replace(recipe, steps=(0, 0, 0)), progress=False))
    for k, v in fresh.state_dict().items():
        if not k.startswith("language_model."):
            assert torch.equal(v, base.state_dict()[k]), k
        else:  # drawn anew (PyTorch's default initialisation), norms at one
            assert torch.equal(v, torch.ones_like(v)) if v.dim() == 1 else not torch.equal(v, base.state_dict()[k]), k
    out = tmp_path / "warm"
    train_tiny(out, replace(recipe, steps=(0, 0, 3), agent_share=0.0, lookup_warmup="col_of_shape:2"), progress=False)
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [h["task"] for h in rows][:2] == ["lookup", "lookup"] and rows[2]["task"] != "lookup"
    assert all(math.isfinite(h["lm_loss"]) for h in rows)
    for warmup, message in (("col_of_shape:4", "longer than stage 2"), ("col_of_shape", "got 'col_of_shape'")):
        with pytest.raises(ValueError, match=message):
            train_tiny(tmp_path / "bad", replace(recipe, steps=(0, 0, 3), lookup_warmup=warmup), progress=False)


def test_recipe_settings_from_the_command_line():
    """`mm train --set KEY=VALUE`: typed like the field (tuples comma-separated); a wrong key, count or kind is refused
    naming it."""
    r = TinyRecipe.agent("m").overridden(["steps=0,0,600", "lr=1e-3,1e-3,3e-4", "agent_share=0.6", "agent_batch=16"])
    assert (r.steps, r.lr, r.agent_share, r.agent_batch, r.init) == ((0, 0, 600), (1e-3, 1e-3, 3e-4), 0.6, 16, "m")
    assert TinyRecipe.agent("m").overridden([]) == TinyRecipe.agent("m")
    assert [TinyRecipe().overridden([f"specaug={v}"]).specaug for v in ("1", "True", "no", "0")] == [True, True, False, False]
    for bad, message in ((["stepz=1"], "give KEY=VALUE with KEY one of seed,"), (["steps=1,2"], "steps takes 3 comma"),
                         (["agent_batch=x"], "agent_batch takes int"), (["lr=a,b,c"], "lr takes float, float, float"),
                         (["specaug=maybe"], "specaug takes bool")):
        with pytest.raises(ValueError, match=message):
            TinyRecipe().overridden(bad)
