"""ESPnet/Dolphin experiments <-> the ASR model: config.yaml -> `ASRConfig`, and the weights under ESPnet's tensor
names (frontend.*, normalize.*, encoder.*, ctc.*, decoder.*; the global MVN statistics from feats_stats.npz when
the weights lack them), which is also how our own `model.safetensors` names them. The experiment's files are found
by `mm.models.espnet_files.find_espnet_files`."""
from __future__ import annotations

import os

import torch

from decoders.asr_decoder import ASRDecoderConfig, convert_espnet_decoder_state_dict
from decoders.checkpoint import CheckpointError, load_state_dict_strict, read_torch
from decoders.ctc import convert_espnet_ctc_state_dict
from decoders.tokenizer import SentencePieceTokenizer
from encoders.convert_espnet import convert_espnet_speech_encoder_state_dict
from encoders.frontend import GlobalMVN
from encoders.speech_encoder import SpeechEncoderConfig
from mm.models.asr_config import ASRConfig
from mm.models.espnet_files import find_espnet_files

ESPNET_PARTS = ("frontend.", "normalize.", "encoder.", "ctc.", "decoder.")


def config_from_espnet(config: dict, token_list: list[str]) -> ASRConfig:
    """The ASRConfig of a parsed ESPnet ASR/S2T `config.yaml` and its token list."""
    speech = SpeechEncoderConfig.from_espnet(config)
    decoder = None
    if config.get("decoder") not in (None, "none"):
        if config["decoder"] != "transformer":
            raise ValueError(f"config.yaml: decoder={config['decoder']!r} is not supported (only 'transformer')")
        decoder = ASRDecoderConfig.from_espnet(config.get("decoder_conf") or {}, len(token_list),
                                               speech.encoder.output_size)
    model_conf = config.get("model_conf") or {}

    def special(key: str, names: tuple[str, ...]) -> int:
        # ESPnet: the symbol named in model_conf if it is in the list, else the last token
        for name in ((model_conf[key],) if key in model_conf else ()) + names:
            if name in token_list:
                return token_list.index(name)
        return len(token_list) - 1

    blank_sym = model_conf.get("sym_blank", "<blank>")
    return ASRConfig(
        speech=speech, decoder=decoder, token_list=list(token_list),
        sos=special("sym_sos", ("<sos/eos>", "<sos>")), eos=special("sym_eos", ("<sos/eos>", "<eos>")),
        blank=token_list.index(blank_sym) if blank_sym in token_list else 0,
        token_type=config.get("token_type") or "bpe",
        ctc_weight=float(model_conf.get("ctc_weight", 0.5)),
    )


def espnet_state_dict(model) -> dict[str, torch.Tensor]:
    """An ASRModel's weights under ESPnet's names (frontend.*, normalize.*, encoder.*, ctc.*, decoder.*)."""
    sd = dict(model.speech.state_dict())
    sd.update({"ctc." + k: v for k, v in model.ctc.state_dict().items()})
    if model.decoder is not None:
        sd.update({"decoder." + k: v for k, v in model.decoder.state_dict().items()})
    return sd


def load_espnet_state_dict(model, sd: dict[str, torch.Tensor], source: str,
                           stats_file: str | os.PathLike | None = None):
    """Load ESPnet-named weights into an ASRModel; MVN statistics missing from sd are read from stats_file
    (feats_stats.npz). Returns the model."""
    other = sorted({k.split(".")[0] for k in sd if not k.startswith(ESPNET_PARTS)})
    if other:
        raise CheckpointError(f"{source}: parts {other} are not supported (expected {', '.join(ESPNET_PARTS)})")
    sd = dict(sd)
    if model.speech.normalize is not None and "normalize.mean" not in sd:
        if stats_file is None:
            raise CheckpointError(f"{source}: no normalize.mean/std in the weights and no feats_stats.npz found")
        c = model.config.speech
        mvn = GlobalMVN.from_stats_file(stats_file, c.norm_means, c.norm_vars)
        sd["normalize.mean"], sd["normalize.std"] = mvn.mean, mvn.std
    if "frontend.logmel.melmat" not in sd:  # a fixed function of the front-end config, not learned
        sd["frontend.logmel.melmat"] = model.speech.frontend.logmel.melmat
    full = {"speech." + k: v for k, v in convert_espnet_speech_encoder_state_dict(sd).items()}
    try:
        full.update({"ctc." + k: v for k, v in convert_espnet_ctc_state_dict(sd).items()})
        if model.decoder is not None:
            full.update({"decoder." + k: v for k, v in convert_espnet_decoder_state_dict(sd).items()})
    except KeyError as e:
        raise CheckpointError(f"{source}: {e.args[0]}") from None
    if model.decoder is None and any(k.startswith("decoder.") for k in sd):
        raise CheckpointError(f"{source}: has decoder.* weights but the config has no decoder")
    load_state_dict_strict(model, full, source)
    return model


def load_espnet_dir(model_class, path: str | os.PathLike, model_file: str | os.PathLike | None = None):
    """A `model_class` (ASRModel) built from an ESPnet/Dolphin experiment: a directory (or its config.yaml) with
    config.yaml and the model *.pth; feats_stats.npz and the BPE model are found from normalize_conf.stats_file
    and bpemodel (find_espnet_files)."""
    files = find_espnet_files(path, model_file)
    config = files["config_dict"]
    tokenizer = SentencePieceTokenizer(files["bpemodel"]) if files["bpemodel"] is not None else None
    try:
        cfg = config_from_espnet(config, files["token_list"])
    except ValueError as e:
        raise CheckpointError(f"{files['config']}: {str(e).removeprefix('config.yaml: ')}") from e
    if cfg.token_type == "bpe" and tokenizer is None:
        raise CheckpointError(f"{files['config']}: token_type bpe but the bpemodel {config.get('bpemodel')!r} "
                              "was not found (looked next to the config and in the directories above it)")
    model = model_class(cfg, tokenizer)
    return load_espnet_state_dict(model, read_torch(files["model"]), str(files["model"]), files["stats_file"])
