"""Finetuner's run artifacts (``run.save_artifact()``'s zip or folder), rebuilt as this project's ``model.pt``.

Finetuner (finetuner-commons' ``RunArtifact``) wrote::

    <run_name>/config.yml  metadata.yml  metrics.yml  example-results.yml
    <run_name>/models/input-map.yml
    <run_name>/models/<model>/metadata.yml   the model: name, builder, descriptor, options, output_dim, freeze, ...
    <run_name>/models/<model>/model.pt       its state_dict (model.onnx instead when the run had to_onnx=True)

and its Hub executor served each ``models/<model>`` folder holding both files (``select_model`` names one when there
are several, as CLIP's ``clip-text`` and ``clip-vision``). The image models were torchvision's (``descriptor`` is
the torchvision name) cut after their global pool; the text models a Hugging Face ``AutoModel`` (``descriptor`` its
name) inside a wrapper that pools its tokens. Here each becomes the same network of this project's torchvision or
transformers family, with the artifact's weights, written once beside the unpacked files.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from executor.tuning.artifact import MODEL_FILE, write_preprocessing

logger = logging.getLogger(__name__)

METADATA = 'metadata.yml'
RUN_CONFIG = 'config.yml'
TEXT_BUILDER = 'TextTransformerBuilder'  # a Hugging Face AutoModel in Finetuner's pooling wrapper
SERVED = 'torchvision image models (resnet-base, efficientnet-base, ...), transformers text models (bert-base-en, ...)'


def finetuner_models(folder: Path) -> dict[str, Path]:
    """The model folders of a Finetuner artifact under ``folder`` (each with ``metadata.yml`` and a model file), by
    their metadata ``name``; empty when ``folder`` is no Finetuner artifact."""
    import yaml

    found = {}
    for meta in sorted(folder.rglob(METADATA)):
        if (meta.parent / 'model.pt').is_file() or (meta.parent / 'model.onnx').is_file():
            record = yaml.safe_load(meta.read_text(encoding='utf-8')) or {}
            found[str(record.get('name') or meta.parent.name)] = meta.parent
    return found


def rebuild(folder: Path, models: dict[str, Path], select_model: str | None, out_root: Path) -> Path:
    """This project's ``model.pt`` for the chosen model of the Finetuner artifact in ``folder`` (written once)."""
    import yaml

    chosen = _choose(folder, models, select_model)
    metadata: dict[str, Any] = yaml.safe_load((chosen / METADATA).read_text(encoding='utf-8'))
    weights = chosen / 'model.pt'
    if not weights.is_file():
        raise ValueError(
            f'{str(chosen)!r} holds its model as model.onnx only (Finetuner wrote that for fit(to_onnx=True)); this '
            "service serves Finetuner's model.pt: save the artifact of a run without to_onnx, or fine-tune here and "
            'export with /export'
        )
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    out = out_root / f'finetuner-{chosen.name}-{digest}'
    if (out / MODEL_FILE).is_file():
        return out / MODEL_FILE
    _check_supported(metadata, chosen)
    state = torch.load(weights, map_location='cpu', weights_only=True)
    builder = metadata.get('builder')
    model = _image_model(metadata, state, out) if _is_cnn(metadata) else _text_model(metadata, state, out)
    from executor.tuning.models import save_model

    out.mkdir(parents=True, exist_ok=True)
    save_model(model.eval(), out / MODEL_FILE)
    write_preprocessing(out, model)
    logger.info('rebuilt Finetuner model %r (%s) as %s', metadata.get('name'), builder, out / MODEL_FILE)
    return out / MODEL_FILE


def _choose(folder: Path, models: dict[str, Path], select_model: str | None) -> Path:
    if select_model is not None:
        by_folder = {path.name: path for path in models.values()}
        if select_model in models or select_model in by_folder:
            return models.get(select_model) or by_folder[select_model]
        raise FileNotFoundError(
            f'select_model={select_model!r} is not a model of the Finetuner artifact {str(folder)!r}; it holds '
            f'{sorted(models)}'
        )
    if len(models) > 1:
        raise ValueError(
            f'the Finetuner artifact {str(folder)!r} holds {len(models)} models {sorted(models)}; choose one with '
            'select_model (for CLIP: clip-text or clip-vision)'
        )
    return next(iter(models.values()))


def _check_supported(metadata: dict[str, Any], where: Path) -> None:
    name, builder = metadata.get('name'), metadata.get('builder')
    if not _is_cnn(metadata) and builder != TEXT_BUILDER:
        raise ValueError(
            f'{str(where)!r}: Finetuner model {name!r} (builder {builder!r}) is not one this service serves; it '
            f'serves {SERVED} (CLIP, MLP, PointNet and cross-encoder artifacts are not)'
        )
    if metadata.get('freeze') or metadata.get('output_dim'):
        raise ValueError(
            f"{str(where)!r}: Finetuner model {name!r} carries Finetuner's projection head (freeze="
            f'{metadata.get("freeze")}, output_dim={metadata.get("output_dim")}), which this service does not '
            'rebuild; serve an artifact trained without freeze and output_dim, or fine-tune here with them'
        )
    pooler = (metadata.get('options') or {}).get('pooler')
    if _is_cnn(metadata) and pooler:
        raise ValueError(
            f'{str(where)!r}: Finetuner model {name!r} pools with {pooler!r}, which this service does not rebuild '
            "from Finetuner's weights; serve an artifact trained with the model's own pooling"
        )


def _is_cnn(metadata: dict[str, Any]) -> bool:
    """Finetuner's CNN stubs (ResNet, EfficientNet): torchvision models by their ``descriptor``."""
    return metadata.get('architecture') == 'cnn'


def _image_model(metadata: dict[str, Any], state: dict[str, torch.Tensor], out: Path):
    import torchvision

    from executor.tuning.files import atomic_torch_save
    from executor.tuning.models import build_model

    arch = str(metadata.get('descriptor'))
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f'Finetuner model {metadata.get("name")!r} names {arch!r}, which is no torchvision model')
    out.mkdir(parents=True, exist_ok=True)
    # the weights go through the torchvision family's own loader: every tensor checked against the network
    weights = atomic_torch_save(state, out / 'finetuner-weights.pt')
    model = build_model(f'torchvision/{arch}', weights=weights)
    weights.unlink()
    size = (metadata.get('preprocess_options') or {}).get('image', {})
    if size.get('height') and size.get('height') == size.get('width'):
        model.inputs = model.inputs.with_options(image_size=int(size['height']))
    return model


def _text_model(metadata: dict[str, Any], state: dict[str, torch.Tensor], out: Path):
    from executor.tuning.models import build_model
    from executor.tuning.models.weights import load_into

    descriptor = str(metadata.get('descriptor'))
    pooling = (metadata.get('options') or {}).get('pooler') or 'mean'
    try:
        model = build_model(descriptor, pretrained=False, pooler=pooling)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(
            f'Finetuner model {metadata.get("name")!r} is the Hugging Face model {descriptor!r}, whose configuration '
            f'and tokenizer this service needs from the local Hugging Face cache (it never downloads): {err}'
        ) from None
    net = model.backbone.module
    load_into(net, _unwrapped(state, set(net.state_dict())), f"the Finetuner artifact's {descriptor}")
    return model


def _unwrapped(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """``state`` without the prefix of the module that wrapped the transformer (Finetuner's pooling wrapper), and
    without the transformer's own pooler, which sentence embeddings do not use."""
    prefixes = {''} | {key.split('.', 1)[0] + '.' for key in state if '.' in key}
    best = max(prefixes, key=lambda p: len({k.removeprefix(p) for k in state if k.startswith(p)} & expected))
    return {
        key.removeprefix(best): value
        for key, value in state.items()
        if key.startswith(best) and not key.removeprefix(best).startswith('pooler.')
    }
