"""Speech into the shared Llama decoder: the speech adapter (encoder features -> decoder embeddings), the feature
counts, and joint CTC/LLM beam search that keeps an LLM transcript on the audio (used by `mm.models.fusion`).

One utterance flows through:
    waveform [S] -> SpeechEncoder (log-mel, 4x conv subsampling, E-Branchformer) -> enc [T', d]
    -> SpeechAdapter: k-fold downsampling (frame stacking [T'/k, k*d], or a stride-k Conv1d) -> MLP (Linear, GELU,
       Linear) -> features [N, D_llama]
    -> scattered, in order, into the N positions of `input_ids` that hold `audio_token_id` (one token per feature,
       the convention of `mm.models.llava` for images) -> Llama decoder -> logits.
The CTC head stays on the encoder: its loss regularises training and its prefix score steers decoding.

Feature counts are fixed per utterance, whatever the batch: the frontend gives F = S // hop + 1 frames, the
subsampling T' = ((F - 1) // 2 - 1) // 2 (each utterance's own convolution length; ESPnet's `enc_lengths` of a
shorter utterance in a padded batch can be up to 2 frames longer, those frames are not used here), and the adapter
N = ceil(T' / k) (tail="pad": the last group is completed with zero frames) or floor(T' / k) (tail="drop": the
incomplete last group is dropped). `FusionModel.feature_lengths(speech_lengths)` gives N without running anything.

Joint decoding needs ONE vocabulary: the CTC head is trained over the Llama tokenizer's ids (its output size is
the Llama vocab size), with id 0 as the CTC blank. For a SentencePiece Llama tokenizer id 0 is `<unk>`, which never
occurs in a transcript, so the ids line up. Tokenizers whose id 0 is a real token (Llama 3's tiktoken) would need a
mapping table between the two vocabularies; that is not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from decoders.beam_search import Hypothesis, joint_scorers, weighted_beam_search
from decoders.llama import LlamaForCausalLM
from decoders.scorers import LlamaScorer
from encoders.ebranchformer import Conv2dSubsampling4, SpeechTooShortError
from encoders.speech_encoder import SpeechEncoder

ADAPTER_MODES = ("stack", "conv")
ADAPTER_TAILS = ("pad", "drop")


@dataclass
class SpeechAdapterConfig:
    """k-fold downsampling of encoder frames, then an MLP to the Llama hidden size.

    mode: "stack" concatenates k consecutive frames ([T, d] -> [T/k, k*d]); "conv" is a Conv1d(d, d, k, stride=k).
    tail: what to do with T not divisible by k: "pad" completes the last group with zero frames (N = ceil(T/k)),
        "drop" discards it (N = floor(T/k); an utterance shorter than k frames is an error).
    """

    input_size: int = 256  # encoder output size d
    hidden_size: int = 4096  # Llama hidden size
    downsample: int = 4  # k
    mode: str = "stack"
    tail: str = "pad"
    mlp_hidden_size: int | None = None  # None: hidden_size

    def __post_init__(self):
        if self.mode not in ADAPTER_MODES:
            raise ValueError(f"adapter mode {self.mode!r} is not one of {ADAPTER_MODES}")
        if self.tail not in ADAPTER_TAILS:
            raise ValueError(f"adapter tail {self.tail!r} is not one of {ADAPTER_TAILS}")
        if self.downsample < 1:
            raise ValueError(f"adapter downsample must be >= 1, got {self.downsample}")
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.hidden_size


def fit_adapter(adapter: SpeechAdapterConfig | None, d: int, D: int) -> SpeechAdapterConfig:
    """`adapter`, or the default (stacking by 4) for encoder width d and Llama width D; an error if it does not
    map d -> D."""
    adapter = adapter or SpeechAdapterConfig(input_size=d, hidden_size=D)
    if (adapter.input_size, adapter.hidden_size) != (d, D):
        raise ValueError(f"adapter maps {adapter.input_size} -> {adapter.hidden_size}, but the encoder gives {d} "
                         f"and the Llama hidden size is {D}")
    return adapter


def stack_frames(x: torch.Tensor, lengths: torch.Tensor, k: int, tail: str = "pad") -> torch.Tensor:
    """Concatenate k consecutive frames: x [B, T, D] -> [B, ceil(T/k) or floor(T/k), k*D].

    Frames past each utterance's length are zeroed first, so a group straddling the end holds zeros, not another
    utterance's padding, and an utterance's features do not depend on the batch it is in.
    """
    B, T, D = x.shape
    valid = torch.arange(T, device=x.device)[None, :] < lengths.to(x.device)[:, None]  # [B, T]
    x = x.masked_fill(~valid[..., None], 0.0)
    if tail == "pad":
        x = F.pad(x, (0, 0, 0, -T % k))
    else:
        x = x[:, : T - T % k]
    return x.reshape(B, x.shape[1] // k, k * D)


class SpeechAdapter(nn.Module):
    """Encoder states [B, T, d] with lengths -> Llama-space features [B, N, D] with lengths N (see the config)."""

    def __init__(self, cfg: SpeechAdapterConfig):
        super().__init__()
        self.config = cfg
        k, d = cfg.downsample, cfg.input_size
        self.conv = nn.Conv1d(d, d, kernel_size=k, stride=k) if cfg.mode == "conv" else None
        self.linear_1 = nn.Linear(d if cfg.mode == "conv" else k * d, cfg.mlp_hidden_size)
        self.linear_2 = nn.Linear(cfg.mlp_hidden_size, cfg.hidden_size)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Features per utterance: ceil(T/k) with tail="pad", floor(T/k) with tail="drop"."""
        k = self.config.downsample
        return (lengths + k - 1) // k if self.config.tail == "pad" else lengths // k

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d], lengths [B] -> (features [B, N_max, D], feature lengths [B]); rows past a length are padding."""
        cfg = self.config
        if x.dim() != 3 or x.shape[-1] != cfg.input_size:
            raise ValueError(f"adapter input must be [B, T, {cfg.input_size}], got {tuple(x.shape)}")
        out_lengths = self.output_lengths(lengths)
        if bool((out_lengths < 1).any()):
            short = lengths[out_lengths < 1].tolist()
            raise SpeechTooShortError(f"encoder lengths {short} give no speech features with downsample="
                                      f"{cfg.downsample} and tail='drop' (need at least {cfg.downsample} frames)")
        stacked = stack_frames(x, lengths, cfg.downsample, cfg.tail)  # [B, N, k*d]
        if self.conv is not None:  # a stride-k conv of kernel k reads exactly the stacked groups
            B, N, _ = stacked.shape
            w = stacked.view(B, N, cfg.downsample, cfg.input_size).permute(0, 3, 1, 2).reshape(B, cfg.input_size, -1)
            stacked = self.conv(w).transpose(1, 2)  # [B, N, d]
        return self.linear_2(F.gelu(self.linear_1(stacked))), out_lengths


# ------------------------------------------------------------------------------------------- speech features


def encoder_lengths(encoder: SpeechEncoder, speech_lengths: torch.Tensor) -> torch.Tensor:
    """Each utterance's own subsampled length T' = ((F - 1)//2 - 1)//2 of its F = S // hop + 1 frames."""
    frames = encoder.frontend.output_lengths(torch.as_tensor(speech_lengths))
    if bool((frames < Conv2dSubsampling4.MIN_FRAMES).any()):
        hop = encoder.frontend.config.hop_length
        raise SpeechTooShortError(
            f"speech lengths {torch.as_tensor(speech_lengths).tolist()} samples give {frames.tolist()} frames; "
            f"every utterance needs at least {Conv2dSubsampling4.MIN_FRAMES} frames "
            f"({(Conv2dSubsampling4.MIN_FRAMES - 1) * hop} samples)")
    return ((frames - 1) // 2 - 1) // 2


def encode_speech(encoder: SpeechEncoder, adapter: SpeechAdapter, speech: torch.Tensor, speech_lengths):
    """speech [B, S] -> enc [B, T', d], enc_lengths [B] (ESPnet's), features [B, N, D], feature lengths [B]."""
    speech_lengths = torch.as_tensor(speech_lengths, device=speech.device)
    own = encoder_lengths(encoder, speech_lengths).to(speech.device)
    enc, enc_lengths = encoder.encode(speech, speech_lengths)  # [B, T', d]
    feats, feat_lengths = adapter(enc, own.to(enc.device))  # [B, N, D]
    return enc, enc_lengths, feats, feat_lengths


def scatter_features(h: torch.Tensor, is_slot: torch.Tensor, features: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
    """h [B, T, D] with its `is_slot` [B, T] positions filled, row-major, by the first `lengths[i]` rows of
    features [N, L, D] (padding rows past a length are skipped)."""
    n = lengths.to(features.device)
    valid = torch.arange(features.shape[1], device=features.device)[None, :] < n[:, None]  # [N, L]
    return h.masked_scatter(is_slot.unsqueeze(-1).to(h.device), features[valid].to(h.device, h.dtype))


# ------------------------------------------------------------------------------------------- joint decoding


@torch.no_grad()
def joint_beam_search(llm: LlamaForCausalLM, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                      ctc_log_probs: torch.Tensor | None, ctc_lengths: torch.Tensor | None, *, eos_token_id: int,
                      beam_size: int = 4, ctc_weight: float = 0.3, max_new_tokens: int = 64,
                      pre_beam_ratio: float = 1.5, length_bonus: float = 0.0, lexicon=None,
                      lexicon_weight: float = 0.0) -> list[list[Hypothesis]]:
    """Beam search over the Llama decoder's next-token log-probs joined with the CTC prefix score, per prompt
    (`decoders.beam_search.weighted_beam_search` with `joint_scorers`; a scorer of weight 0 is not run):

        score(h + c) = score(h) + (1 - ctc_weight) * log p_llm(c | prompt, h)
                                + ctc_weight * [log psi_ctc(h + c) - log psi_ctc(h)] + length_bonus
                                + lexicon_weight * log p_lexicon(c | h)

    inputs_embeds [B, T, D] (left-padded prompts, attention_mask [B, T]); ctc_log_probs [B, T', V] over the SAME
    ids as the LLM (blank 0), ctc_lengths [B]. As in ESPnet, with 0 < ctc_weight < 1 only the int(pre_beam_ratio *
    beam) best LLM tokens get a CTC score (EOS always does: the probability of exactly h). lexicon: a
    `decoders.lexicon.LexiconScorer` (the look-ahead word unigram of a word list) or None. The beams of all prompts
    run as one batch of B * beam rows over one static KV cache. A prompt stops when its best ended hypothesis beats
    all running ones (exact for the best when length_bonus <= 0) or at max_new_tokens, where the running hypotheses
    end without EOS. Returns each prompt's ended hypotheses, best first (tokens without EOS; scores: the unweighted
    sum of each scorer that ran).
    """
    if inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be [B, T, D], got {tuple(inputs_embeds.shape)}")
    B, T, _ = inputs_embeds.shape
    V = llm.config.vocab_size
    if ctc_weight > 0 and ctc_log_probs is not None and (ctc_log_probs.dim() != 3 or ctc_log_probs.shape[0] != B
                                                         or ctc_log_probs.shape[2] != V):
        raise ValueError(f"ctc_log_probs must be [B={B}, T', V={V}] over the LLM's token ids (the CTC head is trained "
                         f"over the Llama tokenizer's ids), got {tuple(ctc_log_probs.shape)}")
    if not 0 < eos_token_id < V:
        raise ValueError(f"eos_token_id {eos_token_id} must lie in [1, {V}) (id 0 is the CTC blank)")
    max_new_tokens = min(max_new_tokens, llm.config.max_position_embeddings - T)
    if max_new_tokens <= 0:
        raise ValueError(f"prompt of {T} tokens leaves no room in the context window of "
                         f"{llm.config.max_position_embeddings}")
    scorers, weights = joint_scorers("llm", lambda: LlamaScorer(llm, inputs_embeds, attention_mask, max_new_tokens),
                                     ctc_log_probs, ctc_lengths, eos_token_id, ctc_weight, length_bonus, V,
                                     lexicon, lexicon_weight)
    maxlens = [max_new_tokens] * B
    if ctc_weight > 0:  # each token takes a frame of its own: no more tokens than frames (as ESPnet's maxlen = T)
        maxlens = [max(1, min(max_new_tokens, int(n))) for n in ctc_lengths.tolist()]
    return weighted_beam_search(scorers, weights, maxlens, vocab_size=V, eos=eos_token_id,
                                beam_size=beam_size, device=inputs_embeds.device, pre_beam_ratio=pre_beam_ratio,
                                pre_beam_score_key="llm" if ctc_weight < 1 else None,
                                stop="best_ended" if length_bonus <= 0 else None, eos_at_maxlen=False)
