"""Log-mel front end, global MVN and SpecAugment against ESPnet's DefaultFrontend, GlobalMVN and SpecAug."""
import json
import warnings

import librosa
import numpy as np
import pytest
import torch
from espnet2.asr.frontend.default import DefaultFrontend  # test-only reference (espnet==202511)
from espnet2.asr.specaug.specaug import SpecAug
from espnet2.layers.global_mvn import GlobalMVN as EspnetGlobalMVN

from encoders.frontend import FrontendConfig, GlobalMVN, LogMelFrontend, SpecAugment, SpecAugmentConfig

warnings.filterwarnings("ignore", category=FutureWarning)


def write_stats(path, dim=80, seed=0):
    """A feats_stats.npz as ESPnet's collect_stats writes it: count, sum, sum_square over frames."""
    rng = np.random.default_rng(seed)
    frames = rng.normal(size=(300, dim)) * rng.uniform(0.5, 4.0, size=dim) - 7.0
    np.savez(path, count=np.array(300), sum=frames.sum(0), sum_square=(frames**2).sum(0))
    return path


def padded_speech(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    speech = 0.1 * torch.randn(len(lengths), max(lengths), generator=g)
    for b, n in enumerate(lengths):
        speech[b, n:] = 0
    return speech, torch.tensor(lengths)


def test_features_match_espnet_default_frontend_and_global_mvn(tmp_path):
    stats = write_stats(tmp_path / "feats_stats.npz")
    ref_frontend = DefaultFrontend(fs="16k", n_fft=512, win_length=400, hop_length=160).eval()
    ref_mvn = EspnetGlobalMVN(stats)
    frontend = LogMelFrontend(FrontendConfig()).eval()
    mvn = GlobalMVN.from_stats_file(stats)

    # same weight names and values as the ESPnet modules' state dicts
    assert list(frontend.state_dict()) == list(ref_frontend.state_dict()) == ["logmel.melmat"]
    assert frontend.logmel.melmat.shape == (257, 80)
    assert torch.equal(frontend.logmel.melmat, ref_frontend.state_dict()["logmel.melmat"])
    assert sorted(mvn.state_dict()) == sorted(ref_mvn.state_dict()) == ["mean", "std"]

    speech, lengths = padded_speech([16000, 11111])
    with torch.no_grad():
        want, want_lengths = ref_mvn(*ref_frontend(speech, lengths))
        got, got_lengths = mvn(*frontend(speech, lengths))
    assert got_lengths.tolist() == want_lengths.tolist() == [101, 70]  # samples // 160 + 1
    assert got.shape == want.shape == (2, 101, 80)
    assert (got - want).abs().max().item() < 1e-4
    assert torch.all(got[1, 70:] == 0)  # padded frames are zero, as ESPnet leaves them


def test_mel_matrix_is_librosa_slaney():
    melmat = LogMelFrontend().logmel.melmat
    want = librosa.filters.mel(sr=16000, n_fft=512, n_mels=80, fmin=0, fmax=8000, htk=False).T
    assert np.array_equal(melmat.numpy(), want.astype(np.float32))


def test_tone_lands_in_its_mel_band():
    # independent of ESPnet: a 1 kHz tone peaks in the mel band centred nearest 1 kHz
    t = torch.arange(16000) / 16000
    speech = torch.sin(2 * torch.pi * 1000.0 * t)[None]
    feats, _ = LogMelFrontend()(speech, torch.tensor([16000]))
    centres = librosa.mel_frequencies(n_mels=82, fmin=0, fmax=8000, htk=False)[1:-1]
    assert feats[0, 50].argmax().item() == int(np.abs(centres - 1000.0).argmin())
    # and the energy: a unit sine under a Hann window of 400 has |X|^2 = (sum(w)/2)^2 at its bin
    power = (torch.hann_window(400).sum() / 2) ** 2
    assert feats[0, 50].max().item() < float(torch.log(power)) and feats[0, 50].max().item() > 0


@pytest.mark.parametrize("n", [257, 959, 960, 1599, 1600, 16001])
def test_frame_counts(n):
    frontend = LogMelFrontend()
    speech = torch.randn(1, n)
    feats, lengths = frontend(speech, torch.tensor([n]))
    reference = DefaultFrontend(fs=16000, n_fft=512, win_length=400, hop_length=160)
    ref_feats, ref_lengths = reference(speech, torch.tensor([n]))
    assert feats.size(1) == lengths.item() == n // 160 + 1 == ref_lengths.item() == ref_feats.size(1)


def test_too_few_samples_for_the_stft_is_a_clear_error():
    with pytest.raises(ValueError, match=r"100 samples.*at least 257"):
        LogMelFrontend()(torch.randn(1, 100), torch.tensor([100]))


def test_global_mvn_matches_espnet_on_kaldi_npy_and_flags(tmp_path):
    rng = np.random.default_rng(1)
    frames = rng.normal(size=(50, 80)) * 2 + 1
    kaldi = np.zeros((2, 81))
    kaldi[0, :80], kaldi[0, 80] = frames.sum(0), 50
    kaldi[1, :80] = (frames**2).sum(0)
    np.save(tmp_path / "cmvn.npy", kaldi)
    feats = torch.randn(2, 9, 80)
    lengths = torch.tensor([9, 4])
    for norm_means, norm_vars in [(True, True), (True, False), (False, True)]:
        ref = EspnetGlobalMVN(tmp_path / "cmvn.npy", norm_means=norm_means, norm_vars=norm_vars)
        ours = GlobalMVN.from_stats_file(tmp_path / "cmvn.npy", norm_means=norm_means, norm_vars=norm_vars)
        want, _ = ref(feats.clone(), lengths)
        got, _ = ours(feats.clone(), lengths)
        assert (got - want).abs().max().item() < 1e-5


def test_global_mvn_bad_files(tmp_path):
    with pytest.raises(ValueError, match="no such feature statistics file"):
        GlobalMVN.from_stats_file(tmp_path / "missing.npz")
    np.savez(tmp_path / "partial.npz", count=np.array(3), sum=np.zeros(80))
    with pytest.raises(ValueError, match=r"partial\.npz: missing arrays \['sum_square'\]"):
        GlobalMVN.from_stats_file(tmp_path / "partial.npz")
    (tmp_path / "junk.npz").write_text("not numpy")
    with pytest.raises(ValueError, match="junk.npz: not a readable"):
        GlobalMVN.from_stats_file(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="feats have 40 features, the statistics have 80"):
        GlobalMVN.from_stats_file(write_stats(tmp_path / "s.npz"))(torch.randn(1, 5, 40), torch.tensor([5]))


@pytest.mark.parametrize(
    "espnet_conf",
    [
        # Dolphin: 2 frequency masks of 0-30 bins, 2 time masks of 0-50 frames, no time warp
        dict(apply_time_warp=False, freq_mask_width_range=[0, 30], num_freq_mask=2,
             time_mask_width_range=[0, 50], num_time_mask=2),
        # OWSM v3.1: time masks sized by a ratio of the length
        dict(apply_time_warp=False, freq_mask_width_range=[0, 27], num_freq_mask=2,
             time_mask_width_ratio_range=[0.0, 0.05], num_time_mask=10),
        dict(apply_time_warp=False, freq_mask_width_range=[5, 10], num_freq_mask=1,
             time_mask_width_range=[3, 20], num_time_mask=3, replace_with_zero=False),
    ],
    ids=["dolphin", "owsm", "mean-fill"],
)  # fmt: skip
def test_specaugment_draws_the_same_masks_as_espnet(espnet_conf):
    ref = SpecAug(**espnet_conf).train()
    ours = SpecAugment(SpecAugmentConfig.from_espnet(espnet_conf)).train()
    feats = torch.randn(3, 400, 80) + 5.0  # away from zero so every mask is visible
    lengths = torch.tensor([400, 300, 200])
    for seed in range(5):
        torch.manual_seed(seed)
        want, _ = ref(feats.clone(), lengths)
        torch.manual_seed(seed)
        got, got_lengths = ours(feats.clone(), lengths)
        assert torch.equal(got, want)
        assert torch.equal(got_lengths, lengths)


def test_specaugment_mask_widths_and_eval_mode():
    ours = SpecAugment(SpecAugmentConfig())  # Dolphin defaults
    feats = torch.randn(4, 500, 80) + 5.0
    lengths = torch.full((4,), 500)
    ours.train()
    torch.manual_seed(0)
    got, _ = ours(feats, lengths)
    for b in range(4):
        masked = got[b] == 0
        freq_cols = masked.all(dim=0).sum().item()  # bins masked over all frames
        time_rows = masked.all(dim=1).sum().item()  # frames masked over all bins
        assert freq_cols <= 2 * 29 and time_rows <= 2 * 49
        assert torch.equal(got[b][~masked], feats[b][~masked])  # nothing else changed
    ours.eval()
    same, _ = ours(feats, lengths)
    assert same is feats


def test_specaugment_time_warp_is_refused_only_when_training():
    conf = SpecAugmentConfig.from_espnet({"time_mask_width_range": [0, 40]})  # ESPnet's default: warp on
    assert conf.apply_time_warp and conf.freq_mask_width_range == (0, 20)
    aug = SpecAugment(conf)
    feats = torch.randn(1, 50, 80)
    assert aug.eval()(feats, torch.tensor([50]))[0] is feats  # inference never needs it
    with pytest.raises(NotImplementedError, match="time warping"):
        aug.train()(feats, torch.tensor([50]))


def test_configs_from_espnet_and_round_trip():
    conf = FrontendConfig.from_espnet({"fs": "16k", "n_fft": 512, "win_length": 400, "hop_length": 160})
    assert conf == FrontendConfig()
    bare = FrontendConfig.from_espnet({})  # ESPnet's own defaults: hop 128, window = n_fft
    assert (bare.hop_length, bare.win_length, bare.sample_rate) == (128, 512, 16000)
    assert FrontendConfig.from_dict(json.loads(json.dumps(conf.to_dict()))) == conf
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        FrontendConfig.from_espnet({"bogus": 1})
    with pytest.raises(ValueError, match="center=False is not supported"):
        FrontendConfig.from_espnet({"center": False})
    spec = SpecAugmentConfig()
    assert SpecAugmentConfig.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
