"""The model of `mm train --recipe tiny` (mm.train.recipe_tiny): its configuration from the recipe's sizes, the
speech features' normalisation, the tokenizer, which parameters each stage trains, and the model to start from
(a new one, or a continued run's `init` directory)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from decoders.llama import LlamaConfig
from decoders.tokenizer import load_tokenizer
from decoders.tokenizer_train import train_sentencepiece
from encoders.ebranchformer import EBranchformerConfig
from encoders.frontend import FrontendConfig, SpecAugment, SpecAugmentConfig
from encoders.image import ImageProcessor
from encoders.speech_encoder import SpeechEncoderConfig
from encoders.vit import ViTConfig

from mm.models.fusion import FusionModel
from mm.models.fusion_config import MultimodalConfig
from mm.models.speech_adapter import SpeechAdapterConfig
from mm.train.text import init_weights
from mm.train.tiny_data import corpus_lines

if TYPE_CHECKING:
    from mm.train.recipe_tiny import TinyRecipe


def model_config(r: TinyRecipe, vocab_size: int, bos: int, eos: int) -> MultimodalConfig:
    """The tiny model: 48 px ViT (16 px patches: 9 image tokens), E-Branchformer, Llama, token ids for image/audio past the vocab."""
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=r.llama_dim, intermediate_size=int(r.llama_dim * 8 / 3) // 16 * 16,
                       num_hidden_layers=r.llama_layers, num_attention_heads=max(1, r.llama_dim // 64),
                       num_key_value_heads=max(1, r.llama_dim // 128), max_position_embeddings=512,
                       rms_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos)
    vision = ViTConfig(image_size=r.image_size, patch_size=r.patch_size, dim=r.vit_dim, depth=r.vit_depth,
                       num_heads=max(1, r.vit_dim // 32), mlp_dim=4 * r.vit_dim)
    d = r.speech_dim
    speech = SpeechEncoderConfig(frontend=FrontendConfig(n_mels=80), encoder=EBranchformerConfig(
        input_size=80, output_size=d, attention_heads=max(1, d // 32), cgmlp_linear_units=4 * d, cgmlp_conv_kernel=15,
        num_blocks=r.speech_blocks, use_ffn=True, macaron_ffn=True, linear_units=2 * d))
    return MultimodalConfig(text=text, vision=vision, speech=speech, image_token_index=vocab_size,
                            vision_feature_layer=-1, vision_feature_norm=True, audio_token_id=vocab_size + 1, ctc_weight=r.ctc_weight,
                            adapter=SpeechAdapterConfig(input_size=d, hidden_size=r.llama_dim, downsample=4),
                            system="", template="llava_v1")


# ------------------------------------------------------------------------------------------------- speech features


def set_mvn(model: FusionModel, waves: list[torch.Tensor]) -> None:
    """Global mean/variance normalisation statistics of the log-mel features of `waves` (ESPnet's GlobalMVN)."""
    frontend, norm = model.speech_encoder.frontend, model.speech_encoder.normalize
    with torch.no_grad():
        lengths = torch.tensor([w.shape[0] for w in waves])
        feats, feat_lengths = frontend(torch.nn.utils.rnn.pad_sequence(waves, batch_first=True), lengths)
        valid = torch.arange(feats.shape[1])[None, :] < feat_lengths[:, None]
        x = feats[valid]  # [frames, n_mels]
        norm.mean.copy_(x.mean(0))
        norm.std.copy_(x.std(0).clamp_min(1e-5))


def trainable(model: FusionModel, stage: int, vision: bool = True) -> list[torch.nn.Parameter]:
    """Stage 0: the ViT (unless not `vision`), the speech encoder and CTC head; stage 1: everything but the decoder;
    stage 2: everything."""
    for name, p in model.named_parameters():
        if stage == 0:
            p.requires_grad_(name.startswith(("speech_encoder.", "ctc.") + ("vision_tower.",) * vision))
        else:
            p.requires_grad_(stage == 2 or not name.startswith("language_model."))
    return [p for p in model.parameters() if p.requires_grad]


def tokenizer_for(r: TinyRecipe, data: dict, out: Path, main: bool, world: int):
    """`out/tokenizer/tokenizer.model`: init's (a continued run) or a BPE of `r.vocab_size` trained on the corpus."""
    tok_dir = out / "tokenizer"
    if main and not (tok_dir / "tokenizer.model").is_file():
        tok_dir.mkdir(exist_ok=True)
        if r.init:
            shutil.copy(Path(r.init) / "tokenizer.model", tok_dir / "tokenizer.model")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                corpus = Path(tmp) / "corpus.txt"
                corpus.write_text("\n".join(corpus_lines(data)))
                train_sentencepiece([corpus], Path(tmp) / "tok", vocab_size=r.vocab_size, model_type="bpe")
                shutil.copy(Path(tmp) / "tok" / "tokenizer.model", tok_dir / "tokenizer.model")
    if world > 1:
        dist.barrier()
    return load_tokenizer(tok_dir)


# Milder than Dolphin's (2 x 0-30 bins, 2 x 0-50 frames): the clips are 1-3 s and the model has 80 bins
SPEC_AUGMENT = SpecAugmentConfig(num_freq_mask=2, freq_mask_width_range=(0, 15), num_time_mask=2,
                                 time_mask_width_ratio_range=(0.0, 0.05))


def new_model(r: TinyRecipe, data: dict, tokenizer) -> FusionModel:
    """The model to train: init's (config, weights, speech normalisation) or a new one of the recipe's sizes."""
    torch.manual_seed(r.seed)
    if r.init:
        model = FusionModel.from_pretrained(r.init)
        model.config.text.max_position_embeddings = r.context or model.config.text.max_position_embeddings
        if r.fresh_decoder:  # encoders, CTC head, projector and adapter kept; the decoder learns again from nothing,
            # from PyTorch's default initialisation (embeddings N(0, 1)), as in the lookup probe (mm.eval.lookup)
            model.language_model = type(model.language_model)(model.config.text)
    else:
        model = FusionModel(model_config(r, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id))
        init_weights(model.language_model)
        model.image_processor = ImageProcessor(size=r.image_size, crop_size=r.image_size, resample="bicubic")
        set_mvn(model, [w for w, _ in data["transcribe"][:200]])
    model.tokenizer = tokenizer
    if r.specaug:  # in training only; the saved config keeps it, as ESPnet's does
        model.config.speech.specaug = SPEC_AUGMENT
        model.speech_encoder.specaug = SpecAugment(SPEC_AUGMENT)
    if model.config.tokens_per_image() != 9:
        raise ValueError(f"the recipe's probe needs one patch per grid cell (9 image tokens), got "
                         f"{model.config.tokens_per_image()} from image_size {r.image_size} and patch_size {r.patch_size}")
    return model
