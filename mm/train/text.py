"""Training recipes. `text-tiny`: the small scene-caption language model shipped as the default text model."""
from __future__ import annotations

import math
import random
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from decoders import LlamaConfig, LlamaForCausalLM, next_token_loss
from decoders.tokenizer_train import train_sentencepiece

from mm.data.scenes import captions

TEXT_TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """Llama's initialisation: every matrix N(0, std), norms at one."""
    for name, p in model.named_parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=std)


def token_batches(ids: list[int], batch: int, length: int, rng: random.Random):
    """Endless batches [batch, length] of random windows of one long token stream."""
    data = torch.tensor(ids)
    while True:
        starts = [rng.randrange(0, len(ids) - length) for _ in range(batch)]
        yield torch.stack([data[s:s + length] for s in starts])


def train_text_tiny(out_dir: str | Path, steps: int = 600, seed: int = 0, batch: int = 32, length: int = 64,
                    lr: float = 3e-3, log=print) -> dict:
    """Train the scene-caption text model and save it as a Hugging Face Llama directory with its tokenizer."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    train_text, held_out = captions(20000, seed=seed), captions(500, seed=seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(train_text))
        tok = train_sentencepiece([corpus], Path(tmp) / "tok", vocab_size=400, model_type="bpe")
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "tok" / "tokenizer.model", out_dir / "tokenizer.model")

    def stream(texts):
        return [t for text in texts for t in tok.encode(text, bos=True, eos=True)]

    cfg = LlamaConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **TEXT_TINY)
    model = LlamaForCausalLM(cfg)
    init_weights(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    batches = token_batches(stream(train_text), batch, length, rng)
    bar = tqdm(range(steps), desc="text-tiny", unit="step")
    for step in bar:
        x = next(batches)
        loss = next_token_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        ids = torch.tensor(stream(held_out)[: 64 * (len(stream(held_out)) // 64)]).view(-1, 64)
        held = next_token_loss(model(ids), ids).item()
    model.save_pretrained(out_dir)
    log(f"saved {out_dir}: train loss {loss.item():.3f}, held-out loss {held:.3f} (perplexity {math.exp(held):.2f})")
    return {"train_loss": loss.item(), "held_out_loss": held}
