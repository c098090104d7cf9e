"""Encoders: the ViT patch encoder and image preprocessing; audio, the speech front end and the E-Branchformer."""
from .audio import AudioError, load_audio
from .ebranchformer import EBranchformerConfig, EBranchformerEncoder
from .speech_encoder import SpeechEncoder, SpeechEncoderConfig
from .frontend import GlobalMVN, LogMelFrontend, SpecAugment
from .image import ImageError, ImageProcessor, load_image
from .vit import ViT, ViTConfig, convert_hf_clip_vision_state_dict, convert_timm_state_dict

__all__ = [
    "AudioError", "EBranchformerConfig", "EBranchformerEncoder", "GlobalMVN", "ImageError", "ImageProcessor",
    "LogMelFrontend", "SpecAugment", "SpeechEncoder", "SpeechEncoderConfig", "ViT", "ViTConfig",
    "convert_hf_clip_vision_state_dict", "convert_timm_state_dict", "load_audio", "load_image",
]
