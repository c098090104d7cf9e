"""The one fusion model: each modality optional by configuration, the config.json formats of both configurations,
and the same numbers whichever modalities a model has (image only, speech only, image + speech)."""
import pytest
import torch

from mm.models.fusion import FusionModel
from mm.models.fusion_config import FusionConfig
from tests.mm.test_speech_adapter import V, tiny_model

LLAVA_KEYS = {"model_type", "image_token_index", "vision_feature_layer", "vision_feature_select_strategy",
              "vision_feature_norm", "projector_type", "projector_hidden_act", "projector_bias", "template",
              "text_config", "vision_config"}  # what mm-llava config.json has always held


def without(cfg: FusionConfig, **changes) -> FusionConfig:
    d = {k: getattr(cfg, k) for k in ("text", "vision", "speech", "adapter", "audio_token_id", "image_token_index")}
    return FusionConfig(**{**d, **changes})


def test_config_formats():
    full = tiny_model().config
    image_only = FusionConfig(text=full.text, vision=full.vision, image_token_index=full.image_token_index)
    speech_only = without(full, vision=None)
    assert set(image_only.to_dict()) == LLAVA_KEYS and image_only.to_dict()["model_type"] == "mm-llava"
    assert speech_only.to_dict()["model_type"] == "mm-multimodal" and speech_only.to_dict()["vision_config"] is None
    for cfg in (image_only, speech_only):
        assert FusionConfig.from_dict(cfg.to_dict()) == cfg
    assert (image_only.modalities, speech_only.modalities) == (("image",), ("speech",))
    with pytest.raises(ValueError, match=r"mm-llava config \(no speech\) with speech keys \['audio_token_id'\]"):
        FusionConfig.from_dict({**image_only.to_dict(), "audio_token_id": 5})
    with pytest.raises(ValueError, match="no modality"):
        without(full, vision=None, speech=None)


def test_a_missing_modality_changes_no_number_and_is_a_clear_error():
    full = tiny_model(seed=3)
    sd = full.state_dict()
    speech_only = FusionModel(without(full.config, vision=None)).eval()
    speech_only.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("vision_tower.", "projector."))})
    assert not hasattr(speech_only, "vision_tower") and speech_only.image_processor is None
    image_only = FusionModel(without(full.config, speech=None)).eval()
    image_only.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("speech_encoder.", "ctc.", "speech_adapter."))})
    g = torch.Generator().manual_seed(0)
    speech, lengths = torch.randn(1, 3000, generator=g), torch.tensor([3000])
    n = int(full.feature_lengths(lengths)[0])
    ids = torch.tensor([[1, 5] + [V] * n + [7, 8]])  # V: the audio token
    pixels = torch.randn(1, 3, 16, 16, generator=g)
    img_ids = torch.tensor([[1, 5] + [V + 1] * full.config.tokens_per_image() + [7]])
    with torch.no_grad():
        want = full(ids, speech=speech, speech_lengths=lengths).logits
        assert torch.equal(speech_only(ids, speech=speech, speech_lengths=lengths).logits, want)
        assert torch.equal(image_only(img_ids, pixels).logits, full(img_ids, pixels).logits)
        assert not torch.equal(image_only(img_ids, pixels).logits, image_only(img_ids, pixels * 0).logits)  # the image is read
    with pytest.raises(ValueError, match="this speech-only model has no vision tower, so it cannot caption"):
        speech_only.caption("scene.png")
    with pytest.raises(ValueError, match="this LLaVA model has no speech encoder, so it cannot transcribe"):
        image_only.transcript("speech.wav")
