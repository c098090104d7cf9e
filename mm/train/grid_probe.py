"""The vision tower's training-only probe (`mm train --recipe tiny`): what is in each grid cell of a scene.

The speech encoder has its CTC loss; this is the vision tower's counterpart, standing in for the pretraining (CLIP) a
LLaVA vision tower comes with. With one 16 px patch per grid cell, it makes each image token say what is where
(shape, colour and size of the object in the cell, and the cell's row and column), which the decoder then only has
to look up. Not part of the saved model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mm.data.scenes import COLOURS, COLS, ROWS, SHAPES, SIZES
from mm.models.fusion import FusionModel

# what the probe tells of each grid cell: shape, colour and size (class 0: the cell is empty), row and column
GRID_CLASSES = (len(SHAPES) + 1, len(COLOURS) + 1, len(SIZES) + 1, len(ROWS), len(COLS))


def grid_labels(scene) -> torch.Tensor:
    """[9, 5]: shape, colour and size class of the object in each grid cell (reading order, 0 where empty), and
    the cell's row and column."""
    out = torch.zeros(9, 5, dtype=torch.long)
    out[:, 3], out[:, 4] = torch.arange(9) // 3, torch.arange(9) % 3
    for o in scene:
        out[o.row * 3 + o.col, :3] = torch.tensor([SHAPES.index(o.shape) + 1, COLOURS.index(o.colour) + 1,
                                                   SIZES.index(o.size) + 1])
    return out


class GridHead(torch.nn.Module):
    """A linear probe on the ViT's patch features, one patch per grid cell, predicting `grid_labels`."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, sum(GRID_CLASSES))

    def loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """feats [N, 9, d], labels [N, 9, 5] -> the sum over the five properties of the mean cross-entropy."""
        parts = self.proj(feats).split(GRID_CLASSES, dim=-1)  # 5 x [N, 9, classes]
        return sum(F.cross_entropy(p.flatten(0, 1), labels[..., k].flatten()) for k, p in enumerate(parts))


def vit_grid_loss(model: FusionModel, head: GridHead, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The probe's loss on the normed patch features the projector reads."""
    vit = model.vision_tower
    feats = vit.norm(vit.hidden_states(pixel_values, [-1])[0][:, vit.cfg.num_prefix_tokens:])  # [N, 9, d]
    return head.loss(feats, labels.to(feats.device))
