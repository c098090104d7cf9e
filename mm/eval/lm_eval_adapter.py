"""Our models inside lm-evaluation-harness (`lm_eval`, a development dependency): its `LM` interface over a Llama
directory or the multimodal model's decoder, registered as model "mm".

    python -m mm.eval.lm_eval_adapter --model mm --model_args pretrained=DIR --tasks T [--include_path TASK_DIR]
    import mm.eval.lm_eval_adapter; lm_eval.simple_evaluate(model="mm", model_args="pretrained=DIR", tasks=[...])

Text only: the multimodal model is scored through its Llama decoder and tokenizer, with BOS first. Requests:
    loglikelihood          (context, continuation) -> (log p(continuation | context), greedy?)
    loglikelihood_rolling  (text,) -> log p(text | BOS), in windows of the context length, each token predicted once
    generate_until         (context, {"until": [...], "max_gen_toks": N}) -> greedy text, cut at the first stop string
Importing this module imports lm_eval; nothing in the library imports it.
"""
from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mm.eval.scorer import TextLM


def text_scorer(pretrained: str | None = None, dtype: str = "float32", device: str = "cpu") -> TextLM:
    """A TextLM over a Llama directory, or over the decoder of the multimodal model / LLaVA (None: the shipped one)."""
    import torch

    from mm.models.formats import load

    model = load(pretrained, dtype=getattr(torch, dtype), device=device)
    if hasattr(model, "language_model"):
        return TextLM(model.language_model, model.tokenizer)
    if not hasattr(model, "embed_tokens"):
        raise ValueError(f"{pretrained}: lm_eval scores text; give a Llama, LLaVA or multimodal model directory")
    from decoders.tokenizer import load_tokenizer

    return TextLM(model, load_tokenizer(pretrained))


@register_model("mm")
class MMLM(LM):
    """lm_eval's LM over one of our text scorers (greedy generation; batch size 1)."""

    def __init__(self, pretrained: str | None = None, dtype: str = "float32", device: str = "cpu",
                 max_gen_toks: int = 256, scorer: TextLM | None = None, **unused):
        super().__init__()
        import torch

        if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm_eval's CLI asks for cuda by default
            print(f"mm lm_eval adapter: no CUDA device; running on cpu instead of {device}", file=sys.stderr)
            device = "cpu"
        self.scorer = scorer or text_scorer(pretrained, dtype, device)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = self.scorer.model.config.max_position_embeddings

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate the context so that the model's input, context + continuation but the last token, fits the
        context window (as lm_eval's HFLM)."""
        if len(continuation) > self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the context window of "
                             f"{self.max_length}")
        excess = len(context) + len(continuation) - 1 - self.max_length
        return (context[excess:] if excess > 0 else context), continuation

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) per request."""
        out = []
        for req in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            context, continuation = req.args
            ctx, cont = self.scorer.split(context, continuation)
            out.append(self.scorer.logprob_ids(*self._fit(ctx, cont)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text | BOS) per request, in disjoint windows of the context length."""
        tok = self.scorer.tokenizer
        prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            ids = tok.encode(text)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, prefix, self.max_length, 1)]
            out.append(sum(self.scorer.logprob_ids(ctx, pred)[0] for ctx, pred in windows))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation per request, cut at the first of gen_kwargs["until"]."""
        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            room = self.max_length - len(self.scorer.encode(context))
            n = min(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), room)
            out.append(self.scorer.generate_text(context, n, stop=until) if n > 0 else "")
        return out


if __name__ == "__main__":  # lm_eval's own command line with the model "mm" registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
