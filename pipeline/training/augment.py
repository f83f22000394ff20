"""Augmentation, applied on the fly and never mirrored left-right (the heart is on the left).

- intensity, on the CPU in the data loader, on the source pixels BEFORE `prepare_input` (the same
  function inference uses): black film borders and corner patches, smooth exposure gradients, gamma,
  contrast and brightness, CLAHE (an equalization variant), blur, sharpening, noise (`augment_intensity`);
- geometry, batched on the device with affine_grid + grid_sample on image and mask together:
  rotation, scale, aspect change and shift (`random_affines`, `augment_geometry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """What `augment_intensity` and `random_affines` draw from; probabilities are per image."""

    rotate_deg: float = 10.0  # degrees, max absolute rotation
    scale: tuple[float, float] = (0.85, 1.15)  # zoom factor range
    aspect: float = 0.1  # max relative aspect change (x/y stretch), log-uniform
    shift: float = 0.08  # fraction of the side, max absolute shift in x and y
    p_border: float = 0.3  # probability of black film borders on 1-4 sides
    border_max: float = 0.08  # fraction of the side, max border width
    p_corner: float = 0.3  # probability of dark corner patches (JSRT-like)
    corner_max: float = 0.2  # fraction of the side, max corner patch radius
    p_gradient: float = 0.3  # probability of a smooth exposure gradient
    gradient_max: float = 0.4  # max relative brightness change across the image
    gamma: tuple[float, float] = (0.6, 1.6)  # gamma range, log-uniform
    contrast: tuple[float, float] = (0.3, 1.0)  # fraction of the full range kept
    p_clahe: float = 0.25  # probability of CLAHE before the normalization (an equalization variant)
    p_blur: float = 0.25  # probability of a Gaussian blur
    blur_sigma: tuple[float, float] = (0.3, 1.5)  # px at 256 px side, scaled with the image
    p_sharpen: float = 0.15  # probability of an unsharp mask (film scanners often sharpen)
    p_noise: float = 0.3  # probability of Gaussian noise
    noise_sigma: tuple[float, float] = (0.003, 0.03)  # fraction of the full range
    p_invert: float = 0.0  # probability of inverted polarity (a MONOCHROME1 film read as MONOCHROME2)


DEFAULT_AUGMENT = AugmentConfig()
# Other hospitals' film, harder: wider gamma and contrast, more and stronger blur and noise, and inversion.
STRONG_AUGMENT = AugmentConfig(gamma=(0.4, 2.2), contrast=(0.15, 1.0), p_clahe=0.35, p_blur=0.4, blur_sigma=(0.3, 2.5),
                               p_noise=0.45, noise_sigma=(0.003, 0.06), p_gradient=0.4, p_invert=0.1)
AUGMENT_PRESETS = {"default": DEFAULT_AUGMENT, "strong": STRONG_AUGMENT}


def augment_intensity(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = DEFAULT_AUGMENT) -> np.ndarray:
    """uint8/uint16 (H, W) -> uint16 (H, W): source-side intensity augmentation, before `prepare_input`.

    Geometry is untouched, so the mask stays valid. Borders and corner patches are dark, as on film.
    """
    h, w = img.shape
    x = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 65535.0)
    side_scale = max(h, w) / 256.0
    if rng.random() < cfg.p_gradient:  # smooth exposure gradient (heel effect, uneven film)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * (np.arange(w, dtype=np.float32) / w - 0.5))[None, :] + (
            np.sin(angle) * (np.arange(h, dtype=np.float32) / h - 0.5)
        )[:, None]
        x *= 1.0 + np.float32(rng.uniform(-cfg.gradient_max, cfg.gradient_max)) * ramp
    x = np.clip(x, 0.0, 1.0) ** np.float32(np.exp(rng.uniform(np.log(cfg.gamma[0]), np.log(cfg.gamma[1]))))
    c = rng.uniform(*cfg.contrast)
    x = x * np.float32(c) + np.float32(rng.uniform(0.0, 1.0 - c))
    if rng.random() < cfg.p_clahe:  # on 8 bit: 16-bit CLAHE keeps 65536-bin histograms and is ~100x slower
        clahe = cv2.createCLAHE(clipLimit=float(rng.uniform(1.0, 3.0)), tileGridSize=(8, 8))
        x = clahe.apply(np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)).astype(np.float32) / 255.0
    if rng.random() < cfg.p_blur:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(*cfg.blur_sigma) * side_scale)
    elif rng.random() < cfg.p_sharpen:
        soft = cv2.GaussianBlur(x, (0, 0), rng.uniform(1.0, 2.0) * side_scale)
        x = x + np.float32(rng.uniform(0.3, 1.0)) * (x - soft)
    if rng.random() < cfg.p_noise:
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(rng.uniform(*cfg.noise_sigma))
    if cfg.p_invert and rng.random() < cfg.p_invert:
        x = 1.0 - np.clip(x, 0.0, 1.0)
    dark = rng.uniform(0.0, 0.05)
    if rng.random() < cfg.p_corner:
        for top, left in ((True, True), (True, False), (False, True), (False, False)):
            if rng.random() < 0.6:
                r = int(rng.uniform(0.05, cfg.corner_max) * max(h, w))
                rh, rw = min(r, h), min(r, w)
                yy = (np.arange(rh) if top else np.arange(rh)[::-1])[:, None]
                xx = (np.arange(rw) if left else np.arange(rw)[::-1])[None, :]
                rows = slice(0, rh) if top else slice(h - rh, h)
                cols = slice(0, rw) if left else slice(w - rw, w)
                x[rows, cols][yy * yy + xx * xx < r * r] = dark
    if rng.random() < cfg.p_border:
        for side in range(4):
            if rng.random() < 0.5:
                bw = int(rng.uniform(0.01, cfg.border_max) * (h if side < 2 else w))
                if side == 0:
                    x[:bw] = dark
                elif side == 1:
                    x[h - bw :] = dark
                elif side == 2:
                    x[:, :bw] = dark
                else:
                    x[:, w - bw :] = dark
    return np.rint(np.clip(x, 0.0, 1.0) * 65535).astype(np.uint16)


def random_affines(n: int, *, cfg: AugmentConfig, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """float32 (n, 2, 3) affine_grid matrices (output -> input coords): rotation, scale, aspect, shift.

    The linear part is a rotation times a positive diagonal, so its determinant is > 0: never a mirror.
    """

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = torch.deg2rad(u(-cfg.rotate_deg, cfg.rotate_deg))
    scale = u(*cfg.scale)
    aspect = torch.exp(u(-math.log1p(cfg.aspect), math.log1p(cfg.aspect)))
    sx, sy = 1.0 / (scale * aspect.sqrt()), 1.0 / (scale / aspect.sqrt())  # zoom in = sample a smaller area
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos * sx, -sin * sy, 2 * u(-cfg.shift, cfg.shift)], dim=1),
            torch.stack([sin * sx, cos * sy, 2 * u(-cfg.shift, cfg.shift)], dim=1),
        ],
        dim=1,
    )
    return theta.to(device)


def augment_geometry(
    images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float (N, 1, S, S) images in [0, 1] and {0, 1} masks -> the same warped by `theta` (N, 2, 3).

    Both go through ONE grid_sample (bilinear, zero padding = black border), so they stay aligned;
    the mask is re-binarised at 0.5.
    """
    both = torch.cat([images, masks.to(images.dtype)], dim=1)
    grid = F.affine_grid(theta.to(both.dtype), list(both.shape), align_corners=False)
    warped = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped[:, :1], (warped[:, 1:] > 0.5).to(images.dtype)
