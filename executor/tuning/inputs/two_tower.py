"""Inputs of a two-tower (text-to-image) model: each item goes to the tower of its content, images to the image
tower's ``ImageInputs`` and sentences to the text tower's ``TextInputs``, and a captioned image to both.

A batch holds the image tower's tensors under ``image.<name>`` and the text tower's under ``text.<name>``; the
model embeds every image, then every text. A batch of captioned images is therefore its images, then their captions
(view-major, as the pair losses take them); a batch of single items of both kinds also holds ``order``, the rows'
places in that sequence, so the model gives them back in the order they came.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from PIL import Image, ImageDraw, ImageFont

from executor.tuning.errors import DataError
from executor.tuning.inputs.base import Batch, Inputs, Transform, inputs_from_config, register_inputs
from executor.tuning.inputs.image import ImageInputs
from executor.tuning.inputs.text import TextInputs

IMAGE, TEXT = 'image', 'text'
ORDER = 'order'
TEXT_OPTIONS = ('max_seq_length', 'prompts')


class Text(str):
    """A sentence, marked as such: a two-tower model reads a plain ``str`` as an image's path."""


class Captioned(NamedTuple):
    """A captioned image: the content of one training pair."""

    image: Any
    text: str


def tower_batch(batch: Batch, tower: str) -> Batch:
    """The part of a two-tower batch that ``tower`` ('image' or 'text') takes, under its own input names."""
    prefix = f'{tower}.'
    return {name[len(prefix) :]: tensor for name, tensor in batch.items() if name.startswith(prefix)}


def text_tile(text: str, side: int = 192, size: int = 22) -> Image.Image:
    """``text`` written black on white, wrapped, on a square tile."""
    tile = Image.new('RGB', (side, side), 'white')
    font = ImageFont.load_default(size=size)
    lines = textwrap.wrap(text, max(8, int(side / (0.55 * size))))[: side // (size + 4)]
    ImageDraw.Draw(tile).multiline_text((8, 8), '\n'.join(lines), fill='black', font=font, spacing=4)
    return tile


@register_inputs
class TwoTowerInputs(Inputs):
    """Routes each item by its content; see the module's docstring for the batch it makes."""

    kind = 'image-text'
    onnx_inputs = ()  # each tower is exported on its own, with its own inputs
    refusal = 'has neither an image nor a text ({count} such among the {what}); send uri, blob, tensor or text'

    def __init__(self, image: ImageInputs, text: TextInputs) -> None:
        self.image, self.text = image, text

    def __repr__(self) -> str:
        return f'TwoTowerInputs({self.image!r}, {self.text!r})'

    def config(self) -> dict[str, Any]:
        return {'kind': self.kind, IMAGE: self.image.config(), TEXT: self.text.config()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TwoTowerInputs:
        return cls(inputs_from_config(config[IMAGE]), inputs_from_config(config[TEXT]))

    def with_options(self, **options: Any) -> TwoTowerInputs:
        text = {k: v for k, v in options.items() if k in TEXT_OPTIONS}
        image = {k: v for k, v in options.items() if k not in TEXT_OPTIONS}
        return TwoTowerInputs(self.image.with_options(**image), self.text.with_options(**text))

    # --- items --------------------------------------------------------------------------------------------------

    @classmethod
    def accepts(cls, item: Any) -> bool:
        return item.kind in (IMAGE, TEXT)

    @classmethod
    def check_content(cls, item: Any) -> None:
        cls.check_items([item])
        if item.kind == IMAGE:
            ImageInputs.check_content(item)
        if item.text is not None:
            TextInputs._text(item.text, item.name)

    @property
    def prompts(self) -> dict[str, str]:
        return self.text.prompts

    def content_of(self, item: Any, prompt_name: str | None = None) -> Any:
        """A captioned image as ``Captioned``, a sentence as ``Text`` (behind the text tower's prompt
        ``prompt_name`` where it has one), an image as its content."""
        if item.kind == TEXT:
            return Text(self.text.prompt(item.text, prompt_name))
        return Captioned(item.content, item.text) if item.text is not None else item.content

    def load(self, content: Any, name: str) -> tuple[str, Any]:
        if isinstance(content, Captioned):
            return 'pair', (self.image.load(content.image, name), self.text.load(content.text, f'{name} (caption)'))
        if isinstance(content, Text):
            return TEXT, self.text.load(content, name)
        return IMAGE, self.image.load(content, name)

    def _transform(self, image: Transform, text: Transform) -> Transform:
        def transform(loaded: tuple[str, Any]) -> tuple[str, Any]:
            kind, value = loaded
            if kind == 'pair':
                return kind, (image(value[0]), text(value[1]))
            return kind, image(value) if kind == IMAGE else text(value)

        return transform

    def eval_transform(self) -> Transform:
        return self._transform(self.image.eval_transform(), self.text.eval_transform())

    def train_transform(self, augmentation: str = 'none') -> Transform:
        return self._transform(self.image.train_transform(augmentation), self.text.train_transform('none'))

    # --- batches ------------------------------------------------------------------------------------------------

    def collate(self, samples: Sequence[tuple[str, Any]]) -> Batch:
        kinds = {kind for kind, _ in samples}
        if 'pair' in kinds and kinds != {'pair'}:
            raise DataError('a batch holds captioned images or single items, not both; split them into two requests')
        if kinds == {'pair'}:
            images, texts = [s[0] for _, s in samples], [s[1] for _, s in samples]
            return self._stack(images, texts)
        images = [s for kind, s in samples if kind == IMAGE]
        texts = [s for kind, s in samples if kind == TEXT]
        batch = self._stack(images, texts)
        if images and texts:  # rows come out images first: where each item's row is
            next_row = {IMAGE: 0, TEXT: len(images)}
            order = []
            for kind, _ in samples:
                order.append(next_row[kind])
                next_row[kind] += 1
            batch[ORDER] = torch.tensor(order)
        return batch

    def _stack(self, images: list[Any], texts: list[Any]) -> Batch:
        batch = {}
        if images:
            batch.update({f'{IMAGE}.{k}': v for k, v in self.image.collate(images).items()})
        if texts:
            batch.update({f'{TEXT}.{k}': v for k, v in self.text.collate(texts).items()})
        return batch

    def concat(self, batches: Sequence[Batch]) -> Batch:
        raise ValueError('a two-tower batch is not concatenated; encode each tower with its own encoder')

    @staticmethod
    def rows(batch: Batch) -> int:
        return sum(len(v) for k, v in batch.items() if k.endswith(('.images', '.input_ids')))

    def example_contents(self) -> list[Any]:
        images, texts = self.image.example_contents(), self.text.example_contents()
        return [Captioned(i, t) for i, t in zip(images, texts)]

    def probe_batch(self) -> Batch:
        return self._stack([self.image.preprocess(c, 'probe') for c in self.image.example_contents()[:1]], [])

    def random_batch(self, rows: int) -> Batch:
        batch = {f'{IMAGE}.{k}': v for k, v in self.image.random_batch(rows).items()}
        batch.update({f'{TEXT}.{k}': v for k, v in self.text.random_batch(rows).items()})
        return batch

    def preview(self, content: Any, name: str) -> Any | None:
        """An image as itself, a sentence written on a tile (so text -> image matches can be shown)."""
        if isinstance(content, Text):
            return text_tile(content)
        return self.image.preview(content.image if isinstance(content, Captioned) else content, name)
