"""The speech adapter, audio tokens in the multimodal model (logits, losses, training), and joint CTC/LLM beam search,
on a tiny random FusionModel and a tiny Llama."""
import math

import pytest
import torch
import torch.nn.functional as F

from decoders.ctc import ctc_prefix_beam_search
from decoders.llama import LlamaConfig, LlamaForCausalLM
from decoders.loss import IGNORE_INDEX
from encoders.ebranchformer import EBranchformerConfig, SpeechTooShortError
from encoders.speech_encoder import SpeechEncoderConfig
from encoders.frontend import FrontendConfig
from encoders.vit import ViTConfig
from mm.models.fusion import FusionModel, FusionOutput
from mm.models.fusion_config import MultimodalConfig
from mm.models.speech_adapter import SpeechAdapter, SpeechAdapterConfig, joint_beam_search, stack_frames

V = 24  # text vocabulary = CTC vocabulary; 0 = <unk> = CTC blank, 1 = BOS, 2 = EOS
EOS = 2
D_ENC, D_LLM = 16, 32


def text_config(vocab=V) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=D_LLM, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       bos_token_id=1, eos_token_id=EOS)


def tiny_config(mode="stack", k=2, tail="pad", ctc_weight=0.3) -> MultimodalConfig:
    speech = SpeechEncoderConfig(
        frontend=FrontendConfig(n_mels=16),
        encoder=EBranchformerConfig(input_size=16, output_size=D_ENC, attention_heads=2, cgmlp_linear_units=32,
                                    cgmlp_conv_kernel=3, num_blocks=1, dropout_rate=0.0,
                                    positional_dropout_rate=0.0, use_ffn=True, macaron_ffn=True, linear_units=32),
    )
    adapter = SpeechAdapterConfig(input_size=D_ENC, hidden_size=D_LLM, downsample=k, mode=mode, tail=tail)
    vision = ViTConfig(image_size=16, patch_size=8, dim=16, depth=1, num_heads=2, mlp_dim=32)
    return MultimodalConfig(text=text_config(), vision=vision, speech=speech, adapter=adapter, audio_token_id=V,
                            image_token_index=V + 1, ctc_weight=ctc_weight)


def tiny_model(seed=0, **kw) -> FusionModel:
    torch.manual_seed(seed)
    return FusionModel(tiny_config(**kw)).eval()


def build_speech_batch(prompts, feature_lengths, a, pad_id=0, answers=None) -> dict:
    """Left-padded inputs from prompt ids with one audio token `a` each, expanded to the utterance's feature count;
    with `answers`, labels on the answer ids only (what the processor does with text, done by hand here)."""
    rows, label_rows = [], []
    for b, (ids, n) in enumerate(zip(prompts, [int(n) for n in feature_lengths])):
        at = ids.index(a)
        ids = ids[:at] + [a] * n + ids[at + 1:]
        answer = list(answers[b]) if answers is not None else []
        rows.append(ids + answer)
        label_rows.append([IGNORE_INDEX] * len(ids) + answer)
    T = max(len(r) for r in rows)
    out = {"input_ids": torch.full((len(rows), T), pad_id), "attention_mask": torch.zeros(len(rows), T, dtype=torch.long),
           "labels": torch.full((len(rows), T), IGNORE_INDEX), "pixel_values": None}
    for b, (r, lab) in enumerate(zip(rows, label_rows)):
        out["input_ids"][b, T - len(r):] = torch.tensor(r)
        out["attention_mask"][b, T - len(r):] = 1
        out["labels"][b, T - len(r):] = torch.tensor(lab)
    return out


def speech_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    speech = torch.zeros(len(lengths), S)
    for b, n in enumerate(lengths):
        speech[b, :n] = 0.1 * torch.randn(n, generator=g)
    return speech, torch.tensor(lengths)


# ------------------------------------------------------------------------------------------- adapter


@pytest.mark.parametrize("mode", ["stack", "conv"])
@pytest.mark.parametrize("tail", ["pad", "drop"])
def test_adapter_output_lengths_are_exact(mode, tail):
    for k in (1, 2, 3, 4):
        torch.manual_seed(k)
        adapter = SpeechAdapter(SpeechAdapterConfig(input_size=8, hidden_size=12, downsample=k, mode=mode, tail=tail))
        lengths = torch.tensor([13, 12, 9, 7, 5, k])
        T = int(lengths.max())
        y, n = adapter(torch.randn(len(lengths), T, 8), lengths)
        rule = (lambda L: math.ceil(L / k)) if tail == "pad" else (lambda L: L // k)
        assert n.tolist() == [rule(L) for L in lengths.tolist()]
        assert y.shape == (len(lengths), rule(T), 12)
        if tail == "drop" and k > 1:
            with pytest.raises(SpeechTooShortError, match=f"downsample={k}"):
                adapter(torch.randn(2, T, 8), torch.tensor([T, k - 1]))


def test_stack_frames_equals_hand_built_reshape():
    torch.manual_seed(0)
    B, T, D, k = 3, 11, 5, 3
    x = torch.randn(B, T, D)
    lengths = torch.tensor([11, 7, 3])
    for tail, n_out in (("pad", 4), ("drop", 3)):
        want = torch.zeros(B, n_out, k * D)
        for b in range(B):
            for g in range(n_out):
                for j in range(k):
                    t = g * k + j
                    if t < int(lengths[b]):  # frames past the utterance are zeros
                        want[b, g, j * D:(j + 1) * D] = x[b, t]
        assert torch.equal(stack_frames(x, lengths, k, tail), want)


def test_conv_adapter_equals_stacking_with_the_conv_as_a_linear_map():
    torch.manual_seed(0)
    k, d = 3, 8
    adapter = SpeechAdapter(SpeechAdapterConfig(input_size=d, hidden_size=6, downsample=k, mode="conv"))
    x, lengths = torch.randn(2, 10, d), torch.tensor([10, 8])
    y, _ = adapter(x, lengths)
    # the output channel o of group g reads frame g*k + j, channel c with weight conv.weight[o, c, j]
    w = adapter.conv.weight.permute(0, 2, 1).reshape(d, k * d)
    conv = stack_frames(x, lengths, k) @ w.T + adapter.conv.bias
    want = adapter.linear_2(F.gelu(adapter.linear_1(conv)))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_feature_counts_from_speech_lengths():
    model = tiny_model(k=2)
    lengths = [960, 1500, 3200, 4001, 6400]
    for S in lengths:  # frontend S//160 + 1 frames, conv2d subsampling, ceil(T'/2)
        frames = S // 160 + 1
        t_enc = ((frames - 1) // 2 - 1) // 2
        assert int(model.feature_lengths(torch.tensor([S]))[0]) == math.ceil(t_enc / 2)
    speech, speech_lengths = speech_batch(lengths)
    _, enc_lengths, feats, feat_lengths = model.encode_speech(speech, speech_lengths)
    assert feat_lengths.tolist() == model.feature_lengths(speech_lengths).tolist()
    assert feats.shape[1] == max(feat_lengths.tolist())
    # the count of an utterance does not depend on its batch
    for b, S in enumerate(lengths):
        _, _, _, alone = model.encode_speech(speech[b:b + 1, :S], speech_lengths[b:b + 1])
        assert int(alone[0]) == int(feat_lengths[b])
    with pytest.raises(SpeechTooShortError, match="at least 7 frames"):
        model.feature_lengths(torch.tensor([3200, 900]))


# ------------------------------------------------------------------------------------------- prompts, logits, loss


def test_audio_token_and_feature_counts_must_agree():
    a = V
    model = tiny_model(k=2)
    speech, lengths = speech_batch([3200, 2400])
    n = model.feature_lengths(lengths).tolist()
    wrong = build_speech_batch([[1, a, 7], [1, a, 7]], [n[0], n[1] + 1], a)
    with pytest.raises(ValueError, match=rf"input_ids hold {n[0] + n[1] + 1} audio tokens .* gives {n[0] + n[1]} features"):
        model(wrong["input_ids"], None, wrong["attention_mask"], speech=speech, speech_lengths=lengths)
    with pytest.raises(ValueError, match="audio tokens"):
        model.embed(wrong["input_ids"])  # audio tokens but no speech


def test_logits_with_audio_equal_hand_built_inputs_embeds():
    model = tiny_model(k=3, mode="stack")
    a = V
    speech, lengths = speech_batch([4000, 2560, 3300], seed=1)
    prompts = [[1, 5, a, 6, 7], [1, a, 9], [1, 4, 4, a]]
    n = model.feature_lengths(lengths)
    batch = build_speech_batch(prompts, n, a, pad_id=0)
    logits = model(batch["input_ids"], None, batch["attention_mask"], speech=speech, speech_lengths=lengths).logits  # [B, T, V]

    # by hand: encoder -> own lengths -> stack 3 frames (zeros past the end) -> MLP -> splice into the prompt
    with torch.no_grad():
        enc, _ = model.speech_encoder.encode(speech, lengths)
        frames = lengths // 160 + 1
        t_enc = ((frames - 1) // 2 - 1) // 2
        T = batch["input_ids"].shape[1]
        rows, masks = [], []
        for b, ids in enumerate(prompts):
            e = enc[b, : int(t_enc[b])]
            e = torch.cat([e, torch.zeros(-e.shape[0] % 3, D_ENC)])
            feats = model.speech_adapter.linear_2(F.gelu(model.speech_adapter.linear_1(e.reshape(-1, 3 * D_ENC))))
            at = ids.index(a)
            emb = model.language_model.embed_tokens
            before, after = torch.tensor(ids[:at], dtype=torch.long), torch.tensor(ids[at + 1:], dtype=torch.long)
            row = torch.cat([emb(before), feats, emb(after)])
            pad = T - row.shape[0]
            rows.append(torch.cat([torch.zeros(pad, D_LLM), row]))
            masks.append([0] * pad + [1] * row.shape[0])
        mask = torch.tensor(masks)
        want = model.language_model(attention_mask=mask, inputs_embeds=torch.stack(rows))
    real = mask.bool()
    torch.testing.assert_close(logits[real], want[real], rtol=1e-5, atol=1e-5)
    assert n.tolist() == [math.ceil(int(t) / 3) for t in t_enc]
    # a text-only batch is the plain decoder
    ids = torch.tensor([[1, 5, 6, 7]])
    torch.testing.assert_close(model(ids).logits, model.language_model(ids), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- joint decoding


def reference_beam_search(llm, prompt_embeds, beam, max_new, eos):
    """Plain beam search of one prompt [T, D] over the LLM alone, recomputing every hypothesis from scratch."""
    running = [([], 0.0)]
    ended = []
    for i in range(max_new):
        cands = []
        for toks, s in running:
            h = prompt_embeds
            if toks:
                h = torch.cat([h, llm.embed_tokens(torch.tensor(toks))])
            lp = torch.log_softmax(llm(inputs_embeds=h[None])[0, -1].float(), -1)
            cands += [(toks + [c], s + float(lp[c])) for c in range(lp.shape[0])]
        cands.sort(key=lambda c: c[1], reverse=True)
        running = []
        for toks, s in cands[:beam]:
            if toks[-1] == eos:
                ended.append((toks[:-1], s))
            elif i == max_new - 1:
                ended.append((toks, s))
            else:
                running.append((toks, s))
        if not running:
            break
    return max(ended, key=lambda e: e[1])


@torch.no_grad()
def test_joint_search_without_ctc_equals_plain_llm_beam_search():
    torch.manual_seed(3)
    llm = LlamaForCausalLM(text_config(vocab=12)).eval()
    lengths = [5, 3]
    embeds = torch.zeros(2, 5, D_LLM)
    mask = torch.zeros(2, 5, dtype=torch.long)
    prompts = [torch.randn(n, D_LLM) for n in lengths]
    for b, p in enumerate(prompts):
        embeds[b, 5 - len(p):], mask[b, 5 - len(p):] = p, 1
    ended_on_eos = 0
    for beam, eos in ((1, EOS), (3, EOS), (3, 8), (4, 10)):  # this LLM likes 8 and 10: those hypotheses end early
        hyps = joint_beam_search(llm, embeds, mask, None, None, eos_token_id=eos, beam_size=beam, ctc_weight=0.0,
                                 max_new_tokens=6)
        ended_on_eos += sum(h.yseq[-1] == eos for nbest in hyps for h in nbest)
        for b, p in enumerate(prompts):
            tokens, score = reference_beam_search(llm, p, beam, 6, eos)
            assert hyps[b][0].tokens == tokens
            assert hyps[b][0].score == pytest.approx(score, abs=1e-4)
            assert hyps[b][0].scores["llm"] == pytest.approx(score, abs=1e-4)
    assert ended_on_eos > 0


def test_joint_search_beam1_llm_only_equals_greedy_generate():
    """Beam 1 over the decoder alone is greedy decoding: the joint search equals `generate` (through the KV cache)
    and the streamed tokens, for two utterances in one left-padded batch."""
    model = tiny_model(seed=4, k=2)
    a = V
    speech, lengths = speech_batch([3200, 2000], seed=2)
    batch = build_speech_batch([[1, a, 5], [1, 6, a]], model.feature_lengths(lengths), a)
    batch.update(speech=speech, speech_lengths=lengths)
    T = batch["input_ids"].shape[1]
    new = model.generate(batch["input_ids"], None, batch["attention_mask"], 8, speech=speech, speech_lengths=lengths,
                         eos_token_id=EOS)[:, T:]  # [B, 8]
    hyps, _, _ = model.joint_search(batch, max_new_tokens=8, ctc_weight=0.0, beam_size=1, eos_token_id=EOS)
    streamed = torch.stack(list(model.stream_tokens(batch["input_ids"], None, batch["attention_mask"], speech=speech,
                                                    speech_lengths=lengths, max_new_tokens=8, eos_token_id=EOS)), dim=1)
    assert torch.equal(streamed, new)
    for b in range(2):
        greedy = new[b].tolist()
        greedy = greedy[: greedy.index(EOS)] if EOS in greedy else greedy
        assert hyps[b][0].tokens == greedy


def peaky_log_probs(paths, T, vocab, wrong=None):
    """CTC log-probs [B, T, V] whose best path is each given frame path (padded with blanks past its length)."""
    logits = torch.zeros(len(paths), T, vocab)
    for b, path in enumerate(paths):
        for t, s in enumerate(path):
            logits[b, t, s] = 10.0
        logits[b, len(path):, 0] = 10.0
    if wrong is not None:
        logits[..., wrong] = -10.0  # the audio holds no trace of this token
    return torch.log_softmax(logits, -1)


@torch.no_grad()
def test_joint_search_ctc_only_equals_ctc_prefix_beam_search():
    torch.manual_seed(5)
    llm = LlamaForCausalLM(text_config()).eval()
    paths = [[5, 5, 0, 7, 0, 7, 7, 0, 3, 3, 0, 0], [9, 0, 0, 11, 11, 4, 0, 0]]
    lengths = torch.tensor([12, 8])
    lp = peaky_log_probs(paths, 12, V)
    embeds = llm.embed(torch.tensor([[1, 5, 6], [1, 8, 6]]))
    hyps = joint_beam_search(llm, embeds, None, lp, lengths, eos_token_id=EOS, beam_size=4, ctc_weight=1.0,
                             max_new_tokens=10)
    for b, want in enumerate([[5, 7, 7, 3], [9, 11, 4]]):
        ref_tokens, ref_score = ctc_prefix_beam_search(lp[b, : int(lengths[b])], 4)[0]
        assert hyps[b][0].tokens == ref_tokens == want
        # the scores telescope to log P_ctc(transcript), which torch's CTC loss gives independently
        nll = F.ctc_loss(lp[b, : int(lengths[b])], torch.tensor(want), torch.tensor([int(lengths[b])]),
                         torch.tensor([len(want)]), reduction="sum")
        assert hyps[b][0].score == pytest.approx(-float(nll), abs=1e-3)
        assert ref_score == pytest.approx(-float(nll), abs=1e-3)


def biased_llm(favourite: int, plausible: list[int]) -> LlamaForCausalLM:
    """An LLM whose next-token distribution ignores the context: `favourite` by far, then `plausible`, then the rest."""
    torch.manual_seed(6)
    llm = LlamaForCausalLM(text_config()).eval()
    with torch.no_grad():
        for layer in llm.layers:  # no residual updates: the last hidden state is the last input embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        llm.embed_tokens.weight.zero_()
        llm.embed_tokens.weight[:, 0] = 1.0  # every token embeds to e_0, so RMSNorm gives sqrt(D) e_0
        z = -2.0 - 0.1 * torch.arange(V).float()  # distinct, so the pre-beam has no ties
        z[plausible] = 2.0
        z[favourite] = 6.0
        llm.lm_head.weight.zero_()
        llm.lm_head.weight[:, 0] = z / math.sqrt(D_LLM)
    return llm


@torch.no_grad()
def test_joint_search_keeps_the_llm_on_the_audio():
    audio_tokens, wrong = [5, 7, 7, 3], 13
    llm = biased_llm(wrong, plausible=[5, 7, 3, EOS])
    lp = peaky_log_probs([[5, 5, 0, 7, 0, 7, 7, 0, 3, 3, 0, 0]], 12, V, wrong=wrong)
    lengths = torch.tensor([12])
    embeds = llm.embed(torch.tensor([[1, 4, 6]]))
    greedy = llm.generate(torch.tensor([[1, 4, 6]]), max_new_tokens=6, eos_token_id=EOS)[0, 3:].tolist()
    assert greedy == [wrong] * 6  # the LLM alone drifts
    llm_only = joint_beam_search(llm, embeds, None, lp, lengths, eos_token_id=EOS, beam_size=4, ctc_weight=0.0,
                                 max_new_tokens=8)[0][0]
    assert llm_only.tokens == [wrong] * 8
    joint = joint_beam_search(llm, embeds, None, lp, lengths, eos_token_id=EOS, beam_size=4, ctc_weight=0.5,
                              max_new_tokens=8)[0][0]
    assert joint.tokens == audio_tokens
    assert joint.yseq == audio_tokens + [EOS]


@torch.no_grad()
def test_only_the_llm_pre_beam_gets_a_ctc_score():
    # token 3 is in the audio but not among the LLM's int(1.5 * 4) = 6 best tokens (13, 5, 7, EOS, 0, 1)
    llm = biased_llm(13, plausible=[5, 7, EOS])
    lp = peaky_log_probs([[5, 5, 0, 7, 0, 7, 7, 0, 3, 3, 0, 0]], 12, V, wrong=13)
    embeds, lengths = llm.embed(torch.tensor([[1, 4, 6]])), torch.tensor([12])
    opts = dict(eos_token_id=EOS, beam_size=4, ctc_weight=0.5, max_new_tokens=8)
    pruned = joint_beam_search(llm, embeds, None, lp, lengths, **opts)[0]
    assert all(3 not in h.tokens for h in pruned)
    assert pruned[0].tokens[:3] == [5, 7, 7]
    full = joint_beam_search(llm, embeds, None, lp, lengths, pre_beam_ratio=V / 4, **opts)[0]  # pre-beam >= V: off
    assert full[0].tokens == [5, 7, 7, 3]


@torch.no_grad()
def test_the_fusion_models_small_vocabulary_gets_ctc_scores_for_every_token(monkeypatch):
    """FusionModel.joint_search turns the pre-beam off below CTC_SCORES_EVERY_TOKEN_BELOW: the token the audio holds
    is found though the decoder ranks it below its 6 best (as in the test above, through the model)."""
    model = tiny_model(seed=3)
    model.language_model.load_state_dict(biased_llm(13, plausible=[5, 7, EOS]).state_dict())
    speech, lengths = speech_batch([16000], seed=1)
    batch = build_speech_batch([[1, V, 4]], model.feature_lengths(lengths), V)
    batch.update(speech=speech, speech_lengths=lengths)
    T = int(model.speech_encoder.encode(speech, lengths)[1][0])  # CTC frames
    path = [5, 5, 0, 7, 0, 7, 7, 0, 3, 3]
    assert T > len(path)
    monkeypatch.setattr(model.ctc, "log_softmax", lambda enc: peaky_log_probs([path], enc.shape[1], V, wrong=13))
    opts = dict(max_new_tokens=8, ctc_weight=0.5, beam_size=4, eos_token_id=EOS)
    assert model.joint_search(batch, **opts)[0][0][0].tokens == [5, 7, 7, 3]
    assert 3 not in model.joint_search(batch, pre_beam_ratio=1.5, **opts)[0][0][0].tokens  # ESPnet's pre-beam


def test_reorder_kv_cache_selects_rows():
    llm = LlamaForCausalLM(text_config())
    cache = llm.new_kv_cache(3, 4)
    for t in cache.k + cache.v:
        t.normal_()
    k, v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
    cache.reorder(torch.tensor([2, 2, 0]))
    assert all(torch.equal(a, b[[2, 2, 0]]) for a, b in zip(cache.k + cache.v, k + v))


# ------------------------------------------------------------------------------------------- training


def test_training_overfits_and_every_part_learns():
    model = tiny_model(seed=7, k=2, ctc_weight=0.5).train()
    a = V
    answers = [[5, 9, 12], [7, 7, 3, 15], [11, 4], [20, 6, 8]]
    speech, lengths = speech_batch([6400, 5600, 7200, 4800], seed=3)  # random "speech", one utterance per answer
    with torch.no_grad():  # global MVN statistics of this tiny corpus, as feats_stats.npz would hold them
        feats, n_frames = model.speech_encoder.frontend(speech, lengths)
        real = torch.cat([feats[b, :n] for b, n in enumerate(n_frames.tolist())])
        model.speech_encoder.normalize.mean.copy_(real.mean(0))
        model.speech_encoder.normalize.std.copy_(real.std(0))
    prompts = [[1, 16, a, 17]] * 4
    batch = build_speech_batch(prompts, model.feature_lengths(lengths), a, answers=[x + [EOS] for x in answers])
    ys = torch.zeros(4, 4, dtype=torch.long)
    for b, x in enumerate(answers):
        ys[b, : len(x)] = torch.tensor(x)
    ys_lengths = torch.tensor([len(x) for x in answers])

    def step():
        return model(batch["input_ids"], None, batch["attention_mask"], speech=speech, speech_lengths=lengths, labels=batch["labels"],
                     ctc_targets=ys, ctc_target_lengths=ys_lengths)

    out = step()
    out.loss.backward()
    for part in (model.speech_encoder, model.ctc, model.speech_adapter, model.language_model):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0, type(part).__name__
    first = FusionOutput(None, out.loss.detach(), out.lm_loss.detach(), out.ctc_loss.detach())
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(50):
        opt.zero_grad()
        out = step()
        out.loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last = step()
    assert float(last.lm_loss) < 0.05 * float(first.lm_loss)
    assert float(last.ctc_loss) < 0.25 * float(first.ctc_loss)
    assert float(last.loss) < 0.15 * float(first.loss)
    # the overfit model answers from the audio, by greedy decoding and by joint decoding
    prompt = build_speech_batch(prompts, model.feature_lengths(lengths), a)
    prompt.update(speech=speech, speech_lengths=lengths)
    gen = model.generate(prompt["input_ids"], None, prompt["attention_mask"], 6, speech=speech, speech_lengths=lengths,
                         eos_token_id=EOS)[:, prompt["input_ids"].shape[1]:]
    hyps, _, _ = model.joint_search(prompt, max_new_tokens=6, ctc_weight=0.3, beam_size=3, eos_token_id=EOS)
    for b, x in enumerate(answers):
        assert gen[b, :len(x) + 1].tolist() == x + [EOS]
        assert hyps[b][0].tokens == x


def test_config_round_trip_and_size_check():
    cfg = tiny_config(mode="conv", k=3, tail="drop")
    assert MultimodalConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="MultimodalConfig: speech adapter maps 16 -> 30"):
        MultimodalConfig(text=cfg.text, vision=cfg.vision, speech=cfg.speech, audio_token_id=V, image_token_index=V + 1,
                         adapter=SpeechAdapterConfig(input_size=16, hidden_size=30))
