"""Recipe `moe-balance`: a small DeepSeek-style model (MLA, fine-grained + shared experts, grouped sigmoid routing,
one MTP module) trained on the project's scene captions twice, with and without DeepSeek-V3's auxiliary-loss-free
bias update, plotting the max/mean expert load over the steps (the imbalance balancing should remove).

    python -m mm.train.moe_balance --steps 250 --out docs/moe_balance.png   (~3 minutes, one thread)

Both runs share data, initialisation and the small sequence-wise balance loss; only gamma differs. The trained
model with the update then decodes with its MTP module as drafter (acceptance rate and speed-up are reported).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch

from decoders import next_token_loss
from decoders.deepseek import DeepseekConfig, DeepseekForCausalLM
from decoders.moe import load_imbalance, sequence_balance_loss, update_bias
from decoders.mtp import mtp_loss, speculative_generate
from decoders.tokenizer_train import train_sentencepiece

from mm.data.scenes import captions
from mm.train.text import init_weights, token_batches

SMALL = dict(hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
             n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
             first_k_dense_replace=1, routed_scaling_factor=1.0, max_position_embeddings=256, rms_norm_eps=1e-5)


def train_run(ids: list[int], cfg: DeepseekConfig, steps: int, gamma: float, seed: int, batch: int, length: int,
              lr: float, alpha: float, mtp_weight: float, log=print) -> tuple[DeepseekForCausalLM, dict]:
    """Train one model; returns it and its history: per step the loss and each MoE layer's max/mean load."""
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(cfg, mtp_depth=1)
    init_weights(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    batches = token_batches(ids, batch, length, random.Random(seed))
    history = {"loss": [], "imbalance": [], "loads": [], "gamma": gamma}
    model.train()
    for step in range(steps):
        x = next(batches)
        logits, hidden = model(x, return_hidden=True)
        loss = next_token_loss(logits, x)
        total = loss + mtp_loss(model, hidden, x, mtp_weight)
        total = total + sequence_balance_loss(model, alpha)  # after the MTP pass: its MoE block counts too
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loads = update_bias(model, gamma)  # gamma 0: counts read and reset, bias untouched
        history["loss"].append(loss.item())
        history["imbalance"].append([load_imbalance(load) for load in loads])
        history["loads"].append(torch.stack(loads))  # [MoE layers, E]
        if step % 50 == 0 or step == steps - 1:
            log(f"gamma {gamma}: step {step} loss {loss.item():.3f} max/mean load per layer "
                + " ".join(f"{v:.2f}" for v in history["imbalance"][-1]))
    return model.eval(), history


def plot(histories: list[dict], out: Path) -> None:
    """max/mean expert load (mean over MoE layers) per step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for h in histories:
        per_step = [sum(v) / len(v) for v in h["imbalance"]]
        label = f"bias update, gamma={h['gamma']}" if h["gamma"] else "no bias update"
        ax.plot(per_step, label=label, lw=1)
    ax.axhline(1.3, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("max / mean tokens per expert")
    ax.set_title("DeepSeek-style MoE on the scene captions: expert load")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def speculative_figures(model: DeepseekForCausalLM, prompts: list[list[int]], new_tokens: int) -> dict:
    """Acceptance rate of the MTP drafter and wall-time speed-up over plain greedy decoding, same tokens checked."""
    stats, same, t_plain, t_spec, accepted = {}, True, 0.0, 0.0, []
    for p in prompts:
        ids = torch.tensor([p])
        t0 = time.perf_counter()
        plain = model.generate(ids, max_new_tokens=new_tokens, eos_token_id=None)
        t_plain += time.perf_counter() - t0
        t0 = time.perf_counter()
        spec = speculative_generate(model, ids, max_new_tokens=new_tokens, eos_token_id=None, stats=stats)
        t_spec += time.perf_counter() - t0
        same &= torch.equal(plain, spec)
        accepted.append(stats["acceptance"])
    return {"same_tokens": same, "acceptance": sum(accepted) / len(accepted), "speedup": t_plain / t_spec}


def run(steps: int = 250, gamma: float = 0.003, seed: int = 0, batch: int = 16, length: int = 64, lr: float = 3e-3,
        alpha: float = 1e-4, mtp_weight: float = 0.3, out: str = "docs/moe_balance.png", log=print) -> dict:
    """Both runs, the plot, and the figures (written beside the PNG as JSON)."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(captions(20000, seed=seed)))
        tok = train_sentencepiece([corpus], Path(tmp) / "tok", vocab_size=400, model_type="bpe")
    ids = [t for text in captions(20000, seed=seed) for t in tok.encode(text, bos=True, eos=True)]
    cfg = DeepseekConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **SMALL)
    runs, histories = {}, []
    for g in (gamma, 0.0):
        t0 = time.perf_counter()
        model, h = train_run(ids, cfg, steps, g, seed, batch, length, lr, alpha, mtp_weight, log)
        last = [sum(v) / len(v) for v in h["imbalance"][-50:]]
        summed = sum(h["loads"][-50:])  # [layers, E]: each layer's tokens per expert over the last 50 steps
        runs["with_update" if g else "without_update"] = {
            "gamma": g, "steps": steps, "minutes": (time.perf_counter() - t0) / 60,
            "final_loss": sum(h["loss"][-20:]) / len(h["loss"][-20:]),
            "max_over_mean_per_step_last50": sum(last) / len(last),  # mean over MoE layers and the last 50 steps
            "max_over_mean_over_last50": sum(load_imbalance(s) for s in summed) / len(summed),
            "max_over_mean_first10": sum(sum(v) / len(v) for v in h["imbalance"][:10]) / len(h["imbalance"][:10])}
        histories.append(h)
        if g:
            prompts = [tok.encode(text, bos=True)[:4] for text in captions(4, seed=seed + 1)]
            runs["with_update"]["speculative"] = speculative_figures(model, prompts, new_tokens=48)
    plot(histories, Path(out))
    Path(out).with_suffix(".json").write_text(json.dumps(runs, indent=2))
    log(json.dumps(runs, indent=2))
    return runs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--gamma", type=float, default=0.003)
    ap.add_argument("--threads", type=int, default=1, help="small matrices: one thread beats two on a busy machine")
    ap.add_argument("--out", default="docs/moe_balance.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(steps=args.steps, gamma=args.gamma, out=args.out)


if __name__ == "__main__":
    main()
