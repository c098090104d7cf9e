"""Dolphin's real token set and decoding rules (issue 24, item 5), against ESPnet S2T and Dolphin's own code.

The assets come from the PyPI package dataoceanai-dolphin (assets/config.yaml with the 40002-token list, bpe.model,
feats_stats.npz; the same files in both pinned releases), fetched with pip --no-deps into ~/.cache/mm-test
(MM_TEST_CACHE) on first use; never committed. Dolphin's own code comes in two generations, both used here:
20250716, the last ESPnet-based one (DolphinSpeech2Text: ESPnet S2T + its ScoreFilter + SimpleBeamSearch), and
20260513, a WeNet port (its own ASRModel with `attention` and `attention_rescoring`) that loads ESPnet weights.
A tiny random S2T model is built by ESPnet's S2TTask from Dolphin's real config.yaml with small encoder/decoder
sizes and the real token list, saved as an ESPnet experiment (config.yaml + valid.acc.ave.pth) and loaded through
mm's format table (`load`)."""
import argparse
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mm.models.formats import load
from tests.mm.test_asr import waveforms
from tests.mm.wheels import fetch_package

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]

DOLPHIN_ESPNET = "dataoceanai-dolphin==20250716"  # the last ESPnet-based release
DOLPHIN_WENET = "dataoceanai-dolphin==20260513"  # the WeNet port
TINY_ENCODER = dict(output_size=32, attention_heads=4, cgmlp_linear_units=64, linear_units=48, num_blocks=2)
TINY_DECODER = dict(attention_heads=4, linear_units=64, num_blocks=2)


def fetch_dolphin(requirement: str) -> Path:
    """The `dolphin` package directory (python files + assets/) of a pinned wheel, cached."""
    return fetch_package(requirement, "dolphin", "assets/config.yaml")


@pytest.fixture(scope="session")
def dolphin_dir():
    return fetch_dolphin(DOLPHIN_ESPNET)


def import_dolphin(pkg: Path, *names: str) -> list:
    """Modules `dolphin.<name>` of one Dolphin release, without its __init__ (which imports modelscope/funasr for
    VAD, not installed); both releases are called `dolphin`, so sys.modules is restored afterwards."""
    import importlib

    saved = {k: v for k, v in sys.modules.items() if k == "dolphin" or k.startswith("dolphin.")}
    for k in saved:
        del sys.modules[k]
    mod = types.ModuleType("dolphin")
    mod.__path__ = [str(pkg)]
    sys.modules["dolphin"] = mod
    try:
        return [importlib.import_module(f"dolphin.{n}") for n in names]
    finally:
        for k in [k for k in sys.modules if k == "dolphin" or k.startswith("dolphin.")]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.fixture(scope="session")
def real_config(dolphin_dir):
    return yaml.safe_load((dolphin_dir / "assets" / "config.yaml").read_text(encoding="utf-8"))


def waves(seed: int, seconds=(1.2, 0.8)) -> list[np.ndarray]:
    """Deterministic speech-like signals (test_asr's, at another pitch)."""
    return waveforms(seed, seconds, pitch=(110, 70), vibrato=0.9, tremolo=3)


@pytest.fixture(scope="module")
def dolphin_exp(tmp_path_factory, dolphin_dir, real_config):
    """An ESPnet experiment directory of a tiny random model with Dolphin's real config structure and token list."""
    from espnet2.tasks.s2t import S2TTask

    exp = tmp_path_factory.mktemp("dolphin_tiny")
    for name in ("bpe.model", "feats_stats.npz"):
        shutil.copy(dolphin_dir / "assets" / name, exp / name)
    conf = dict(real_config)
    conf["encoder_conf"] = {**conf["encoder_conf"], **TINY_ENCODER}
    conf["decoder_conf"] = {**conf["decoder_conf"], **TINY_DECODER}
    conf["bpemodel"] = str(exp / "bpe.model")
    conf["normalize_conf"] = {"stats_file": str(exp / "feats_stats.npz")}
    torch.manual_seed(0)
    model = S2TTask.build_model(argparse.Namespace(**conf))  # as DolphinSpeech2Text.build_model_from_file does
    tl = conf["token_list"]
    with torch.no_grad():
        for p in model.parameters():  # LayerNorm/bias defaults (1/0) would hide mistakes
            p.add_(0.2 * torch.randn_like(p))
        bias = model.decoder.output_layer.bias
        model.decoder.output_layer.weight.mul_(3.0)
        # a small active vocabulary of text pieces, the time tokens ahead of them (so that ScoreFilter decides),
        # eos close enough to end hypotheses early
        bias.fill_(-30.0)
        bias[tl.index("<30.00>") + 1: tl.index("<30.00>") + 301] = 0.0
        bias[tl.index("<0.00>"): tl.index("<30.00>") + 1] = 6.0
        bias[tl.index("<ab>"): tl.index("<ZA>") + 1] = 0.0
        bias[model.eos] = 3.0
        model.ctc.ctc_lo.weight.mul_(3.0)
        ctc_bias = model.ctc.ctc_lo.bias  # CTC: the same text pieces, blank ahead, two specials that must not print
        ctc_bias.fill_(-30.0)
        ctc_bias[tl.index("<30.00>") + 1: tl.index("<30.00>") + 301] = 0.0
        ctc_bias[[tl.index("<14.20>"), tl.index("<SHANXI>")]] = 4.0
        ctc_bias[0] = 2.0
    (exp / "config.yaml").write_text(yaml.safe_dump(conf, allow_unicode=True, sort_keys=False), encoding="utf-8")
    torch.save(model.state_dict(), exp / "valid.acc.ave.pth")
    return exp


@pytest.fixture(scope="module")
def ours(dolphin_exp):
    return load(dolphin_exp)  # the format table every entry point uses


@pytest.fixture(scope="module")
def dolphin(dolphin_dir, dolphin_exp):
    """Dolphin's own DolphinSpeech2Text (ESPnet S2T + its ScoreFilter and SimpleBeamSearch) on the same weights."""
    (model,) = import_dolphin(dolphin_dir, "model")
    d = model.DolphinSpeech2Text(s2t_train_config=str(dolphin_exp / "config.yaml"),
                                 s2t_model_file=str(dolphin_exp / "valid.acc.ave.pth"), device="cpu", beam_size=3)
    d.partial_ar = False  # read by espnet 202511's Speech2Text._decode_single_sample; Dolphin targets 202402
    return d


def espnet_s2t(exp: Path, ctc_weight: float, beam: int = 3):
    from espnet2.bin.s2t_inference import Speech2Text

    return Speech2Text(s2t_train_config=str(exp / "config.yaml"), s2t_model_file=str(exp / "valid.acc.ave.pth"),
                       device="cpu", beam_size=beam, ctc_weight=ctc_weight, nbest=1)


def espnet_decode(s2t, w: np.ndarray, primer: list[int], maxlenratio: float = 0.0):
    """ESPnet S2T's search (BatchBeamSearch with its ScoreFilter) primed with `primer`, on the unpadded input as
    Dolphin decodes it (Speech2Text.__call__ would pad to 30 s): (text, tokens, token_int, text_nospecial, T')."""
    with torch.no_grad():
        enc, _ = s2t.s2t_model.encode(torch.from_numpy(w)[None], torch.tensor([w.size]))
    s2t.beam_search.set_hyp_primer(primer)
    s2t.maxlenratio = maxlenratio
    text, tokens, token_int, text_nospecial, _ = s2t._decode_single_sample(enc[0])[0]
    return text, tokens, token_int, text_nospecial, enc.shape[1]


def test_token_blocks_are_dolphins(ours, dolphin_dir, real_config):
    """Languages, regions, <notimestamp> and time stamps are the blocks Dolphin's and ESPnet's code name."""
    model, languages = import_dolphin(dolphin_dir, "model", "languages")
    tl = ours.config.token_list
    assert len(tl) == 40002
    span = lambda first, last: list(range(tl.index(first), tl.index(last) + 1))  # noqa: E731
    assert ours.language_ids == span(model.FIRST_LANG_SYMBOL, model.LAST_LANG_SYMBOL)
    assert ours.region_ids == span(model.FIRST_REGION_SYMBOL, model.LAST_REGION_SYMBOL)
    assert (len(ours.language_ids), len(ours.region_ids)) == (138, 179)
    assert {"<SICHUAN>", "<SHANXI>", "<WU>", "<NULL>", "<GLA>", "<LVT>"} <= {tl[i] for i in ours.region_ids}
    assert not {"<itn>", "<asr>", "<na>", "<unk>", "<sos>"} & {tl[i] for i in ours.language_ids}
    pre = real_config["preprocessor_conf"]  # what ESPnet's Speech2Text gives its ScoreFilter
    assert tl[ours.notimestamps_id] == pre["notime_symbol"] == model.NOTIME_SYMBOL == "<notimestamp>"
    assert list(ours.s2t.times) == span(pre["first_time_symbol"], pre["last_time_symbol"])
    assert len(ours.s2t.times) == 1501
    # every language-region pair of Dolphin's table is accepted and put in the prompt
    w = waves(2, (0.3,))[0]
    pairs = [p.split("-") for p in languages.LANGUAGE_REGION_CODES]
    assert len(pairs) == 76
    for lang, region in pairs:
        got = ours.transcribe(w, sample_rate=16000, decode="ctc", language=lang, region=region)
        assert (got.language, got.region) == (lang, region)
    with pytest.raises(ValueError, match="region='SICHUAN' needs its language="):
        ours.transcribe(w, sample_rate=16000, region="SICHUAN")
    with pytest.raises(ValueError, match="language 'itn' is not one of this model's languages"):
        ours.transcribe(w, sample_rate=16000, language="itn")
    with pytest.raises(ValueError, match="region 'XY' is not one of this model's regions"):
        ours.transcribe(w, sample_rate=16000, language="zh", region="XY")


def test_attention_matches_espnet_s2t_and_dolphin(ours, dolphin_exp, dolphin):
    """Attention decoding with <sos><zh><SICHUAN><asr><notimestamp> gives ESPnet S2T's tokens (its ScoreFilter on)
    and Dolphin's own text, given or detected language; the time tokens, which the weights favour, never win."""
    tl = ours.config.token_list
    s2t = espnet_s2t(dolphin_exp, ctc_weight=0.0)
    sos, asr, notime = ours.config.sos, tl.index("<asr>"), tl.index("<notimestamp>")
    n_tokens, n_special = [], 0
    for w in waves(3, (1.2, 0.8, 2.0)):
        for given in (True, False):
            opts = dict(language="zh", region="SICHUAN") if given else {}
            got = ours.transcribe(w, sample_rate=16000, decode="attention", beam=3, **opts)
            primer = [sos, tl.index(f"<{got.language}>"), tl.index(f"<{got.region}>"), asr, notime]
            text, tokens, token_int, text_nospecial, T = espnet_decode(s2t, w, primer)
            assert token_int[:4] == primer[1:]  # Speech2Text keeps the primer after <sos>
            assert got.token_ids == token_int[4:] and got.tokens == tokens[4:]
            assert got.text == text_nospecial and "<" not in got.text
            assert not set(got.token_ids) & set(ours.s2t.times)
            mine = dolphin(torch.from_numpy(w), lang_sym=opts.get("language"), region_sym=opts.get("region"),
                           predict_time=False)
            assert (mine.language, mine.region) == (got.language, got.region)
            assert mine.text_nospecial == got.text and mine.text == text
            n_tokens.append(len(got.token_ids))
            n_special += sum(t.startswith("<") for t in got.tokens)
        # without ScoreFilter a time token would come first: the filter decides here
        with torch.no_grad():
            enc, _ = s2t.s2t_model.encode(torch.from_numpy(w)[None], torch.tensor([w.size]))
            logp, _ = s2t.s2t_model.decoder.batch_score(torch.tensor([primer]), [None], enc)
        assert int(logp[0].argmax()) in ours.s2t.times
    # real hypotheses (a detected language may end at once), with special tokens left out of the text
    assert sum(n >= 3 for n in n_tokens) >= 4 and n_special >= 3


@pytest.mark.parametrize("ctc_weight", [0.3, 0.5])
def test_joint_matches_espnet_s2t(ours, dolphin_exp, ctc_weight):
    """Joint CTC/attention decoding with Dolphin's prompt gives ESPnet S2T's tokens (ScoreFilter, CTC prefix scorer
    with the hyp_primer). ESPnet's own search gets the same T' - 4 limit: with the 5-token primer its
    CTCPrefixScoreTH fails with an IndexError on longer hypotheses unless end detection stops it first."""
    tl = ours.config.token_list
    s2t = espnet_s2t(dolphin_exp, ctc_weight=ctc_weight)
    n_tokens = []
    for w in waves(4, (1.2, 0.8, 2.0)):
        got = ours.transcribe(w, sample_rate=16000, decode="joint", ctc_weight=ctc_weight, beam=3, language="zh",
                              region="SICHUAN")
        primer = [ours.config.sos] + [tl.index(t) for t in ("<zh>", "<SICHUAN>", "<asr>", "<notimestamp>")]
        with torch.no_grad():
            T = ours.encode(torch.from_numpy(w)[None], torch.tensor([w.size]))[1].item()
        text, tokens, token_int, text_nospecial, T_ref = espnet_decode(s2t, w, primer, maxlenratio=-(T - 4))
        assert T_ref == T
        assert got.token_ids == token_int[4:] and got.text == text_nospecial
        assert not set(got.token_ids) & set(ours.s2t.times)
        n_tokens.append(len(got.token_ids))
    assert min(n_tokens) >= 3


def test_search_stops_at_T_minus_4_tokens(ours, dolphin_exp):
    """A hypothesis that never ends stops at T' + 1 - len(prompt) = T' - 4 tokens, as Dolphin's (WeNet port) search;
    its tokens are ESPnet S2T's when ESPnet is given that maximum length (maxlenratio = -(T' - 4)): ESPnet's own
    attention search would go on to T' tokens, its joint search would fail (see test_joint_matches_espnet_s2t)."""
    tl = ours.config.token_list
    primer = [ours.config.sos] + [tl.index(t) for t in ("<zh>", "<CN>", "<asr>", "<notimestamp>")]
    refs = {"attention": espnet_s2t(dolphin_exp, 0.0, beam=2), "joint": espnet_s2t(dolphin_exp, 0.5, beam=2)}
    biases = [ours.decoder.output_layer.bias] + [r.s2t_model.decoder.output_layer.bias for r in refs.values()]
    saved = biases[0].clone()
    try:
        with torch.no_grad():
            for bias in biases:
                bias[ours.config.eos] -= 1000.0
        for w in waves(5, (1.0, 0.7)):
            with torch.no_grad():
                T = ours.encode(torch.from_numpy(w)[None], torch.tensor([w.size]))[1].item()
            for decode, ref in refs.items():
                got = ours.transcribe(w, sample_rate=16000, decode=decode, beam=2, language="zh", region="CN")
                assert len(got.token_ids) == T - 4, (decode, T)
                assert got.token_ids == espnet_decode(ref, w, primer, maxlenratio=-(T - 4))[2][4:], decode
    finally:
        with torch.no_grad():
            for bias in biases:
                bias.copy_(saved)


def test_ctc_text_leaves_out_special_tokens(ours, dolphin_exp):
    """Time stamps and region tokens the CTC head emits stay in `tokens` but never reach the text."""
    from espnet2.text.build_tokenizer import build_tokenizer

    tokenizer = build_tokenizer(token_type="bpe", bpemodel=str(dolphin_exp / "bpe.model"))
    seen = set()
    for w in waves(6, (1.2, 0.8, 2.0)):
        got = ours.transcribe(w, sample_rate=16000, decode="ctc", language="zh", region="SHANXI")
        assert got.text == tokenizer.tokens2text([t for t in got.tokens if not (t[0] == "<" and t[-1] == ">")])
        assert "<" not in got.text
        seen |= {t for t in got.tokens if t in ("<14.20>", "<SHANXI>")}
    assert seen == {"<14.20>", "<SHANXI>"}


def test_detection_follows_dolphin(ours, dolphin):
    """A language from the language block (never <itn>), then a region from the region block (<SICHUAN> too),
    as DolphinSpeech2Text.detect_language picks them on the same weights."""
    tl = ours.config.token_list
    w = waves(7, (1.0,))[0]
    pushes = {("<itn>",): None, ("<zh>", "<SICHUAN>"): ("zh", "SICHUAN"), ("<ar>", "<LVT>"): ("ar", "LVT"),
              ("<itn>", "<zh>", "<SHANXI>"): ("zh", "SHANXI")}
    for push, want in pushes.items():
        mine_bias, ref_bias = ours.decoder.output_layer.bias, dolphin.s2t_model.decoder.output_layer.bias
        saved = mine_bias.clone()
        try:
            with torch.no_grad():
                for t in push:
                    mine_bias[tl.index(t)] += 30.0
                    ref_bias[tl.index(t)] += 30.0
            got = ours.transcribe(w, sample_rate=16000, decode="ctc")
            lang, region, _ = dolphin.detect_language(torch.from_numpy(w))
        finally:
            with torch.no_grad():
                mine_bias.copy_(saved)
                ref_bias.copy_(saved)
        assert (f"<{got.language}>", f"<{got.region}>") == (tl[lang], tl[region]), push
        assert got.language != "itn" and (want is None or (got.language, got.region) == want)


@pytest.fixture(scope="module")
def dolphin_wenet(dolphin_exp):
    """Dolphin's WeNet port (ASRModel, extract_feats, tokenizer) built for the tiny experiment: its train.yaml
    settings written from the ESPnet config, the ESPnet weights loaded as its load_model does for them (MVN
    statistics to encoder.global_cmvn, the decoder's positional table of its own)."""
    pkg = fetch_dolphin(DOLPHIN_WENET)
    model_mod, processor, tokenizer = import_dolphin(pkg, "model", "processor", "tokenizer")
    conf = yaml.safe_load((dolphin_exp / "config.yaml").read_text(encoding="utf-8"))
    tl, enc, dec = conf["token_list"], conf["encoder_conf"], conf["decoder_conf"]
    units = dolphin_exp / "units.txt"
    units.write_text("".join(f"{t} {i}\n" for i, t in enumerate(tl)), encoding="utf-8")
    keys = ("output_size", "attention_heads", "linear_units", "cgmlp_linear_units", "cgmlp_conv_kernel",
            "use_linear_after_conv", "gate_activation", "num_blocks", "input_layer", "merge_conv_kernel")
    configs = {
        "cmvn": "global_mvn", "cmvn_conf": {"cmvn_file": str(dolphin_exp / "feats_stats.npz")},
        "input_dim": 80, "output_dim": len(tl),
        "encoder_conf": {**{k: enc[k] for k in keys}, "pos_enc_layer_type": "rel_pos_v1",  # ESPnet's "latest"
                         "dropout_rate": 0.0, "positional_dropout_rate": 0.0, "attention_dropout_rate": 0.0},
        "decoder_conf": {**{k: dec[k] for k in ("attention_heads", "linear_units", "num_blocks")},
                         "dropout_rate": 0.0, "positional_dropout_rate": 0.0, "self_attention_dropout_rate": 0.0,
                         "src_attention_dropout_rate": 0.0},
        "ctc_conf": {"ctc_blank_id": 0}, "model_conf": {"ctc_weight": 0.3},
        "tokenizer": "bpe",
        "tokenizer_conf": {"special_tokens": {"<sos>": tl.index("<sos>"), "<eos>": tl.index("<eos>")},
                           "symbol_table_path": str(units), "bpe_path": str(dolphin_exp / "bpe.model")},
        "dataset_conf": {"frontend_conf": {k: conf["frontend_conf"][k] for k in ("n_fft", "win_length", "hop_length")}},
    }
    model = model_mod.init_speech_model(configs)
    sd = torch.load(dolphin_exp / "valid.acc.ave.pth", weights_only=True)
    sd["encoder.global_cmvn.mean"], sd["encoder.global_cmvn.std"] = sd.pop("normalize.mean"), sd.pop("normalize.std")
    sd["decoder.embed.1.pe"] = model.state_dict()["decoder.embed.1.pe"]
    del sd["frontend.logmel.melmat"]
    model.load_state_dict(sd)  # strict: every tensor has its place
    model.model_configs = configs
    model.device = "cpu"
    return model.eval(), processor, tokenizer.init_tokenizer(configs)


def test_rescore_matches_dolphins_attention_rescoring(ours, dolphin_wenet):
    """decode="rescore" with Dolphin's prompt gives the tokens of Dolphin's own (WeNet port) attention_rescoring:
    CTC prefix beam search n-best rescored by the decoder after <sos><zh><SICHUAN><asr><notimestamp>, ctc_weight 0
    (Dolphin's default, and ours for prompt models). Its encoder equals ours first."""
    model, processor, tokenizer = dolphin_wenet
    n_tokens = []
    for w in waves(8, (1.2, 0.8, 2.0)):
        x = torch.from_numpy(w)
        feats = lambda: processor.extract_feats([x[None]], model.model_configs)  # noqa: E731 (normalised in place)
        with torch.no_grad():
            batch = feats()
            ref_enc, _ = model._forward_encoder(batch["feats"], batch["feats_lengths"])
            enc, _ = ours.encode(x[None], torch.tensor([w.size]))
            assert (ref_enc - enc).abs().max() < 1e-4
            batch = feats()
            ref = model.decode(["attention_rescoring"], batch["feats"], batch["feats_lengths"], beam_size=3,
                               infos={"tokenizer": tokenizer, "langs": ["<zh>"], "regions": ["<SICHUAN>"]})
        tl = ours.config.token_list
        ref_tokens = ref["attention_rescoring"][0].tokens
        assert ref_tokens[:4] == [tl.index(t) for t in ("<zh>", "<SICHUAN>", "<asr>", "<notimestamp>")]
        got = ours.transcribe(w, sample_rate=16000, decode="rescore", beam=3, language="zh", region="SICHUAN")
        assert got.token_ids == ref_tokens[4:]
        n_tokens.append(len(got.token_ids))
    assert min(n_tokens) >= 3
