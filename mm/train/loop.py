"""What a training loop needs besides its losses: the learning-rate schedule, AdamW with decay groups, atomic
checkpoints, a digest of the weights, and the loss plot (`loss.png`)."""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch


def schedule(step: int, total: int, warmup: int = 30) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, in name order: equal digests mean equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def plot_losses(history: list[dict], path: Path, tasks: tuple[str, ...], title: str) -> None:
    """loss.png: each task's next-token loss and the CTC loss (running means) against the step, stages shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(pts, k=25):  # running mean over the last k points of a series
        ys = [y for _, y in pts]
        return [x for x, _ in pts], [sum(ys[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(ys))]

    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    series = [(t, "lm_loss", f"{t}: next-token") for t in tasks]
    series.append((None, "ctc_loss", "speech encoder: CTC per token"))
    series.append((None, "grid_loss", "vision tower: grid cells (auxiliary)"))
    for task, key, label in series:
        pts = [(h["step"], h[key]) for h in history if h.get(key) is not None
               and (task is None or h.get("task") == task)]
        if pts:
            ax.plot(*smooth(pts), label=label, linewidth=1.2)
    for stage in (0, 1, 2):
        steps = [h["step"] for h in history if h["stage"] == stage]
        if steps:
            ax.axvspan(min(steps), max(steps), alpha=0.08, color=f"C{stage + 3}")
            ax.text(min(steps), 1.0, f" stage {stage}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:  # a run of no steps has nothing to plot
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW decaying the matrices only: norms, biases and 1-D tables keep their scale."""
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def save_atomic(state: dict, path: Path) -> None:
    """torch.save through a temporary file: a kill mid-write leaves the previous checkpoint."""
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
