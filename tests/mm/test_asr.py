"""The complete ASR model against ESPnet (espnet==202511): random ESPnetASRModel experiments written the way ESPnet
lays them out (config.yaml dumped from ASRTask's parser, valid.acc.ave.pth, feats_stats.npz, a sentencepiece BPE
model and its token list from espnet2.bin.tokenize_text), loaded through ASRModel.from_espnet_dir, compared with
ESPnet's own encode() and Speech2Text."""
import json
import os
from itertools import groupby
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import yaml

from decoders.checkpoint import CheckpointError
from mm.models.asr import ASRModel
from mm.models.espnet_files import find_espnet_files, is_espnet_dir
from mm.models.formats import TRANSCRIBERS, detect, load

# espnet 202511 warns about deprecated torch APIs and missing optional packages
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ENCODERS = {
    # Dolphin: relative positions, macaron FFNs, wide merge conv
    "rel_pos": dict(output_size=32, attention_heads=4, attention_layer_type="rel_selfattn",
                    pos_enc_layer_type="rel_pos", rel_pos_type="latest", cgmlp_linear_units=64, cgmlp_conv_kernel=31,
                    num_blocks=2, use_ffn=True, macaron_ffn=True, linear_units=48, merge_conv_kernel=31,
                    input_layer="conv2d"),
    # OWSM v3.1: absolute positions, plain self-attention
    "abs_pos": dict(output_size=32, attention_heads=4, attention_layer_type="selfattn", pos_enc_layer_type="abs_pos",
                    cgmlp_linear_units=64, cgmlp_conv_kernel=31, num_blocks=2, use_ffn=True, macaron_ffn=True,
                    linear_units=48, merge_conv_kernel=3, input_layer="conv2d", use_flash_attn=False),
}  # fmt: skip
SENTENCES = ["the cat sat on the mat", "a dog ran to the park", "she sells sea shells by the shore",
             "hello world how are you", "seven green apples fell down"]
DOLPHIN_SPECIALS = ["<en>", "<de>", "<US>", "<GB>", "<DE>", "<asr>", "<notimestamps>"]


def make_espnet_experiment(root: Path, encoder: str, prompts: bool = False, seed: int = 0) -> Path:
    """Write a recipe directory as ESPnet's asr.sh leaves it and return the experiment directory:
    data/token_list/bpe_bpe40/{bpe.model,tokens.txt}, exp/asr_stats/train/feats_stats.npz,
    exp/asr_train/{config.yaml,valid.acc.ave.pth}. Paths inside config.yaml are relative to root, as ESPnet's.
    prompts=True makes a Dolphin-style token list (<sos>/<eos>, language, region and task tokens)."""
    from espnet2.bin.tokenize_text import tokenize
    from espnet2.tasks.asr import ASRTask
    from espnet2.utils.yaml_no_alias_safe_dump import yaml_no_alias_safe_dump

    cwd = os.getcwd()
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    try:
        Path("data").mkdir(exist_ok=True)
        Path("data/train_text").write_text("\n".join(SENTENCES * 4) + "\n")
        bpe_dir = Path("data/token_list/bpe_bpe40")
        bpe_dir.mkdir(parents=True, exist_ok=True)
        spm.SentencePieceTrainer.train(input="data/train_text", vocab_size=40, model_type="bpe",
                                       model_prefix=str(bpe_dir / "bpe"), character_coverage=1.0,
                                       input_sentence_size=100000000, minloglevel=2)  # asr.sh's spm_train
        symbols = ["<blank>:0", "<unk>:1"] + ([f"{s}:{i + 2}" for i, s in enumerate(DOLPHIN_SPECIALS)] + ["<sos>:-1"]
                                             if prompts else ["<sos/eos>:-1"])
        tokenize(input="data/train_text", output=str(bpe_dir / "tokens.txt"), field=None, delimiter=None,
                 token_type="bpe", space_symbol="<space>", non_linguistic_symbols=None,
                 bpemodel=str(bpe_dir / "bpe.model"), log_level="ERROR", write_vocabulary=True, vocabulary_size=0,
                 remove_non_linguistic_symbols=False, cutoff=0, add_symbol=symbols, cleaner=None, g2p=None,
                 add_nonsplit_symbol=[])
        if prompts:  # Dolphin ends its list with <sos> <eos>
            with open(bpe_dir / "tokens.txt", "a") as f:
                f.write("<eos>\n")
        stats_dir = Path("exp/asr_stats/train")
        stats_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        feats = rng.normal(-6.0, 3.0, (400, 80)) + np.linspace(-2, 2, 80)
        np.savez(stats_dir / "feats_stats.npz", count=np.array(400), sum=feats.sum(0), sum_square=(feats**2).sum(0))
        exp = Path("exp/asr_train")
        exp.mkdir(parents=True, exist_ok=True)
        train = {
            "token_list": str(bpe_dir / "tokens.txt"), "token_type": "bpe", "bpemodel": str(bpe_dir / "bpe.model"),
            "frontend": "default", "frontend_conf": {"n_fft": 512, "win_length": 400, "hop_length": 160, "fs": "16k"},
            "specaug": "specaug", "specaug_conf": {"apply_time_warp": False, "freq_mask_width_range": [0, 27],
                                                   "num_freq_mask": 2, "time_mask_width_ratio_range": [0.0, 0.05],
                                                   "num_time_mask": 2},
            "normalize": "global_mvn", "normalize_conf": {"stats_file": str(stats_dir / "feats_stats.npz")},
            "model_conf": {"ctc_weight": 0.3, "lsm_weight": 0.1, "length_normalized_loss": False,
                           **({"sym_sos": "<sos>", "sym_eos": "<eos>"} if prompts else {})},
            "encoder": "e_branchformer", "encoder_conf": ENCODERS[encoder],
            "decoder": "transformer", "decoder_conf": {"attention_heads": 4, "linear_units": 64, "num_blocks": 2},
        }  # fmt: skip
        (exp / "train.yaml").write_text(yaml.safe_dump(train))
        args = ASRTask.get_parser().parse_args(["--config", str(exp / "train.yaml")])
        torch.manual_seed(seed)
        model = ASRTask.build_model(args)
        with torch.no_grad():
            for name, p in model.named_parameters():  # LayerNorm/bias defaults (1/0) would hide mistakes
                p.add_(0.2 * torch.randn_like(p))
            # sharpen the outputs so that hypotheses have several tokens and end before the maximum length
            model.ctc.ctc_lo.weight.mul_(4.0)
            # random encoders vary little over time: centre the CTC head on the mean frame of test signals so
            # that the frame-to-frame changes pick the tokens, with blank a little ahead
            model.eval()
            x = torch.from_numpy(np.concatenate(waveforms(seed + 10)))[None]
            mean_frame = model.encode(x, torch.tensor([x.shape[1]]))[0][0].mean(0)
            model.ctc.ctc_lo.bias.copy_(-model.ctc.ctc_lo.weight @ mean_frame)
            model.ctc.ctc_lo.bias[0] += 2.5
            model.decoder.output_layer.weight.mul_(4.0)
            model.decoder.output_layer.bias[model.eos] += 2.5
        with open(exp / "config.yaml", "w") as f:  # what ESPnet's trainer writes: every argument
            yaml_no_alias_safe_dump(vars(args), f, indent=4, sort_keys=False)
        torch.save(model.state_dict(), exp / "valid.acc.ave.pth")
        return root / exp
    finally:
        os.chdir(cwd)


def waveforms(seed: int = 0, seconds=(1.3, 0.9, 1.7), pitch=(120, 60), vibrato: float = 0.7,
              tremolo: float = 2) -> list[np.ndarray]:
    """Deterministic speech-like test signals: harmonic tones with moving pitch (pitch[0] +- pitch[1] Hz), bursts
    and noise."""
    rng = np.random.default_rng(seed)
    out = []
    for k, sec in enumerate(seconds):
        t = np.arange(int(16000 * sec)) / 16000
        f0 = pitch[0] + pitch[1] * np.sin(2 * np.pi * (vibrato + k) * t)
        phase = 2 * np.pi * np.cumsum(f0) / 16000
        x = sum(np.sin(h * phase) / h for h in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * (tremolo + k) * t) ** 2)
        out.append((0.2 * x + 0.02 * rng.standard_normal(t.size)).astype(np.float32))
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    """encoder kind -> experiment directory (rel_pos, abs_pos and a Dolphin-prompt rel_pos one)."""
    base = tmp_path_factory.mktemp("recipes")
    return {name: make_espnet_experiment(base / name, enc, prompts=(name == "prompt"), seed=i)
            for i, (name, enc) in enumerate([("rel_pos", "rel_pos"), ("abs_pos", "abs_pos"), ("prompt", "rel_pos")])}


def speech2text(exp: Path, **kw):
    """ESPnet's own inference object for an experiment (paths in its config are relative to the recipe root)."""
    from espnet2.bin.asr_inference import Speech2Text

    cwd = os.getcwd()
    os.chdir(exp.parent.parent)
    try:
        return Speech2Text(asr_train_config=str(exp / "config.yaml"), asr_model_file=str(exp / "valid.acc.ave.pth"),
                           bpemodel=str(exp.parent.parent / "data/token_list/bpe_bpe40/bpe.model"), device="cpu",
                           nbest=1, **kw)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("kind", ["rel_pos", "abs_pos"])
def test_encode_matches_espnet_on_padded_batch(experiments, kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in config.yaml must not depend on the working directory
    exp = experiments[kind]
    ours = ASRModel.from_espnet_dir(exp)
    ref = speech2text(exp, ctc_weight=0.3, beam_size=2).asr_model
    waves = waveforms(1, (1.1, 0.5, 0.8))
    lengths = torch.tensor([w.size for w in waves])
    batch = torch.zeros(3, int(lengths.max()))
    for b, w in enumerate(waves):
        batch[b, : w.size] = torch.from_numpy(w)
    with torch.no_grad():
        want, want_lengths = ref.encode(batch, lengths)
        got, got_lengths = ours.encode(batch, lengths)
    assert got_lengths.tolist() == want_lengths.tolist()
    assert want_lengths.tolist()[0] == ((17600 // 160 + 1 - 1) // 2 - 1) // 2 == 27  # 111 feature frames
    for b, n in enumerate(want_lengths.tolist()):
        err = (got[b, :n] - want[b, :n]).abs().max().item()
        assert err < 1e-4, f"utterance {b}: max abs error {err}"
    assert want[0].abs().max() > 0.1  # real numbers were compared


@pytest.mark.parametrize("kind", ["rel_pos", "abs_pos"])
def test_ctc_greedy_matches_espnet(experiments, kind):
    exp = experiments[kind]
    ours = ASRModel.from_espnet_dir(exp)
    s2t = speech2text(exp, ctc_weight=1.0, beam_size=1)
    m = s2t.asr_model
    lengths_seen = []
    for w in waveforms(2):
        x = torch.from_numpy(w)[None]
        with torch.no_grad():
            enc, _ = m.encode(x, torch.tensor([w.size]))
            best = m.ctc.argmax(enc)[0].tolist()
        # ESPnet's greedy CTC (Speech2Text._decode_interctc): collapse repeats, drop blank/sos/eos
        ids = [t for t, _ in groupby(best) if t not in (m.blank_id, m.sos, m.eos)]
        tokens = s2t.converter.ids2tokens(ids)
        got = ours.transcribe(w, sample_rate=16000, decode="ctc")
        assert got.token_ids == ids
        assert got.tokens == tokens
        assert got.text == s2t.tokenizer.tokens2text(tokens)
        lengths_seen.append(len(ids))
    assert min(lengths_seen) >= 2


@pytest.mark.parametrize("kind,ctc_weight,beam", [("rel_pos", 0.3, 4), ("rel_pos", 0.5, 3), ("abs_pos", 0.3, 4)])
def test_joint_beam_search_matches_speech2text(experiments, kind, ctc_weight, beam):
    exp = experiments[kind]
    ours = load(exp)  # the format table every entry point uses
    s2t = speech2text(exp, ctc_weight=ctc_weight, beam_size=beam)
    n_tokens = []
    for w in waveforms(3, (0.9, 0.6, 1.1)):
        text, tokens, token_int, hyp = s2t(w)[0]
        got = ours.transcribe(w, sample_rate=16000, decode="joint", beam=beam, ctc_weight=ctc_weight)
        assert got.token_ids == token_int
        assert got.tokens == tokens
        assert got.text == text
        n_tokens.append(len(token_int))
    assert min(n_tokens) >= 2


def test_attention_only_and_default_joint_weight(experiments):
    exp = experiments["rel_pos"]
    ours = ASRModel.from_espnet_dir(exp)
    w = waveforms(4)[0]
    text, tokens, token_int, _ = speech2text(exp, ctc_weight=0.0, beam_size=3)(w)[0]
    assert ours.transcribe(w, sample_rate=16000, decode="attention", beam=3).token_ids == token_int
    # decode="joint" without ctc_weight uses Speech2Text's default 0.5
    text, tokens, token_int, _ = speech2text(exp, beam_size=3)(w)[0]
    got = ours.transcribe(w, sample_rate=16000, beam=3)
    assert got.token_ids == token_int and got.text == text and len(token_int) >= 2


def test_rescore_uses_decoder_on_ctc_nbest(experiments):
    from decoders.ctc import ctc_prefix_beam_search

    ours = ASRModel.from_espnet_dir(experiments["rel_pos"])
    w = waveforms(5)[1]
    got = ours.transcribe(w, sample_rate=16000, decode="rescore", beam=4)
    x = torch.from_numpy(w)[None]
    enc, enc_lengths = ours.encode(x, torch.tensor([w.size]))
    nbest = [tuple(t) for t, _ in ctc_prefix_beam_search(ours.ctc_log_probs(enc)[0], 4)]
    assert tuple(got.token_ids) in nbest  # rescoring picks from the CTC n-best ...
    assert ours.config.ctc_weight == 0.3  # ... with the training config's CTC weight


def test_dolphin_prompt_language_detection_and_prefix(experiments):
    """Dolphin-style list: language/region detected as Dolphin's detect_language does (decoder log-probs after
    <sos>, restricted to the language tokens; then after <sos><lang> to the region tokens), and the attention
    search primed with <sos><lang><region><asr><notimestamps> equals ESPnet's BatchBeamSearch with that hyp_primer
    (Dolphin decodes with the decoder alone: ctc_weight 0)."""
    exp = experiments["prompt"]
    ours = ASRModel.from_espnet_dir(exp)
    tl = ours.config.token_list
    assert tl[ours.config.sos] == "<sos>" and tl[ours.config.eos] == "<eos>"
    assert [tl[i] for i in ours.language_ids] == ["<en>", "<de>"]
    assert [tl[i] for i in ours.region_ids] == ["<US>", "<GB>", "<DE>"]
    s2t = speech2text(exp, ctc_weight=0.0, beam_size=3)
    m = s2t.asr_model
    for w in waveforms(6):
        x = torch.from_numpy(w)[None]
        with torch.no_grad():
            enc, _ = m.encode(x, torch.tensor([w.size]))
            lang_ids = [tl.index("<en>"), tl.index("<de>")]
            logp, _ = m.decoder.batch_score(torch.tensor([[m.sos]]), [None], enc)
            lang = lang_ids[int(logp[0, lang_ids].argmax())]
            logp, _ = m.decoder.batch_score(torch.tensor([[m.sos, lang]]), [None], enc)
            region_ids = [tl.index(t) for t in ("<US>", "<GB>", "<DE>")]
            region = region_ids[int(logp[0, region_ids].argmax())]
        primer = [m.sos, lang, region, tl.index("<asr>"), tl.index("<notimestamps>")]
        s2t.beam_search.set_hyp_primer(primer)
        _, _, token_int, _ = s2t(w)[0]
        got = ours.transcribe(w, sample_rate=16000, decode="attention", beam=3)
        assert (got.language, got.region) == (tl[lang][1:-1], tl[region][1:-1])
        assert token_int[: len(primer) - 1] == primer[1:]  # Speech2Text keeps the primer after <sos>
        assert got.token_ids == token_int[len(primer) - 1:]
        # a given language skips detection of the language, not of the region
        forced = ours.transcribe(w, sample_rate=16000, decode="ctc", language="de")
        assert forced.language == "de" and forced.region in ("US", "GB", "DE")
    # detection follows the decoder: push one language / region up and it is picked
    w = waveforms(6)[0]
    with torch.no_grad():
        for lang, region in (("de", "GB"), ("en", "DE"), ("de", "US")):
            bias = ours.decoder.output_layer.bias
            saved = bias.clone()
            bias[tl.index(f"<{lang}>")] += 30.0
            bias[tl.index(f"<{region}>")] += 30.0
            got = ours.transcribe(w, sample_rate=16000, decode="ctc")
            bias.copy_(saved)
            assert (got.language, got.region) == (lang, region)
    with pytest.raises(ValueError, match=r"language 'fr' is not one of this model's languages \(en, de\)"):
        ours.transcribe(waveforms(6)[0], sample_rate=16000, language="fr")


def test_save_pretrained_round_trip(experiments, tmp_path):
    ours = ASRModel.from_espnet_dir(experiments["abs_pos"])
    ours.save_pretrained(tmp_path / "asr")
    assert sorted(p.name for p in (tmp_path / "asr").iterdir()) == ["config.json", "model.safetensors",
                                                                    "tokenizer.model"]
    assert detect(tmp_path / "asr") == "mm-asr" and not is_espnet_dir(tmp_path / "asr")
    again = load(tmp_path / "asr")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    w = waveforms(7)[0]
    a = ours.transcribe(w, sample_rate=16000, decode="joint", beam=3, timestamps=True)
    b = again.transcribe(w, sample_rate=16000, decode="joint", beam=3, timestamps=True)
    assert a == b and len(a.token_ids) >= 2
    assert json.loads((tmp_path / "asr" / "config.json").read_text())["model_type"] == "mm-asr"


def test_finding_files_and_stats_from_the_npz(experiments, tmp_path):
    exp = experiments["rel_pos"]
    root = exp.parent.parent
    assert is_espnet_dir(exp) and is_espnet_dir(root) and not is_espnet_dir(root / "data")
    files = find_espnet_files(root)  # the recipe root: exp/*/config.yaml
    assert files["config"] == exp / "config.yaml" and files["model"] == exp / "valid.acc.ave.pth"
    assert files["stats_file"] == root / "exp/asr_stats/train/feats_stats.npz"
    assert files["bpemodel"] == root / "data/token_list/bpe_bpe40/bpe.model"
    # weights without normalize.* (statistics only in feats_stats.npz) give the same model
    sd = torch.load(exp / "valid.acc.ave.pth", weights_only=True)
    mean = sd.pop("normalize.mean")
    sd.pop("normalize.std")
    torch.save(sd, exp / "no_stats.pth")
    try:
        model = ASRModel.from_espnet_dir(exp, model_file=exp / "no_stats.pth")
        assert torch.allclose(model.speech.normalize.mean, mean.float(), atol=1e-6)
        with pytest.raises(CheckpointError, match="several model files"):
            ASRModel.from_espnet_dir(_copy_without_preferred(exp, tmp_path))
    finally:
        (exp / "no_stats.pth").unlink()


def test_model_zoo_meta_yaml_names_the_files(experiments):
    """ESPnet model-zoo packs (and Hugging Face espnet/* repos) name their config and model in meta.yaml."""
    exp = experiments["rel_pos"]
    root = exp.parent.parent
    other = exp / "valid.acc.ave_10best.pth"
    other.write_bytes((exp / "valid.acc.ave.pth").read_bytes())
    meta = root / "meta.yaml"
    try:
        meta.write_text(yaml.safe_dump({"espnet": "202511", "files": {"asr_model_file": str(other.relative_to(root))},
                                        "yaml_files": {"asr_train_config": "exp/asr_train/config.yaml"}}))
        assert is_espnet_dir(root)
        files = find_espnet_files(root)
        assert (files["config"], files["model"]) == (exp / "config.yaml", other)
        assert ASRModel.from_espnet_dir(root).transcribe(waveforms(8)[0], sample_rate=16000, decode="ctc").token_ids
        meta.write_text(yaml.safe_dump({"files": {"asr_model_file": "exp/asr_train/missing.pth"}}))
        with pytest.raises(CheckpointError, match=r"meta\.yaml: the model file it names, .*missing\.pth, does not"):
            find_espnet_files(root)
    finally:
        meta.unlink(missing_ok=True)
        other.unlink()


def _copy_without_preferred(exp: Path, tmp: Path) -> Path:
    """An experiment dir with two model files and none of the preferred names."""
    import shutil

    d = tmp / "exp2"
    d.mkdir()
    shutil.copy(exp / "config.yaml", d / "config.yaml")
    shutil.copy(exp / "valid.acc.ave.pth", d / "10epoch.pth")
    shutil.copy(exp / "valid.acc.ave.pth", d / "11epoch.pth")
    return d


def test_loader_errors(experiments, tmp_path):
    exp = experiments["rel_pos"]
    with pytest.raises(CheckpointError, match="no ESPnet config.yaml"):
        ASRModel.from_espnet_dir(tmp_path)
    with pytest.raises(CheckpointError, match="no such directory"):
        ASRModel.from_espnet_dir(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    conf = yaml.safe_load((exp / "config.yaml").read_text())
    conf["decoder"] = "rnn"
    (bad / "config.yaml").write_text(yaml.safe_dump(conf))
    (bad / "model.pth").write_bytes((exp / "valid.acc.ave.pth").read_bytes())
    with pytest.raises(CheckpointError, match=r"decoder='rnn' is not supported"):
        ASRModel.from_espnet_dir(bad)
    conf["decoder"] = "transformer"
    conf["decoder_conf"]["num_blocks"] = 3
    (bad / "config.yaml").write_text(yaml.safe_dump(conf))
    with pytest.raises(CheckpointError, match=r"bpemodel 'data/token_list/bpe_bpe40/bpe.model' was not found"):
        ASRModel.from_espnet_dir(bad)
    # a bpe.model next to config.yaml is found by its name
    (bad / "bpe.model").write_bytes((exp.parent.parent / "data/token_list/bpe_bpe40/bpe.model").read_bytes())
    with pytest.raises(CheckpointError, match=r"missing \d+: .*decoder\.decoders\.2\."):
        ASRModel.from_espnet_dir(bad)
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path, expect=TRANSCRIBERS)
