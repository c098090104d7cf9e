"""E-Branchformer encoder: numerical parity with ESPnet (espnet==202511) through our ESPnet converters."""
import json
import warnings

import numpy as np
import pytest
import torch

from decoders.checkpoint import CheckpointError, read_torch
from encoders.convert_espnet import convert_espnet_encoder_state_dict, load_espnet_encoder, load_espnet_speech_encoder
from encoders.ebranchformer import Conv2dSubsampling4, EBranchformerConfig, EBranchformerEncoder, SpeechTooShortError
from encoders.espnet_attention import rel_shift
from encoders.speech_encoder import SpeechEncoderConfig

import espnet2.asr.encoder.e_branchformer_encoder as espnet_encoder  # test-only reference (espnet==202511)
warnings.filterwarnings("ignore", category=FutureWarning)

# Dolphin-style (relative positions, macaron FFNs, wide merge conv) and OWSM v3.1-style (absolute positions)
DOLPHIN_LIKE = dict(
    output_size=32, attention_heads=4, attention_layer_type="rel_selfattn", pos_enc_layer_type="rel_pos",
    rel_pos_type="latest", cgmlp_linear_units=64, cgmlp_conv_kernel=31, num_blocks=2, use_ffn=True,
    macaron_ffn=True, linear_units=48, merge_conv_kernel=31, input_layer="conv2d",
)  # fmt: skip
OWSM_LIKE = dict(
    output_size=32, attention_heads=4, attention_layer_type="selfattn", pos_enc_layer_type="abs_pos",
    cgmlp_linear_units=64, cgmlp_conv_kernel=31, num_blocks=2, use_ffn=True, macaron_ffn=True, linear_units=48,
    merge_conv_kernel=3, input_layer="conv2d", use_flash_attn=False,
)  # fmt: skip


def espnet_reference(conf: dict, seed: int = 0) -> torch.nn.Module:
    """A random ESPnet encoder; parameters are jittered so LayerNorm/bias defaults (1/0) are not a special case."""
    torch.manual_seed(seed)
    ref = espnet_encoder.EBranchformerEncoder(input_size=80, **conf).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return ref


def padded_feats(lengths, dim=80, seed=1):
    """Random feats [B, max(lengths), dim] that are 0 past each length, as ESPnet's front end leaves them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), dim, generator=g)
    for b, n in enumerate(lengths):
        x[b, n:] = 0
    return x, torch.tensor(lengths)


def save_espnet_checkpoint(ref: torch.nn.Module, path) -> dict:
    """Write an ESPnet-ASR-model-shaped `.pth` (encoder + other parts) and read it back the safe way."""
    sd = {"encoder." + k: v for k, v in ref.state_dict().items()}
    sd["ctc.ctc_lo.weight"] = torch.randn(5, 32)  # parts of the ASR model that the encoder does not take
    sd["decoder.output_layer.weight"] = torch.randn(5, 32)
    torch.save(sd, path)
    return read_torch(path)


@pytest.mark.parametrize("conf", [DOLPHIN_LIKE, OWSM_LIKE], ids=["rel_pos", "abs_pos"])
def test_encoder_matches_espnet_on_padded_batch(conf, tmp_path):
    ref = espnet_reference(conf)
    sd = save_espnet_checkpoint(ref, tmp_path / "valid.acc.ave.pth")
    ours = load_espnet_encoder(sd, EBranchformerConfig.from_espnet(conf), "valid.acc.ave.pth").eval()

    feats, lengths = padded_feats([103, 64, 29])
    with torch.no_grad():
        want, want_lengths, _ = ref(feats, lengths)
        got, got_lengths = ours(feats, lengths)
    assert got.shape == want.shape
    assert got_lengths.tolist() == want_lengths.tolist()
    for b, n in enumerate(want_lengths.tolist()):
        err = (got[b, :n] - want[b, :n]).abs().max().item()
        assert err < 1e-4, f"utterance {b}: max abs error {err}"


@pytest.mark.parametrize("conf", [DOLPHIN_LIKE, OWSM_LIKE], ids=["rel_pos", "abs_pos"])
def test_encoder_matches_espnet_in_float64(conf):
    # in double precision the only differences left are rounding: a wrong formula could not hide under 1e-9
    ref = espnet_reference(conf, seed=3).double()
    sd = {"encoder." + k: v for k, v in ref.state_dict().items()}
    ours = load_espnet_encoder(sd, EBranchformerConfig.from_espnet(conf))
    ours = ours.double().eval()
    feats, lengths = padded_feats([41, 37], seed=4)
    with torch.no_grad():
        want, want_lengths, _ = ref(feats.double(), lengths)
        got, got_lengths = ours(feats.double(), lengths)
    assert got_lengths.tolist() == want_lengths.tolist()
    for b, n in enumerate(want_lengths.tolist()):
        assert (got[b, :n] - want[b, :n]).abs().max().item() < 1e-9


def test_rel_shift_matches_espnet():
    from espnet.nets.pytorch_backend.transformer.attention import RelPositionMultiHeadedAttention

    attn = RelPositionMultiHeadedAttention(2, 8, 0.0)
    for T in (1, 2, 5, 16):
        scores = torch.randn(3, 2, T, 2 * T - 1)
        assert torch.equal(rel_shift(scores), attn.rel_shift(scores))
        # and the definition: out[i, j] = scores[i, T-1-i+j] (offset i-j)
        i, j = T - 1, 0
        assert rel_shift(scores)[1, 1, i, j] == scores[1, 1, i, T - 1 - i + j]


@pytest.fixture
def one_thread():
    """Hundreds of tiny convolutions: thread start-up costs more than the work on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_subsampling_length_formula_for_every_length(one_thread):
    from espnet.nets.pytorch_backend.nets_utils import make_pad_mask
    from espnet.nets.pytorch_backend.transformer.subsampling import Conv2dSubsampling

    torch.manual_seed(0)
    ours = Conv2dSubsampling4(9, 2)  # the time axis is what matters; keep the rest tiny
    ref = Conv2dSubsampling(9, 2, 0.0)
    for T in range(7, 201):
        x = torch.randn(1, T, 9)
        with torch.no_grad():
            got = ours(x).size(1)
            want_x, want_mask = ref(x, (~make_pad_mask(torch.tensor([T])))[:, None, :])
        expected = ((T - 1) // 2 - 1) // 2
        assert got == expected == want_x.size(1) == int(want_mask.sum()), T
        assert Conv2dSubsampling4.output_lengths(torch.tensor([T]), T).item() == expected


def test_subsampling_lengths_in_a_padded_batch_follow_espnet_mask():
    from espnet.nets.pytorch_backend.nets_utils import make_pad_mask
    from espnet.nets.pytorch_backend.transformer.subsampling import Conv2dSubsampling

    ref = Conv2dSubsampling(9, 2, 0.0)
    for T in (7, 8, 9, 50, 51, 200):
        lengths = torch.arange(1, T + 1)  # every length up to the padded length
        mask = (~make_pad_mask(lengths, maxlen=T))[:, None, :]
        with torch.no_grad():
            _, want_mask = ref(torch.zeros(T, T, 9), mask)
        got = Conv2dSubsampling4.output_lengths(lengths, T)
        assert got.tolist() == want_mask[:, 0].sum(-1).tolist(), T


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 6])
def test_too_short_input_gives_a_clear_error(T):
    encoder = EBranchformerEncoder(EBranchformerConfig.from_espnet(DOLPHIN_LIKE)).eval()
    with pytest.raises(SpeechTooShortError, match=rf"has {T} frames.*at least 7 frames"):
        encoder(torch.randn(1, T, 80), torch.tensor([T]))


def test_bad_lengths_give_clear_errors():
    encoder = EBranchformerEncoder(EBranchformerConfig.from_espnet(DOLPHIN_LIKE)).eval()
    with pytest.raises(ValueError, match=r"1\.\.20"):
        encoder(torch.randn(2, 20, 80), torch.tensor([20, 0]))
    with pytest.raises(ValueError, match=r"1\.\.20"):
        encoder(torch.randn(2, 20, 80), torch.tensor([21, 3]))
    with pytest.raises(ValueError, match=r"\[B, T, 80\]"):
        encoder(torch.randn(2, 20, 40), torch.tensor([20, 3]))


def test_converter_reports_missing_extra_and_misshaped_keys():
    ref = espnet_reference(DOLPHIN_LIKE)
    config = EBranchformerConfig.from_espnet(DOLPHIN_LIKE)
    sd = {"encoder." + k: v for k, v in ref.state_dict().items()}

    missing = dict(sd)
    del missing["encoder.encoders.1.cgmlp.csgu.conv.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1: encoders\.1\.cgmlp\.csgu\.conv\.weight"):
        load_espnet_encoder(missing, config, "ckpt.pth")

    extra = dict(sd)
    extra["encoder.encoders.2.norm_mha.weight"] = torch.ones(32)  # a third block in a two-block config
    with pytest.raises(CheckpointError, match=r"unexpected 1: encoders\.2\.norm_mha\.weight"):
        load_espnet_encoder(extra, config, "ckpt.pth")

    wrong = dict(sd)
    wrong["encoder.after_norm.weight"] = torch.ones(64)
    with pytest.raises(CheckpointError, match=r"after_norm\.weight: expected \(32,\), got \(64,\)"):
        load_espnet_encoder(wrong, config, "ckpt.pth")

    with pytest.raises(CheckpointError, match="no `encoder.` keys"):
        convert_espnet_encoder_state_dict({"decoder.embed.0.weight": torch.zeros(2, 2)})

    # an OWSM (abs_pos) checkpoint has no linear_pos/pos_bias: loading it as rel_pos names them
    owsm = {"encoder." + k: v for k, v in espnet_reference(OWSM_LIKE).state_dict().items()}
    owsm_as_rel = EBranchformerConfig.from_espnet({**OWSM_LIKE, "attention_layer_type": "rel_selfattn",
                                                  "pos_enc_layer_type": "rel_pos", "use_flash_attn": False,
                                                  "merge_conv_kernel": 3})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"encoders\.0\.attn\.pos_bias_u"):
        load_espnet_encoder(owsm, owsm_as_rel, "owsm.pth")

    # checkpoints from ESPnet <= 0.5.2 stored the positional table; it is recomputed, so it is dropped
    legacy = dict(sd, **{"encoder.embed.out.1.pe": torch.zeros(1, 5000, 32)})
    assert "embed.out.1.pe" not in convert_espnet_encoder_state_dict(legacy)


def test_config_round_trip_and_espnet_conf_checks():
    config = EBranchformerConfig.from_espnet(DOLPHIN_LIKE)
    assert config.merge_conv_kernel == 31 and config.macaron_ffn and config.input_size == 80
    assert EBranchformerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # missing keys take ESPnet's constructor defaults
    assert EBranchformerConfig.from_espnet({}) == EBranchformerConfig(input_size=80)
    with pytest.raises(ValueError, match=r"unknown keys \['not_a_key'\]"):
        EBranchformerConfig.from_espnet({"not_a_key": 1})
    with pytest.raises(ValueError, match="rel_selfattn\\+rel_pos or selfattn\\+abs_pos"):
        EBranchformerConfig(attention_layer_type="selfattn", pos_enc_layer_type="rel_pos")
    with pytest.raises(ValueError, match="legacy"):
        EBranchformerConfig(rel_pos_type="legacy")
    with pytest.raises(ValueError, match="conv2d"):
        EBranchformerConfig(input_layer="conv2d8")
    with pytest.raises(ValueError, match="merge_conv_kernel must be odd"):
        EBranchformerConfig(merge_conv_kernel=4)


# ----------------------------------------------------------------------------------------------- whole model


def build_espnet_asr_model(stats_path, dropout: float = 0.0):
    """A tiny random ESPnetASRModel (front end, SpecAug, GlobalMVN, E-Branchformer, CTC) and its config.yaml dict."""
    from espnet2.asr.ctc import CTC
    from espnet2.asr.espnet_model import ESPnetASRModel
    from espnet2.asr.frontend.default import DefaultFrontend
    from espnet2.asr.specaug.specaug import SpecAug
    from espnet2.layers.global_mvn import GlobalMVN

    frontend_conf = {"fs": "16k", "n_fft": 512, "win_length": 400, "hop_length": 160}
    specaug_conf = {"apply_time_warp": False, "freq_mask_width_range": [0, 30], "num_freq_mask": 2,
                    "time_mask_width_range": [0, 50], "num_time_mask": 2}  # fmt: skip
    encoder_conf = dict(DOLPHIN_LIKE, dropout_rate=dropout, positional_dropout_rate=dropout)
    encoder = espnet_reference(encoder_conf, seed=5)
    tokens = ["<blank>", "<unk>", "a", "b", "<sos/eos>"]
    model = ESPnetASRModel(
        vocab_size=len(tokens), token_list=tokens, frontend=DefaultFrontend(**frontend_conf),
        specaug=SpecAug(**specaug_conf), normalize=GlobalMVN(stats_path), preencoder=None, encoder=encoder,
        postencoder=None, decoder=None, ctc=CTC(len(tokens), 32), joint_network=None, ctc_weight=1.0,
    )  # fmt: skip
    config_yaml = {
        "frontend": "default", "frontend_conf": frontend_conf, "specaug": "specaug", "specaug_conf": specaug_conf,
        "normalize": "global_mvn", "normalize_conf": {"stats_file": str(stats_path)},
        "encoder": "e_branchformer", "encoder_conf": encoder_conf, "decoder": None, "ctc_conf": {},
    }  # fmt: skip
    return model, config_yaml


def write_stats(path, dim=80, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(400, dim)) * 2.5 - 6.0
    np.savez(path, count=np.array(400), sum=f.sum(0), sum_square=(f**2).sum(0))
    return path


def test_speech_encoder_matches_espnet_asr_model_encode(tmp_path):
    model, config_yaml = build_espnet_asr_model(write_stats(tmp_path / "feats_stats.npz"))
    model.eval()
    torch.save(model.state_dict(), tmp_path / "valid.acc.ave.pth")
    config = SpeechEncoderConfig.from_espnet(config_yaml)
    ours = load_espnet_speech_encoder(read_torch(tmp_path / "valid.acc.ave.pth"), config, "valid.acc.ave.pth").eval()
    assert SpeechEncoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config

    torch.manual_seed(7)
    speech = 0.1 * torch.randn(2, 16400)  # extra padding beyond the longest utterance, as a data loader may leave
    speech_lengths = torch.tensor([16000, 9041])
    speech[1, 9041:] = 0
    with torch.no_grad():
        want, want_lengths = model.encode(speech, speech_lengths)
        got, got_lengths = ours.encode(speech, speech_lengths)
    assert got_lengths.tolist() == want_lengths.tolist() == [24, 15]
    assert got.shape == want.shape
    for b, n in enumerate(want_lengths.tolist()):
        assert (got[b, :n] - want[b, :n]).abs().max().item() < 1e-4


def test_speech_encoder_training_mode_applies_specaug_like_espnet(tmp_path):
    # no dropout, so training mode differs from eval only by SpecAugment, drawn from the same seeded RNG
    model, config_yaml = build_espnet_asr_model(write_stats(tmp_path / "feats_stats.npz"), dropout=0.0)
    ours = load_espnet_speech_encoder(model.state_dict(), SpeechEncoderConfig.from_espnet(config_yaml))
    model.train()
    ours.train()
    speech = 0.1 * torch.randn(2, 24000)
    speech_lengths = torch.tensor([24000, 20000])
    with torch.no_grad():
        torch.manual_seed(11)
        want, want_lengths = model.encode(speech.clone(), speech_lengths)
        torch.manual_seed(11)
        got, got_lengths = ours.encode(speech.clone(), speech_lengths)
        ours.eval()
        clean, _ = ours.encode(speech.clone(), speech_lengths)
    assert got_lengths.tolist() == want_lengths.tolist()
    for b, n in enumerate(want_lengths.tolist()):
        assert (got[b, :n] - want[b, :n]).abs().max().item() < 1e-4
    assert (got - clean).abs().max().item() > 1e-2  # the masks did change the output


def test_speech_encoder_too_short_audio_error(tmp_path):
    _, config_yaml = build_espnet_asr_model(write_stats(tmp_path / "feats_stats.npz"))
    from encoders.speech_encoder import SpeechEncoder

    ours = SpeechEncoder(SpeechEncoderConfig.from_espnet(config_yaml)).eval()
    with pytest.raises(SpeechTooShortError, match="has 6 frames"):
        ours.encode(torch.randn(1, 959), torch.tensor([959]))  # 959 // 160 + 1 = 6 frames
    enc, enc_lengths = ours.encode(torch.randn(1, 960), torch.tensor([960]))  # 7 frames -> 1 output frame
    assert enc.shape == (1, 1, 32) and enc_lengths.tolist() == [1]


@pytest.mark.parametrize("conf", [DOLPHIN_LIKE, OWSM_LIKE], ids=["rel_pos", "abs_pos"])
def test_gradients_match_espnet(conf):
    # training path (strided rel_shift, SDPA with an additive mask) must back-propagate like ESPnet's
    conf = dict(conf, dropout_rate=0.0, positional_dropout_rate=0.0)
    ref = espnet_reference(conf, seed=8).train()
    sd = {"encoder." + k: v for k, v in ref.state_dict().items()}
    ours = load_espnet_encoder(sd, EBranchformerConfig.from_espnet(conf))
    ours.train()
    feats, lengths = padded_feats([45, 30], seed=9)
    probe = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(10))
    losses = []
    for model in (ref, ours):
        out = model(feats, lengths)
        enc, enc_lengths = out[0], out[1]
        valid = (torch.arange(enc.size(1))[None, :] < enc_lengths[:, None])[:, :, None]
        losses.append((enc * probe * valid).sum())
        losses[-1].backward()
    assert abs(losses[0].item() - losses[1].item()) < 1e-3
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        want = ref_grads[name].grad
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert (p.grad - want).abs().max().item() <= 1e-4 * (1 + want.abs().max().item()), name


def test_speech_encoder_runs_in_bfloat16(tmp_path):
    # the caller picks the dtype: the front end still computes in float32, the encoder in bfloat16
    model, config_yaml = build_espnet_asr_model(write_stats(tmp_path / "feats_stats.npz"))
    ours = load_espnet_speech_encoder(model.state_dict(), SpeechEncoderConfig.from_espnet(config_yaml)).eval()
    speech, speech_lengths = 0.1 * torch.randn(2, 8000), torch.tensor([8000, 6000])
    with torch.no_grad():
        want, want_lengths = ours.encode(speech, speech_lengths)
        got, got_lengths = ours.to(torch.bfloat16).encode(speech, speech_lengths)
    assert got.dtype == torch.bfloat16 and got_lengths.tolist() == want_lengths.tolist()
    n = want_lengths.min().item()
    err = (got[:, :n].float() - want[:, :n]).abs().max().item()
    assert err < 0.1 * want[:, :n].abs().max().item(), err


def test_speech_config_from_espnet_refuses_what_it_cannot_run(tmp_path):
    _, config_yaml = build_espnet_asr_model(write_stats(tmp_path / "feats_stats.npz"))
    config = SpeechEncoderConfig.from_espnet(config_yaml)
    assert config.global_mvn and config.specaug.freq_mask_width_range == (0, 30) and config.frontend.hop_length == 160
    assert SpeechEncoderConfig.from_espnet(dict(config_yaml, specaug=None)).specaug is None
    with pytest.raises(ValueError, match="encoder='conformer' is not supported"):
        SpeechEncoderConfig.from_espnet(dict(config_yaml, encoder="conformer"))
    with pytest.raises(ValueError, match="normalize='utterance_mvn' is not supported"):
        SpeechEncoderConfig.from_espnet({k: v for k, v in config_yaml.items() if k != "normalize"})
    with pytest.raises(ValueError, match="input_size 80 != frontend n_mels 40"):
        SpeechEncoderConfig.from_espnet(dict(config_yaml, encoder_conf=dict(config_yaml["encoder_conf"], input_size=80),
                                             frontend_conf=dict(config_yaml["frontend_conf"], n_mels=40)))
