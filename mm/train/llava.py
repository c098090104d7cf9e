"""The two LLaVA training stages (Liu et al. 2023): which parameters learn, and one optimisation step.

Stage 1 (feature alignment): only the projector learns, on image-caption pairs (`plain` template), lr 1e-3.
Stage 2 (visual instruction tuning): projector + language model learn, on conversations (`llava_v1`), lr 2e-5.
The vision tower stays frozen in both. The loss covers answer tokens only: the processor's `labels` are
IGNORE_INDEX on the system text, questions, image tokens and padding.
"""
from __future__ import annotations

import torch
from torch import nn


STAGE_LR = {1: 1e-3, 2: 2e-5}


def set_trainable(model: nn.Module, stage: int) -> dict[str, nn.Parameter]:
    """Freeze all but the stage's parameters (1: projector; 2: projector + language model); return those by name."""
    if stage not in (1, 2):
        raise ValueError(f"LLaVA training stage must be 1 or 2, got {stage!r}")
    learn = ("projector.",) if stage == 1 else ("projector.", "language_model.")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(learn))
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model: nn.Module, stage: int, lr: float | None = None, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the stage's trainable parameters at LLaVA's learning rate (unless `lr` is given)."""
    params = list(set_trainable(model, stage).values())
    return torch.optim.AdamW(params, lr=STAGE_LR[stage] if lr is None else lr, weight_decay=weight_decay)


def answer_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token loss of a processor batch (`input_ids`, `pixel_values`, `attention_mask`, `labels`)."""
    return model(batch["input_ids"], batch.get("pixel_values"), batch.get("attention_mask"), labels=batch["labels"]).loss


def train_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = 1.0) -> float:
    """One optimisation step on a batch; returns the loss. The frozen vision tower stays in eval mode."""
    model.train()
    model.vision_tower.eval()
    optimizer.zero_grad(set_to_none=True)
    loss = answer_loss(model, batch)
    loss.backward()
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return float(loss.detach())
