"""Small modules put on top of a backbone: GeM pooling and the projection head."""

from __future__ import annotations

import torch
from torch import nn


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al., 2018): ``(mean(x.clamp(eps) ** p)) ** (1/p)`` over H and W.

    ``p`` is learnt; p=1 is average pooling and p -> inf tends to max pooling. timm's and torchvision's poolers have
    no learnable-p GeM, hence this module.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
        # a mean over H and W rather than avg_pool2d with the input's shape as window: both ONNX exporters take it
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class AvgPool(nn.Module):
    """Global average pooling, ``(B, C, H, W) -> (B, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class ProjectionHead(nn.Module):
    """An MLP from the embedding to ``output_dim``: ``num_layers - 1`` blocks of Linear+BatchNorm+ReLU, then Linear.

    With ``num_layers=1`` it is the linear projection Finetuner added for ``output_dim``; SimCLR uses 2 layers.
    """

    def __init__(self, in_features: int, output_dim: int, num_layers: int = 1) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f'ProjectionHead needs num_layers >= 1, got {num_layers}')
        layers: list[nn.Module] = []
        for _ in range(num_layers - 1):
            layers += [nn.Linear(in_features, in_features), nn.BatchNorm1d(in_features), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(in_features, output_dim))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.output_dim = output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_features) -> (B, output_dim)
        return self.net(x)


POOLERS = {'avg': AvgPool, 'gem': GeM}
