"""Training beyond one device: the text recipe under `torchrun` with FSDP2 (`fully_shard`) or DDP.

    torchrun --nproc_per_node 2 -m mm.train.distributed --strategy fsdp --out runs/text-fsdp

FSDP2 shards every decoder block's parameters, gradients and AdamW state across the ranks (each holds 1/world of
them; a block's weights are all-gathered just for its forward and backward), so a model whose weights and optimizer
state do not fit one device trains across several; DDP keeps a full replica per rank and averages gradients. Both
see the same global batch: every rank draws the same batch [B, T] and trains on its B/world rows, and the gradient
average over ranks equals the full batch's mean-loss gradient (rows hold equally many tokens), so the loss curve is
that of one process on the whole batch. Checkpoints are sharded (`torch.distributed.checkpoint`: one file per rank,
each with its own shards) and resume on any number of ranks. Gloo on CPU, NCCL on CUDA.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from decoders import LlamaConfig, LlamaForCausalLM, next_token_loss

STRATEGIES = ("fsdp", "ddp")


def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def parallelize(model: LlamaForCausalLM, strategy: str, device: torch.device) -> nn.Module:
    """FSDP2: `fully_shard` each block, then the rest (embeddings, norm, head); DDP: a replica per rank."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    model.to(device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    for block in model.layers:
        fully_shard(block)
    return fully_shard(model)


def lr_factor(step: int, steps: int, warmup: int = 50) -> float:
    """The text recipe's schedule: linear warm-up, then cosine decay to zero."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def _rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    B = batch.shape[0]
    if B % world:
        raise ValueError(f"global batch of {B} rows does not split over {world} ranks")
    return batch[rank * B // world:(rank + 1) * B // world]  # [B / world, T]


def train(model: LlamaForCausalLM, batches: Iterator[torch.Tensor], steps: int, strategy: str = "fsdp",
          lr: float = 3e-3, warmup: int = 50, checkpoint: str | Path | None = None, checkpoint_every: int = 0,
          stop_after: int | None = None, log: Callable[[str], None] | None = None) -> tuple[nn.Module, list[float]]:
    """Train `model` (identical on every rank) on global batches [B, T] (the same on every rank) for `steps` steps;
    returns (the wrapped model, the global mean loss of each step run). With `checkpoint`, a sharded checkpoint is
    saved there every `checkpoint_every` steps and at the end, and training resumes from it when it exists (the
    batches already used are skipped). `stop_after`: leave after that step (a checkpoint saved), to resume later."""
    rank, world, device = setup()
    wrapped = parallelize(model, strategy, device)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    start = 0
    ckpt = None if checkpoint is None else Path(checkpoint)
    if ckpt is not None and (ckpt / ".metadata").is_file():
        start = load_checkpoint(wrapped, opt, ckpt)
        for _ in range(start):
            next(batches)
        if log and rank == 0:
            log(f"resumed from {ckpt} at step {start}")
    losses = []
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, steps, warmup)
        x = _rows(next(batches), rank, world).to(device)
        loss = next_token_loss(wrapped(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
        opt.step()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
        if log and rank == 0:
            log(f"step {step + 1}/{steps} loss {losses[-1]:.4f}")
        last = step + 1 == steps or (stop_after is not None and step + 1 == stop_after)
        if ckpt is not None and (last or (checkpoint_every and (step + 1) % checkpoint_every == 0)):
            save_checkpoint(wrapped, opt, ckpt, step + 1)
        if stop_after is not None and step + 1 == stop_after:
            break
    return wrapped, losses


def save_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, path: Path, step: int) -> None:
    """A sharded checkpoint of model + optimizer state at `step` (torch.distributed.checkpoint; each rank writes its
    own shards into `path`, replacing an earlier one)."""
    msd, osd = get_state_dict(model, opt)
    tmp = path.with_name(path.name + ".tmp")
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    dcp.save({"model": msd, "optim": osd, "step": torch.tensor(step)}, checkpoint_id=tmp)
    if dist.is_initialized():
        dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:  # swap in whole: a crash mid-save keeps the last one
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, path: Path) -> int:
    """Load a sharded checkpoint into `model` and `opt` (resharded to this world size); returns its step."""
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["step"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU, gathered on rank 0 (empty elsewhere): what `save_pretrained` writes."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------------------- the recipe


def main(argv: list[str] | None = None) -> int:
    """The text-tiny recipe (mm.train.text) under torchrun: tokenizer on rank 0, sharded training, HF directory."""
    from decoders.tokenizer import load_tokenizer
    from decoders.tokenizer_train import train_sentencepiece

    from mm.data.scenes import captions
    from mm.train.text import TEXT_TINY, init_weights, token_batches

    p = argparse.ArgumentParser(prog="torchrun ... -m mm.train.distributed", description=__doc__.split("\n")[0])
    p.add_argument("--strategy", choices=STRATEGIES, default="fsdp")
    p.add_argument("--out", default="runs/text-dist")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32, help="global batch (rows), split over the ranks")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100)
    args = p.parse_args(argv)
    rank, world, _ = setup()
    out = Path(args.out)
    if rank == 0 and not (out / "tokenizer.model").is_file():
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.txt"
            corpus.write_text("\n".join(captions(20000, seed=args.seed)))
            train_sentencepiece([corpus], Path(tmp) / "tok", vocab_size=400, model_type="bpe")
            shutil.copy(Path(tmp) / "tok" / "tokenizer.model", out / "tokenizer.model")
    if world > 1:
        dist.barrier()
    tok = load_tokenizer(out)
    ids = [t for text in captions(20000, seed=args.seed) for t in tok.encode(text, bos=True, eos=True)]
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **TEXT_TINY)
    model = LlamaForCausalLM(cfg)
    init_weights(model)
    batches = token_batches(ids, args.batch, args.length, random.Random(args.seed))
    wrapped, losses = train(model, batches, args.steps, args.strategy, args.lr, checkpoint=out / "checkpoint",
                            checkpoint_every=args.checkpoint_every, log=print)
    state = full_state_dict(wrapped)
    if rank == 0:
        LlamaForCausalLM.from_state_dict(cfg, state).save_pretrained(out)
        print(f"saved {out} ({args.strategy}, {world} ranks): last loss {losses[-1]:.3f}" if losses else f"saved {out}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
