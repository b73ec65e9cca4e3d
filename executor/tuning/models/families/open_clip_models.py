"""open_clip's CLIP models (``open_clip/<name>``, e.g. ``open_clip/ViT-B-32``): both towers of a text-to-image model
from one network, weights from a local file (``weights=``, an open_clip or OpenAI checkpoint) or random ones
(``pretrained=False``); nothing is downloaded.

The image tower is the network's ``visual`` with its preprocessing (size, mean, std); the text tower its text
transformer, fed by CLIP's own BPE tokenizer (open_clip's vocabulary file, read into a ``tokenizers`` tokenizer so it
travels with the model like any text model's) and pooled at the end-of-text token. Each tower ends in CLIP's own
projection, and the two-tower model keeps CLIP's learnt temperature. Only the CLIP class is taken (a Hugging Face
text tower, as in CoCa or the multilingual models, would need its files from the hub).
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from executor.tuning.inputs import ImageInputs, TextInputs
from executor.tuning.inputs.text import IDS
from executor.tuning.models.families._images import FeatureBackbone
from executor.tuning.models.family import Backbone, BackboneFamily
from executor.tuning.models.registry import register_family
from executor.tuning.models.weights import WeightsNotFoundError

PREFIX = 'open_clip/'


def architectures() -> list[str]:
    """open_clip's model names, read each time (``open_clip.add_model_config`` adds one)."""
    import open_clip

    return open_clip.list_models()


@lru_cache(maxsize=1)
def clip_tokenizer() -> str:
    """CLIP's BPE tokenizer as a ``tokenizer.json`` (its ids equal open_clip's ``tokenize``; tested)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode('utf-8').split('\n')[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    vocab = [
        *symbols,
        *(s + '</w>' for s in symbols),
        *(''.join(m) for m in merges),
        '<|startoftext|>',
        '<|endoftext|>',
    ]
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=merges)
    return tokenizer.backend_tokenizer.to_str()


class ClipTextTower(nn.Module):
    """CLIP's text transformer on ``input_ids`` padded per batch (not to the context length): the positions and the
    causal mask are cut to the batch's length, and each sentence is pooled at its end-of-text token."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.module = nn.ModuleDict({'token_embedding': clip.token_embedding, 'transformer': clip.transformer})
        self.module['ln_final'] = clip.ln_final
        self.positional_embedding = clip.positional_embedding
        self.text_projection = clip.text_projection
        self.register_buffer('attn_mask', clip.attn_mask, persistent=False)
        self.pool_type = clip.text_pool_type

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        ids = batch[IDS]
        length = ids.shape[1]
        x = self.module['token_embedding'](ids) + self.positional_embedding[:length]
        x = self.module['transformer'](x, attn_mask=self.attn_mask[:length, :length])
        x = text_global_pool(self.module['ln_final'](x), ids, self.pool_type)
        projection = self.text_projection
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def clip_backbones(name: str, weights: Any, pretrained: bool) -> tuple[dict[str, Backbone], float]:
    """Both towers of the open_clip model ``name`` as backbones, and its logit scale."""
    import open_clip

    arch = name[len(PREFIX) :]
    if pretrained and not weights:
        raise WeightsNotFoundError(
            f'{name!r} was asked for pretrained, but open_clip weights never ship with this service and it does not '
            f"download: pass weights='/path/to/open_clip_pytorch_model.bin' (an open_clip or OpenAI CLIP checkpoint of "
            f'{arch}), or pretrained=False for random weights'
        )
    clip = open_clip.create_model(arch, pretrained=str(weights) if weights else None)
    if not isinstance(clip, open_clip.model.CLIP):
        raise ValueError(
            f'{name!r} is a {type(clip).__name__}, whose text tower is a Hugging Face model this service cannot load '
            "offline; use a CLIP model of open_clip ('open_clip/ViT-B-32', 'open_clip/RN50', ...) or give a text "
            'tower of your own with text_model'
        )
    cfg = clip.visual.preprocess_cfg
    size = cfg['size'] if isinstance(cfg['size'], (tuple, list)) else (cfg['size'], cfg['size'])
    image_inputs = ImageInputs(
        {
            'input_size': (3, *size),
            'interpolation': cfg.get('interpolation', 'bicubic'),
            'mean': tuple(cfg['mean']),
            'std': tuple(cfg['std']),
            'crop_pct': 1.0,  # resized on the shortest side, then centre-cropped: open_clip's default
        }
    )
    text_inputs = TextInputs(clip_tokenizer(), clip.context_length, pad_id=0)
    embed_dim = int(open_clip.get_model_config(arch)['embed_dim'])
    saved = {'arch': arch, 'embed_dim': embed_dim}
    towers = {
        'image': Backbone(FeatureBackbone(clip.visual, 'call'), image_inputs, True, {**saved, 'tower': 'image'}, True),
        'text': Backbone(ClipTextTower(clip), text_inputs, True, {**saved, 'tower': 'text'}, True),
    }
    return towers, float(clip.logit_scale.detach())


@register_family
class OpenClipFamily(BackboneFamily):
    family = 'open_clip'
    order = 40
    hint = "'open_clip/<name>' (a CLIP model of open_clip: weights= a local checkpoint, or pretrained=False)"
    inputs_kind = 'image'  # built alone, the image tower; a two-tower run takes both towers of one name
    poolers = ()  # each tower pools as CLIP does

    @property
    def modality(self) -> str:
        return 'image-text'

    def names(self) -> list[str]:
        return [PREFIX + arch for arch in architectures()]

    def owns(self, name: str) -> bool:
        return name.startswith(PREFIX) and name[len(PREFIX) :] in architectures()

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
            raise ValueError(f'embedding_layer does not apply to {name!r}: each CLIP tower ends in its projection')
        if saved is not None:  # a saved tower: its architecture, then the saved weights over random ones
            return clip_backbones(PREFIX + saved['arch'], None, False)[0][saved['tower']]
        return clip_backbones(name, weights, pretrained)[0]['image']

    def towers(self, name: str, weights: Any, pretrained: bool) -> tuple[dict[str, Backbone], float]:
        """Both towers of ``name`` from one network ('image' and 'text'), and its logit scale."""
        return clip_backbones(name, weights, pretrained)

    def feature_dim(self, backbone: Backbone) -> int:
        return int(backbone.saved['embed_dim'])

    def output_dim(self, name: str) -> int:
        import open_clip

        return int(open_clip.get_model_config(name[len(PREFIX) :])['embed_dim'])

    def default_options(self, name: str) -> dict[str, Any]:
        import open_clip

        config = open_clip.get_model_config(name[len(PREFIX) :])
        return {
            'image_size': config['vision_cfg'].get('image_size', 224),
            'max_seq_length': config.get('text_cfg', {}).get('context_length', 77),
        }
