"""Losses and miners by name, over pytorch-metric-learning, plus cross-entropy classification.

``build_loss('TripletMarginLoss', {'margin': 0.2}, ...)`` and ``build_miner('TripletMarginMiner', {...})`` return the
PML objects; losses that hold parameters (ArcFace, CosFace, proxies...) are trained by their own optimizer.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from torch import nn

from executor.tuning.errors import did_you_mean, excerpt
from executor.tuning.options import check_options, signature_parameters

CROSS_ENTROPY = 'CrossEntropyLoss'
# The most values a loss's own weights may hold (128 MiB as float32): ArcFace with 100,000 classes of 320 dimensions.
# The service builds the loss in its own process to check a request, so this bounds what a request can make it take.
MAX_LOSS_WEIGHTS = 2**25
WEIGHT_SIZES = ('num_classes', 'embedding_size', 'descriptors_dim', 'centers_per_class', 'sub_centers')
# PML classes that are bases or take no labels (VICReg, Manifold): they need inputs other than (embeddings, labels).
EXCLUDED_LOSSES = {'BaseMetricLossFunction', 'GenericPairLoss', 'VICRegLoss', 'ManifoldLoss'}
EXCLUDED_MINERS = {'BaseMiner', 'BaseTupleMiner', 'BaseSubsetBatchMiner', 'EmbeddingsAlreadyPackagedAsTriplets'}
# Options without a default in PML, filled so that naming the loss is enough.
LOSS_DEFAULTS: dict[str, dict[str, Any]] = {
    'RankedListLoss': {'margin': 0.4, 'Tn': 1.0},
    'NTXentLoss': {'temperature': 0.1},
}


@lru_cache(maxsize=1)
def list_losses() -> list[str]:
    names = [
        n
        for n, c in vars(pml_losses).items()
        if inspect.isclass(c) and issubclass(c, pml_losses.BaseMetricLossFunction) and n not in EXCLUDED_LOSSES
    ]
    return sorted(names + [CROSS_ENTROPY])


@lru_cache(maxsize=1)
def list_miners() -> list[str]:
    return sorted(
        n
        for n, c in vars(pml_miners).items()
        if inspect.isclass(c) and issubclass(c, pml_miners.BaseMiner) and n not in EXCLUDED_MINERS
    )


def unknown_name(kind: str, name: str, valid: list[str]) -> ValueError:
    hint = did_you_mean(name, valid, n=3, cutoff=0.5, form='clause')
    return ValueError(f'unknown {kind} {name!r}{hint} Valid {kind} names: {", ".join(valid)}')


def _accepted(cls: type) -> set[str]:
    """Keyword arguments a PML class takes, through its MRO (subclasses often forward ``**kwargs``)."""
    return set(signature_parameters(cls))


def _construct(kind: str, cls: type, options: dict[str, Any]) -> Any:
    options = check_options(kind, cls, options)
    check_weights(kind, cls, options)
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise ValueError(f'{kind} {cls.__name__} rejected its options {excerpt(options)}: {err}') from err


def check_weights(kind: str, cls: type, options: dict[str, Any]) -> None:
    """Refuse a loss whose weights (classes x embedding size x centers per class) would hold more than
    ``MAX_LOSS_WEIGHTS`` values, before they are allocated: the service builds the loss once to check a request."""
    params = signature_parameters(cls)
    sizes = {key: options.get(key, params[key].default) for key in WEIGHT_SIZES if key in params}
    sizes = {key: size for key, size in sizes.items() if isinstance(size, int) and not isinstance(size, bool)}
    if len(sizes) < 2:
        return
    count = math.prod(sizes.values())
    if count > MAX_LOSS_WEIGHTS:
        shown = ' x '.join(f'{key}={size}' for key, size in sizes.items())
        raise ValueError(
            f'{kind} {cls.__name__} would hold {count} weights ({shown}), more than the {MAX_LOSS_WEIGHTS} '
            'this service builds; use fewer classes or a smaller output_dim, or a loss without weights '
            '(TripletMarginLoss, MultiSimilarityLoss...)'
        )


@dataclass
class LossSpec:
    name: str
    module: nn.Module

    @property
    def has_parameters(self) -> bool:
        return any(p.requires_grad for p in self.module.parameters())


def build_loss(
    name: str,
    options: dict[str, Any] | None = None,
    *,
    num_classes: int | None = None,
    embedding_size: int | None = None,
    self_supervised: bool = False,
) -> LossSpec:
    """The loss ``name`` with ``options``; ``num_classes``/``embedding_size`` go to losses that hold class weights.

    ``self_supervised`` wraps the loss in PML's ``SelfSupervisedLoss``: it then takes two views' embeddings, each
    row of the first positive with the same row of the second.
    """
    if name not in list_losses():
        raise unknown_name('loss', name, list_losses())
    options = {**LOSS_DEFAULTS.get(name, {}), **(options or {})}
    if name == CROSS_ENTROPY:
        return LossSpec(name, _construct('loss', nn.CrossEntropyLoss, options))
    cls = getattr(pml_losses, name)
    accepted = _accepted(cls)
    sizes = {
        'num_classes': num_classes,
        'embedding_size': embedding_size,
        'descriptors_dim': embedding_size,
        'l': embedding_size,
    }
    for key, value in sizes.items():
        if key in accepted and key not in options and value is not None:
            options[key] = value
    module = _construct('loss', cls, options)
    if self_supervised:
        module = pml_losses.SelfSupervisedLoss(module, symmetric=True)
    return LossSpec(name, module)


def build_miner(name: str | None, options: dict[str, Any] | None = None) -> nn.Module | None:
    """The miner ``name`` with ``options``, or ``None`` (Finetuner's default: the loss sees every tuple)."""
    if name is None:
        if options:
            raise ValueError(f'miner_options {options} given without a miner; name the miner or drop the options')
        return None
    if name not in list_miners():
        raise unknown_name('miner', name, list_miners())
    return _construct('miner', getattr(pml_miners, name), dict(options or {}))
