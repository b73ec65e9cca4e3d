"""The ``Inputs`` interface, and the registry that rebuilds an ``Inputs`` from the config saved with a model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from executor.tuning.errors import DataError

Batch = dict[str, torch.Tensor]  # input name -> (B, ...) tensor; every tensor has the batch on axis 0
Transform = Callable[[Any], Any]
#: the two prompt roles of asymmetric search (sentence-transformers' names): what is searched for, what is found
QUERY, DOCUMENT = 'query', 'document'

_KINDS: dict[str, type[Inputs]] = {}
T = TypeVar('T', bound='type[Inputs]')


def register_inputs(cls: T) -> T:
    """Class decorator: ``inputs_from_config`` rebuilds instances of ``cls`` from configs of its ``kind``."""
    _KINDS[cls.kind] = cls
    return cls


def inputs_class(kind: str) -> type[Inputs]:
    if kind not in _KINDS:
        raise ValueError(f'unknown inputs kind {kind!r} in a saved model; this version reads {sorted(_KINDS)}')
    return _KINDS[kind]


def inputs_from_config(config: dict[str, Any]) -> Inputs:
    """The ``Inputs`` a model was saved with (``Inputs.config()``)."""
    return inputs_class(config.get('kind')).from_config(config)


class Inputs(ABC):
    """How a model is fed: items -> samples -> batches, the same way in training, serving and export.

    ``load(content, name)`` decodes one item's content (a path, bytes, an array, a string...); a transform turns what
    ``load`` gave into a sample; ``collate`` stacks samples into a ``Batch``. ``name`` is how errors call the item.
    """

    kind: ClassVar[str]
    #: names of the model's inputs, in the order the ONNX graph takes them
    onnx_inputs: ClassVar[tuple[str, ...]]
    #: int8 export: static (activations calibrated on ``calibration_contents``), else dynamic (weights only ahead;
    #: a transformer's attention and LayerNorm activations lose too much to static ranges)
    int8_static: ClassVar[bool] = True

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-ready, with ``kind``: saved with the model and in ``preprocessing.json``."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> Inputs: ...

    def with_options(self, **options: Any) -> Inputs:
        """A copy changed by the training options that shape inputs (``image_size`` ...); ``None`` leaves one alone.
        An option this kind of input has no use for is an error."""
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise ValueError(
                f'{", ".join(given)} does not apply to a model that takes {self.kind} inputs; leave it out'
            )
        return self

    @classmethod
    @abstractmethod
    def accepts(cls, item: Any) -> bool:
        """Whether ``item`` (an ``Item``) has content of this kind."""

    @classmethod
    def check_items(cls, items: Sequence[Any], what: str = 'items') -> None:
        """A ``DataError`` naming the first item whose content this model cannot take."""
        refused = [it.name for it in items if not cls.accepts(it)]
        if refused:
            raise DataError(f'{refused[0]} {cls.refusal.format(count=len(refused), what=what)}')

    @classmethod
    def check_content(cls, item: Any) -> None:
        """Decode ``item`` once, so that a corrupt one is refused before a run starts (a ``DataError`` naming it);
        here, only its kind is checked."""
        cls.check_items([item])

    #: why an item is refused and how to fix it, after the item's name (``{count}`` such among the ``{what}``)
    refusal: ClassVar[str] = 'has no content this model takes ({count} such among the {what})'

    def content_of(self, item: Any, prompt_name: str | None = None) -> Any:
        """What ``load`` takes of ``item`` (an ``Item``): its content (a two-tower model's inputs mark its kind),
        behind the model's prompt ``prompt_name`` where it has one."""
        return self.prompt(item.content, prompt_name)

    # --- prompts (sentence-transformers' ``prompts``: a text put before each sentence of a role) ------------------

    @property
    def prompts(self) -> dict[str, str]:
        """Prompt name -> the text put before a sentence of that role (e5's ``{'query': 'query: ', ...}``)."""
        return {}

    def prompt(self, content: Any, prompt_name: str | None) -> Any:
        """``content`` behind the prompt ``prompt_name``; unchanged where the model has no prompt of that name (a
        role such as ``QUERY`` is asked for everywhere, and most models have no prompts)."""
        return content

    def prompt_name(self, asked: str | None, default: str | None = None) -> str | None:
        """The prompt a request uses: ``asked`` (an error unless the model has it), else ``default`` where the model
        has it, else none."""
        if asked is None:
            return default if default in self.prompts else None
        if asked not in self.prompts:
            if self.prompts:
                fix = f'its prompts are {sorted(self.prompts)}; send one of them, or leave prompt_name out'
            else:
                fix = (
                    'it has no prompts; leave prompt_name out, or train one with prompts={"query": ..., "document": '
                    '...}'
                )
            raise ValueError(f'prompt_name={asked!r} is not a prompt of this model: {fix}')
        return asked

    @abstractmethod
    def load(self, content: Any, name: str) -> Any:
        """Decode one item's content; a ``DataError`` naming it when that fails."""

    @abstractmethod
    def eval_transform(self) -> Transform:
        """What ``load`` gave -> a sample, deterministically (evaluation, serving, export)."""

    @abstractmethod
    def train_transform(self, augmentation: str = 'none') -> Transform: ...

    def contrastive_transform(self) -> Transform:
        """The random view of self-supervised training (two per item make a positive pair)."""
        raise ValueError(f'self-supervised training has no views for {self.kind} inputs; use a supervised loss')

    def preprocess(self, content: Any, name: str) -> Any:
        """``load`` then the evaluation transform, one item."""
        return self.eval_transform()(self.load(content, name))

    @abstractmethod
    def collate(self, samples: Sequence[Any]) -> Batch: ...

    def batch(self, contents: Sequence[Any], names: Sequence[str] | None = None) -> Batch:
        """Contents preprocessed and collated in this thread."""
        names = item_names(len(contents), names, self.kind)
        return self.collate([self.preprocess(c, n) for c, n in zip(contents, names)])

    def as_batch(self, data: Batch | torch.Tensor) -> Batch:
        """An already preprocessed batch, checked."""
        if not isinstance(data, dict) or set(data) != set(self.onnx_inputs):
            raise ValueError(
                f'a preprocessed batch is a dict with the keys {list(self.onnx_inputs)}; send the '
                'items instead to have them preprocessed'
            )
        return data

    def concat(self, batches: Sequence[Batch]) -> Batch:
        """Batches as one, their rows in order (the first alone is returned as it is, not copied)."""
        if len(batches) == 1:
            return batches[0]
        return {name: torch.cat([b[name] for b in batches]) for name in batches[0]}

    @staticmethod
    def rows(batch: Batch) -> int:
        return len(next(iter(batch.values())))

    def split(self, batch: Batch, size: int) -> Iterator[Batch]:
        for start in range(0, self.rows(batch), size):
            yield {name: tensor[start : start + size] for name, tensor in batch.items()}

    def order(self, contents: Sequence[Any] | Batch) -> Any | None:
        """An order to run the items in, to cut padding (the caller restores theirs); ``None``: as they come."""
        return None

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Per ONNX input, its axes that vary between calls (the batch, always)."""
        return {name: {0: 'batch'} for name in self.onnx_inputs}

    @abstractmethod
    def example_contents(self) -> list[Any]:
        """Real items (at least 2) the export traces the model with and checks its parity on."""

    def calibration_contents(self) -> list[Any]:
        """Items int8 quantization calibrates on, apart from the parity ones."""
        raise ValueError(f'int8 quantization has no calibration data for {self.kind} inputs; use the fp32 export')

    @abstractmethod
    def probe_batch(self) -> Batch:
        """One small batch the registry measures a backbone's output size with."""

    @abstractmethod
    def random_batch(self, rows: int) -> Batch:
        """A batch of the model's full input size, for the automatic batch size's trial steps."""

    def preview(self, content: Any, name: str) -> Any | None:
        """An image to show the item by in reports (``None``: this kind is not shown)."""
        return None


def item_names(count: int, names: Sequence[str] | None, what: str = 'item') -> list[str]:
    if names is None:
        return [f'{what} {i}' for i in range(count)]
    if len(names) != count:
        raise ValueError(f'names has {len(names)} entries for {count} items; give one name per item or none')
    return [str(n) for n in names]
