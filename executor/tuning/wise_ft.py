"""WiSE-FT (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"): weight-space ensembling of the
pre-trained and the fine-tuned model, ``alpha * fine-tuned + (1 - alpha) * pre-trained`` (Finetuner's WiSEFTCallback).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class WiSEFT:
    """Holds the weights ``module`` starts training from (rebuilt the same on resume); ``apply`` blends them back.
    With ``alpha=None`` (no WiSE-FT asked for) it holds nothing and ``apply`` leaves the module as it is.

    Only the backbone is blended: new heads (projection, classifier) had no pre-trained weights and stay as trained.
    """

    def __init__(self, module: nn.Module, alpha: float | None) -> None:
        self.alpha = alpha
        self.initial = {k: v.detach().clone() for k, v in module.state_dict().items()} if alpha is not None else {}

    def apply(self, module: nn.Module) -> None:
        alpha = self.alpha
        if alpha is None:
            return
        tuned = module.state_dict()
        blended = {
            k: torch.lerp(self.initial[k].to(v.device, v.dtype), v, alpha) if v.is_floating_point() else v
            for k, v in tuned.items()
        }
        module.load_state_dict(blended)
        logger.info('WiSE-FT: backbone weights %.2f x fine-tuned + %.2f x pre-trained', alpha, 1 - alpha)
