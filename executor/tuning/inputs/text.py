"""Text inputs: a fast tokenizer (Hugging Face ``tokenizers``) that travels with the model, truncation to
``max_seq_length``, and padding per batch to its longest sentence (never to the maximum length)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch

from executor.tuning.errors import DataError
from executor.tuning.inputs.base import Batch, Inputs, Transform, register_inputs

MAX_SEQ_LENGTH = 8192  # past any text encoder's position embeddings
MAX_PROMPTS, MAX_PROMPT_CHARS = 32, 2000
IDS, MASK = 'input_ids', 'attention_mask'


def _identity(sample: Any) -> Any:
    return sample


@register_inputs
class TextInputs(Inputs):
    """``input_ids`` and ``attention_mask``, ``(B, T)`` int64, ``T`` the longest sentence of the batch.

    ``tokenizer`` is the text of a ``tokenizer.json`` (the fast tokenizer's whole definition, saved with the model,
    so an artifact needs no other file); sentences are cut to ``max_seq_length`` tokens, special tokens included.
    ``prompts`` (name -> text) are put before the sentences of a role, as sentence-transformers does: e5's
    ``{'query': 'query: ', 'document': 'passage: '}``; they are saved with the model and its ONNX preprocessing.
    """

    kind = 'text'
    onnx_inputs = (IDS, MASK)
    int8_static = False  # measured on all-MiniLM-L6-v2: static QDQ min cosine 0.10-0.14, dynamic per-channel 0.989
    refusal = 'is an image ({count} such among the {what}), but this model embeds text; send each as text'

    def __init__(
        self,
        tokenizer: str,
        max_seq_length: int = 256,
        pad_id: int | None = None,
        prompts: dict[str, str] | None = None,
    ) -> None:
        if not 1 <= int(max_seq_length) <= MAX_SEQ_LENGTH:
            raise ValueError(f'max_seq_length must be between 1 and {MAX_SEQ_LENGTH}, got {max_seq_length}')
        self.tokenizer_json = tokenizer
        self.max_seq_length = int(max_seq_length)
        self.pad_id = self._pad_id() if pad_id is None else int(pad_id)
        self._prompts = check_prompts(prompts or {})

    def __repr__(self) -> str:
        return f'TextInputs(max_seq_length={self.max_seq_length}, pad_id={self.pad_id}, prompts={self._prompts})'

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers and deep copies rebuild the tokenizer
        return {k: v for k, v in self.__dict__.items() if k != 'tokenizer'}

    @cached_property
    def tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(self.tokenizer_json)
        tokenizer.no_padding()  # padding is per batch, in collate
        tokenizer.enable_truncation(self.max_seq_length)
        return tokenizer

    def _pad_id(self) -> int:
        padding = json.loads(self.tokenizer_json).get('padding') or {}
        if 'pad_id' in padding:
            return int(padding['pad_id'])
        token = self.tokenizer.token_to_id('[PAD]') or self.tokenizer.token_to_id('<pad>')
        return int(token or 0)

    def config(self) -> dict[str, Any]:
        return {
            'kind': self.kind,
            'max_seq_length': self.max_seq_length,
            'pad_id': self.pad_id,
            'prompts': dict(self._prompts),
            'tokenizer': self.tokenizer_json,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TextInputs:
        return cls(config['tokenizer'], config['max_seq_length'], config.get('pad_id'), config.get('prompts'))

    def with_options(
        self, max_seq_length: int | None = None, prompts: dict[str, str] | None = None, **options: Any
    ) -> TextInputs:
        """``prompts`` replace the model's own (a ``{}`` removes them)."""
        super().with_options(**options)
        length = self.max_seq_length if max_seq_length is None else max_seq_length
        prompts = self._prompts if prompts is None else prompts
        if length == self.max_seq_length and prompts == self._prompts:
            return self
        return TextInputs(self.tokenizer_json, length, self.pad_id, prompts)

    @property
    def prompts(self) -> dict[str, str]:
        return dict(self._prompts)

    def prompt(self, content: Any, prompt_name: str | None) -> Any:
        text = self._prompts.get(prompt_name) if prompt_name is not None else None
        return text + content if text and isinstance(content, str) else content

    @classmethod
    def accepts(cls, item: Any) -> bool:
        return item.kind == 'text'

    @classmethod
    def check_content(cls, item: Any) -> None:
        cls.check_items([item])
        cls._text(item.content, item.name)

    @staticmethod
    def _text(content: Any, name: str) -> str:
        if not isinstance(content, str):
            raise DataError(f'{name}: a text model takes a string, got {type(content).__name__}; send it as text')
        if not content.strip():
            raise DataError(f'{name}: text is empty; send non-empty text')
        return content

    def load(self, content: Any, name: str) -> list[int]:
        """The sentence's token ids, truncated to ``max_seq_length``."""
        return self.tokenizer.encode(self._text(content, name)).ids

    def eval_transform(self) -> Transform:
        return _identity

    def train_transform(self, augmentation: str = 'none') -> Transform:
        if augmentation != 'none':
            raise ValueError(
                f'augmentation={augmentation!r} has no text form (it crops and colours images); leave it out for a '
                'text model'
            )
        return _identity

    def contrastive_transform(self) -> Transform:
        """The sentence as it is: two passes through the model differ by its dropout (SimCSE, Gao et al., 2021)."""
        return _identity

    def preprocess(self, content: Any, name: str) -> list[int]:
        return self.load(content, name)

    def collate(self, samples: Sequence[Sequence[int]]) -> Batch:
        longest = max((len(s) for s in samples), default=0)
        ids = torch.full((len(samples), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            ids[row, : len(sample)] = torch.as_tensor(sample, dtype=torch.long)
            mask[row, : len(sample)] = 1
        return {IDS: ids, MASK: mask}

    def as_batch(self, data: Batch | torch.Tensor) -> Batch:
        batch = super().as_batch(data)
        ids, mask = batch[IDS], batch[MASK]
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(
                f'a preprocessed text batch holds input_ids and attention_mask of one shape (N, T), got '
                f'{tuple(ids.shape)} and {tuple(mask.shape)}; send the sentences instead'
            )
        return {IDS: ids.long(), MASK: mask.long()}

    def concat(self, batches: Sequence[Batch]) -> Batch:
        """Batches as one, padded to the longest of them."""
        if len(batches) == 1:
            return batches[0]
        longest = max(b[IDS].shape[1] for b in batches)
        ids = [torch.nn.functional.pad(b[IDS], (0, longest - b[IDS].shape[1]), value=self.pad_id) for b in batches]
        masks = [torch.nn.functional.pad(b[MASK], (0, longest - b[MASK].shape[1])) for b in batches]
        return {IDS: torch.cat(ids), MASK: torch.cat(masks)}

    def split(self, batch: Batch, size: int):
        """Chunks of ``size`` rows, each cut to its own longest sentence."""
        for part in super().split(batch, size):
            longest = int(part[MASK].sum(dim=1).max()) if len(part[MASK]) else 0
            yield {IDS: part[IDS][:, :longest], MASK: part[MASK][:, :longest]}

    def order(self, contents: Sequence[Any] | Batch) -> np.ndarray | None:
        """Longest first, so that a batch pads its sentences to similar lengths (the caller restores the order)."""
        if isinstance(contents, dict):
            lengths = contents[MASK].sum(dim=1).numpy()
        else:
            lengths = np.array([len(c) if isinstance(c, str) else 0 for c in contents])
        return np.argsort(-lengths, kind='stable')

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: 'batch', 1: 'sequence'} for name in self.onnx_inputs}

    def example_contents(self) -> list[str]:
        return list(EXAMPLE_SENTENCES)

    def calibration_contents(self) -> list[str]:
        return [f'{a} {b.lower()}' for a in EXAMPLE_SENTENCES for b in EXAMPLE_SENTENCES if a != b][:64]

    def probe_batch(self) -> Batch:
        return self.batch(['a probe sentence'])

    def random_batch(self, rows: int) -> Batch:
        vocab = self.tokenizer.get_vocab_size()
        ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (rows, self.max_seq_length))
        return {IDS: ids, MASK: torch.ones_like(ids)}


def check_prompts(prompts: Any) -> dict[str, str]:
    """``prompts`` as a name -> text dict, or a ``ValueError`` saying what is wrong with it."""
    if not isinstance(prompts, dict):
        raise ValueError(
            f"prompts must be a dict of prompt name -> text, e.g. {{'query': 'query: ', 'document': 'passage: '}}; "
            f'got {type(prompts).__name__}'
        )
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f'prompts has {len(prompts)} entries; at most {MAX_PROMPTS} are taken')
    for name, text in prompts.items():
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise ValueError(f'a prompt name must be a non-empty string of at most 100 characters, got {name!r:.120}')
        if not isinstance(text, str) or len(text) > MAX_PROMPT_CHARS:
            raise ValueError(
                f'prompts[{name!r}] must be a string of at most {MAX_PROMPT_CHARS} characters (the text put before '
                f'each sentence), got {type(text).__name__}'
            )
    return dict(prompts)


#: sentences of varied length (the export traces the model and checks its parity on them)
EXAMPLE_SENTENCES = (
    'A man is playing a guitar.',
    'The quick brown fox jumps over the lazy dog while the farmer watches from the porch.',
    'Two children are running on the beach at sunset.',
    'Stocks fell sharply on Monday after the central bank raised interest rates by half a percentage point, the '
    'largest increase in two decades.',
    'Is it raining?',
    'A woman slices an onion in a small kitchen.',
)
