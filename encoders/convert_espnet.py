"""ESPnet ASR/S2T checkpoints -> our E-Branchformer encoder and speech encoder (key renames; legacy tables dropped)."""
from __future__ import annotations

import torch

from decoders.checkpoint import CheckpointError, load_state_dict_strict
from encoders.ebranchformer import EBranchformerConfig, EBranchformerEncoder
from encoders.speech_encoder import SpeechEncoder, SpeechEncoderConfig


ESPNET_LEGACY_KEYS = ("embed.out.1.pe",)  # positional tables saved by ESPnet <= 0.5.2; recomputed here


def convert_espnet_encoder_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ESPnet ASR/S2T model state dict -> our EBranchformerEncoder's: keep `encoder.*`, strip the prefix."""
    out = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    if not out:
        raise CheckpointError(
            f"no `encoder.` keys in the ESPnet state dict ({len(state_dict)} keys, e.g. {sorted(state_dict)[:5]})"
        )
    return {k: v for k, v in out.items() if k not in ESPNET_LEGACY_KEYS}


def convert_espnet_speech_encoder_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ESPnet ASR/S2T model state dict -> our SpeechEncoder's: keep `frontend.*`, `normalize.*`, `encoder.*`."""
    out = {"encoder." + k: v for k, v in convert_espnet_encoder_state_dict(state_dict).items()}
    out.update({k: v for k, v in state_dict.items() if k.startswith(("frontend.", "normalize."))})
    return out


def load_espnet_encoder(
    state_dict: dict[str, torch.Tensor], config: EBranchformerConfig, source: str = "ESPnet state dict"
) -> EBranchformerEncoder:
    """EBranchformerEncoder from an ESPnet model state dict; missing/extra/misshaped keys raise CheckpointError."""
    encoder = EBranchformerEncoder(config)
    return load_state_dict_strict(encoder, convert_espnet_encoder_state_dict(state_dict), source)


def load_espnet_speech_encoder(
    state_dict: dict[str, torch.Tensor], config: SpeechEncoderConfig, source: str = "ESPnet state dict"
) -> SpeechEncoder:
    """Build a SpeechEncoder (front end, MVN statistics, encoder) from an ESPnet model state dict."""
    model = SpeechEncoder(config)
    return load_state_dict_strict(model, convert_espnet_speech_encoder_state_dict(state_dict), source)
