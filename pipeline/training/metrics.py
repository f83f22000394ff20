"""Loss and scores: BCE + soft Dice on logits for training, hard Dice of a model on prepared inputs for validation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_EPS = 1.0  # px; smoothing of the soft Dice loss
BOUNDARY_PX = 3  # px at the model's input size: half-width of the band around the outline that boundary_weight weighs


def boundary_band(masks: torch.Tensor, *, px: int = BOUNDARY_PX) -> torch.Tensor:
    """float {0, 1} masks (N, 1, S, S) -> float (N, 1, S, S), 1 within `px` pixels of the outline (either side).

    Dilation minus erosion by a (2 px + 1) square, as max pooling::

        mask            band (px=1)
        . . . . . .     . # # # # .
        . . # # . .     . # # # # .
        . . # # . .  -> . # # # # .
        . . . . . .     . # # # # .
    """
    k = 2 * px + 1
    dilated = F.max_pool2d(masks, k, stride=1, padding=px)
    eroded = -F.max_pool2d(-masks, k, stride=1, padding=px)
    return dilated - eroded


def dice_bce_loss(logits: torch.Tensor, masks: torch.Tensor, *, boundary_weight: float = 0.0,
                  boundary_px: int = BOUNDARY_PX) -> torch.Tensor:
    """BCE + (1 - soft Dice), Dice per image then averaged; computed in float32.

    boundary_weight > 0 weighs the BCE of pixels near the true outline (`boundary_band`) by 1 + boundary_weight:
    most of the error of a good model lies there (86% within 3 px on COVID-QU-Ex Val).
    """
    logits, masks = logits.float(), masks.float()
    weight = 1.0 + boundary_weight * boundary_band(masks, px=boundary_px) if boundary_weight > 0 else None
    bce = F.binary_cross_entropy_with_logits(logits, masks, weight=weight)
    p = torch.sigmoid(logits)
    inter = (p * masks).sum(dim=(1, 2, 3))
    denom = p.sum(dim=(1, 2, 3)) + masks.sum(dim=(1, 2, 3))
    dice = (2 * inter + DICE_EPS) / (denom + DICE_EPS)
    return bce + (1 - dice).mean()


def dice_scores(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per image for bool/0-1 tensors (N, ...); 1.0 where both are empty."""
    pred, target = pred.flatten(1).float(), target.flatten(1).float()
    inter = (pred * target).sum(1)
    denom = pred.sum(1) + target.sum(1)
    return torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))


@torch.no_grad()
def evaluate(model: torch.nn.Module, x_u8: torch.Tensor, masks: torch.Tensor, *, threshold: float,
             batch_size: int = 64, autocast: bool = False) -> float:
    """Mean hard Dice at the model resolution: x_u8 uint8 (N, 1, S, S), masks {0, 1} (N, 1, S, S).

    autocast: bf16 autocast and channels_last on the tensors' device (CUDA, or a CPU with `cpu_bf16`).
    """
    was_training = model.training
    model.eval()
    scores = []
    for i in range(0, len(x_u8), batch_size):
        x = channels_last(x_u8[i : i + batch_size].float().div_(255), autocast or x_u8.is_cuda)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            prob = torch.sigmoid(model(x).float())
        scores.append(dice_scores(prob > threshold, masks[i : i + batch_size] > 0))
    model.train(was_training)
    return float(torch.cat(scores).mean()) if scores else float("nan")


def channels_last(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """`x` (N, C, H, W) in channels_last memory format if `enabled` (the bf16 path), else as it is."""
    return x.contiguous(memory_format=torch.channels_last) if enabled else x
