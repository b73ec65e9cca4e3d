"""The training configuration: Finetuner's parameter names, validated (a misspelt key is an error)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from executor.tuning.data.finetuner_csv import CSVOptions
from executor.tuning.devices import check_device
from executor.tuning.errors import did_you_mean
from executor.tuning.inputs.text import check_prompts
from executor.tuning.losses import list_losses, list_miners, unknown_name
from executor.tuning.matryoshka import matryoshka_sizes
from executor.tuning.optim import check_optimizer
from executor.tuning.pair_losses import CLIP_LOSS, PAIR_LOSSES

DATA_FIELDS = ('train_data', 'eval_data', 'query_data', 'index_data')  # a run's data: a path, or items
OPEN_CLIP = 'open_clip/'  # the names of open_clip's CLIP models, which bring both towers
Scheduler = Literal['linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'constant', 'constant_with_warmup']
Device = str  # 'auto' | 'cpu' | 'cuda' | 'cuda:N', checked below
# a judgements split's name (qrels/<split>.tsv): a file name, never a path
# The widest embedding a run may have (output_dim, matryoshka_dims): the widest model here gives 4096.
MAX_EMBED_DIM = 65536
EmbedDim = Annotated[int, Field(ge=1, le=MAX_EMBED_DIM)]
Split = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r'^[\w.-]+$')]
MAX_DEVICES = 64  # processes on one machine: past any machine's GPU count, and past what CPU training gains from
LOGGERS = ('tensorboard', 'wandb', 'mlflow')
# The experiment trackers besides TensorBoard are optional installs: the module each needs and its pip package.
TRACKER_PACKAGES = {'wandb': ('wandb', 'wandb'), 'mlflow': ('mlflow', 'mlflow-skinny')}


class SchedulerOptions(BaseModel):
    """``num_warmup_steps`` (batches, or a fraction of all steps when < 1), cycles and power of the schedule."""

    model_config = ConfigDict(extra='forbid')
    num_warmup_steps: float = Field(0, ge=0)
    num_cycles: float = Field(0.5, gt=0)
    power: float = Field(1.0, gt=0)
    lr_end: float = Field(0.0, ge=0)
    scheduler_step: Literal['batch', 'epoch'] = Field('batch', description='step the schedule every batch or epoch')
    num_training_steps: Optional[int] = Field(
        None, ge=1, description="the schedule's length in its steps (default: the run's batches, or its epochs)"
    )


class HardNegatives(BaseModel):
    """Hard negatives mined from the corpus before training, with sentence-transformers' ``mine_hard_negatives``
    option names and meaning: each query's corpus neighbours by the model being tuned, ranks ``range_min`` to
    ``range_max`` (judged positives never count), kept only where ``margin``/``relative_margin`` below the positive's
    score and within ``min_score``/``max_score``, then ``num_negatives`` of them (the ``top`` ones, or at
    ``random``)."""

    model_config = ConfigDict(extra='forbid')
    num_negatives: int = Field(3, ge=1, le=100, description='negatives per (query, positive) pair')
    range_min: int = Field(
        0, ge=0, le=100_000, description='skip the first range_min neighbours (likely unjudged positives)'
    )
    range_max: Optional[int] = Field(
        None,
        ge=1,
        le=100_000,
        description='look no further than range_max neighbours (default: range_min + num_negatives, x10 with a margin)',
    )
    margin: Optional[float] = Field(
        None, ge=-2, le=2, description='absolute: a negative scores at most positive - margin (also absolute_margin)'
    )
    absolute_margin: Optional[float] = Field(None, ge=-2, le=2, description="sentence-transformers' name of margin")
    relative_margin: Optional[float] = Field(
        None, ge=0, le=1, description='a negative scores at most positive - |positive| x relative_margin'
    )
    max_score: Optional[float] = Field(None, ge=-1, le=1, description='a negative scores at most this cosine')
    min_score: Optional[float] = Field(None, ge=-1, le=1, description='a negative scores at least this cosine')
    sampling_strategy: Literal['top', 'random'] = 'top'
    output_format: Literal['n-tuple', 'triplet'] = Field(
        'n-tuple',
        description="'n-tuple': one row (query, positive, negative_1..n); 'triplet': a row per negative",
    )
    corpus: Optional[str] = Field(
        None,
        description='documents to mine from for anchor,positive data (a corpus.jsonl or a CSV with a text column); '
        "default: the data's own positives (a BEIR folder's corpus for relevance data)",
    )
    mine_every_epoch: bool = Field(False, description='mine again with the model as it is before each later epoch')
    batch_size: int = Field(64, ge=1, le=4096, description='sentences embedded at once while mining')

    @model_validator(mode='after')
    def _consistent(self) -> HardNegatives:
        if self.margin is not None and self.absolute_margin is not None:
            raise ValueError('give margin or absolute_margin (the same option by two names), not both')
        if self.range_max is not None:
            if self.range_min >= self.range_max:
                raise ValueError(f'range_min={self.range_min} must be below range_max={self.range_max}')
            if self.num_negatives > self.range_max - self.range_min:
                raise ValueError(
                    f'cannot mine num_negatives={self.num_negatives} among ranks {self.range_min} to {self.range_max}; '
                    'lower num_negatives or range_min, or raise range_max'
                )
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise ValueError(f'min_score={self.min_score} is above max_score={self.max_score}')
        return self

    @property
    def columns(self) -> int:
        """The columns of a mined row: query, positive and the negatives."""
        return 2 + (self.num_negatives if self.output_format == 'n-tuple' else 1)

    @property
    def absolute(self) -> float | None:
        return self.margin if self.margin is not None else self.absolute_margin

    @property
    def depth(self) -> int:
        """range_max, or its default as sentence-transformers derives it."""
        if self.range_max is not None:
            return self.range_max
        filtered = self.absolute is not None or self.relative_margin is not None or self.max_score is not None
        spread = 10 if filtered else 1
        return self.range_min + self.num_negatives * spread


class TrainConfig(BaseModel):
    """Everything a run needs. Field names are Finetuner's ``fit`` arguments where it had them; Finetuner's other
    arguments (``model_options``, its callbacks, ...) are translated before, at the API's edge
    (``finetuner_compat.translate``), never here."""

    model_config = ConfigDict(extra='forbid', arbitrary_types_allowed=True, protected_namespaces=())

    # what to train
    model: str = Field('efficientnet_lite0', description='registry name, or an artifact path / run id to start from')
    weights: Optional[str] = Field(None, description='local checkpoint file for the backbone')
    pretrained: bool = True
    freeze: Union[bool, int, list[str]] = Field(False, description='True, leading stages, or layer names/prefixes')
    text_model: Optional[str] = Field(
        None, description='a two-tower (text-to-image) model: this text tower beside the image tower model'
    )
    text_freeze: Union[bool, int, list[str]] = Field(False, description="freeze, for a two-tower model's text tower")
    embedding_layer: Optional[str] = None
    output_dim: Optional[EmbedDim] = None
    pooler: Optional[Literal['avg', 'gem', 'mean', 'cls', 'max']] = Field(
        None, description="the model's own when left out; images: avg | gem, text: mean | cls | max"
    )
    freeze_batchnorm: Optional[bool] = Field(
        None, description='keep BatchNorm statistics fixed while training; default: True for pretrained weights'
    )
    image_size: Optional[int] = Field(None, ge=16, le=2048, description='override the model input size (pixels)')
    max_seq_length: Optional[int] = Field(
        None, ge=1, le=8192, description="a text model's token limit per sentence (default: the model's own)"
    )
    prompts: Optional[dict[str, str]] = Field(
        None,
        description="a text model's prompts, put before each sentence of a role: {'query': 'query: ', 'document': "
        "'passage: '} (e5); default: the model's own (a sentence-transformers folder's "
        'config_sentence_transformers.json); {} for none',
    )
    projection_layers: int = Field(2, ge=1, le=4, description='layers of the SimCLR projection head')

    # data
    train_data: Any = Field(None, description='CSV path, image folder, or a list of documents')
    eval_data: Any = Field(None, description='labelled data evaluated each epoch (queries = index, self excluded)')
    query_data: Any = None
    index_data: Any = None
    augmentation: Literal['none', 'light', 'strong'] = Field('none', description='training augmentation')
    limit: int = Field(20, ge=1, le=1000, description='k of the retrieval metrics')
    val_split: float = Field(
        0.0,
        ge=0,
        lt=1,
        description='hold out this share of train_data (per class) as the evaluation data, when no eval_data is given',
    )
    split: Split = Field(
        'train', description="the judgements split of relevance train_data (a BEIR folder's qrels/<split>.tsv)"
    )
    eval_split: Split = Field('test', description='the judgements split of relevance eval_data')
    hard_negatives: Optional[HardNegatives] = Field(
        None,
        description=(
            "negatives mined from the corpus for pair and relevance training, e.g. {'num_negatives': 5, 'range_min': "
            "10, 'range_max': 100, 'relative_margin': 0.05} (sentence-transformers' mine_hard_negatives options)"
        ),
    )
    csv_options: Optional[CSVOptions] = Field(
        None, description="how CSV files are read (Finetuner's CSVOptions: is_labeled, dialect, size, ...)"
    )

    # objective
    loss: Optional[str] = Field(
        None,
        description=(
            'default: TripletMarginLoss on labels, MultipleNegativesRankingLoss on sentence pairs, CoSENTLoss on '
            'scored pairs'
        ),
    )
    loss_options: dict[str, Any] = Field(default_factory=dict)
    matryoshka_dims: Optional[list[EmbedDim]] = Field(
        None,
        min_length=1,
        max_length=64,
        description='train every leading slice of the embedding too (MatryoshkaLoss), e.g. [384, 256, 128, 64]',
    )
    matryoshka_weights: Optional[list[float]] = Field(
        None, min_length=1, max_length=64, description='one weight per matryoshka dim'
    )
    miner: Optional[str] = None
    miner_options: dict[str, Any] = Field(default_factory=dict)

    # optimisation
    optimizer: str = Field('Adam', description='any torch.optim class by name (Adam, AdamW, SGD, RMSprop, ...)')
    optimizer_options: dict[str, Any] = Field(default_factory=dict)
    learning_rate: Optional[float] = Field(None, gt=0, le=10, description='default depends on the task (tasks/)')
    loss_optimizer: str = Field(
        'Adam', description="the loss's own optimizer (ArcFace, CosFace, proxies): any torch.optim class"
    )
    loss_optimizer_options: dict[str, Any] = Field(default_factory=lambda: {'lr': 1e-3})
    scheduler: Optional[Scheduler] = None
    scheduler_options: SchedulerOptions = Field(default_factory=SchedulerOptions)
    epochs: Optional[int] = Field(None, ge=1, le=10000, description='default depends on the task')
    batch_size: Optional[int] = Field(
        None,
        ge=2,
        le=65536,
        description=('the global batch, split among num_devices processes; default depends on the task'),
    )
    auto_batch_size: bool = Field(False, description='find the largest batch that fits in memory')
    num_items_per_class: int = Field(4, ge=2, le=1024)
    sampler: Literal['auto', 'class', 'random'] = 'auto'
    accumulate_grad_batches: int = Field(1, ge=1, le=1024)
    gradient_clip: Optional[float] = Field(None, gt=0)
    seed: int = Field(42, ge=0)

    # machinery
    device: Device = 'auto'
    num_devices: int = Field(
        1,
        ge=1,
        le=MAX_DEVICES,
        description=(
            'processes training the run together on this machine, launched by torchrun (DDP): one per GPU with '
            "device='cuda' (or 'auto' on a machine with GPUs), at most the GPUs visible; with device='cpu' (or 'auto' "
            'without GPUs) that many CPU processes joined over gloo. batch_size is the global batch and must be a '
            'multiple of num_devices'
        ),
    )
    amp: bool = Field(True, description='mixed precision on CUDA (ignored on CPU)')
    channels_last: bool = True
    num_workers: int = Field(0, ge=0, le=64)
    monitor: Optional[str] = Field(None, description='metric for best-model and early stopping')
    early_stopping_patience: Optional[int] = Field(None, ge=1)
    early_stopping_min_delta: float = Field(0.0, ge=0, description='a smaller change of monitor is no improvement')
    early_stopping_baseline: Optional[float] = Field(
        None, description='stop when monitor has not bettered this value for early_stopping_patience epochs'
    )
    wise_ft_alpha: Optional[float] = Field(
        None,
        ge=0,
        le=1,
        description='WiSE-FT: the final backbone weights are alpha x fine-tuned + (1 - alpha) x pre-trained',
    )
    save_best: bool = True
    tensorboard: bool = True
    loggers: list[str] = Field(
        default_factory=lambda: ['tensorboard'],
        description=(
            "experiment trackers: 'tensorboard' (under tensorboard/), 'wandb' (offline unless WANDB_MODE says "
            "otherwise), 'mlflow' (a file store under mlruns/ unless MLFLOW_TRACKING_URI is set)"
        ),
    )
    to_onnx: bool = False
    output_dir: Optional[Path] = None
    data_roots: Optional[list[str]] = None
    description: Optional[str] = Field(None, max_length=10_000, description='what the run is for (kept in its config)')
    experiment_name: Optional[str] = Field(
        None, max_length=200, description='a group of runs (kept in the config, as Finetuner grouped runs)'
    )
    callbacks: list[Any] = Field(default_factory=list, exclude=True)

    @field_validator('loss')
    @classmethod
    def _known_loss(cls, value: str | None) -> str | None:
        known = list_losses() + sorted(PAIR_LOSSES) + [CLIP_LOSS]
        if value is not None and value not in known:
            raise unknown_name('loss', value, known)
        return value

    @field_validator('miner')
    @classmethod
    def _known_miner(cls, value: str | None) -> str | None:
        if value is not None and value not in list_miners():
            raise unknown_name('miner', value, list_miners())
        return value

    @field_validator('optimizer', 'loss_optimizer')
    @classmethod
    def _known_optimizer(cls, value: str, info: ValidationInfo) -> str:
        return check_optimizer(value, info.field_name)

    @field_validator('prompts', mode='before')
    @classmethod
    def _check_prompts(cls, value: Any) -> Any:
        return None if value is None else check_prompts(value)

    @field_validator('loggers')
    @classmethod
    def _known_loggers(cls, value: list[str]) -> list[str]:
        return check_loggers(value)

    @field_validator('device')
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device(value)

    @field_validator('optimizer_options')
    @classmethod
    def _no_rate_in_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        if 'lr' in value:
            raise ValueError(
                f'optimizer_options holds lr={value["lr"]!r}, which learning_rate would override; set learning_rate '
                'instead'
            )
        return value

    @model_validator(mode='after')
    def _consistent(self) -> TrainConfig:
        if (
            self.query_data is not None
            and self.index_data is None
            or self.index_data is not None
            and self.query_data is None
        ):
            raise ValueError('query_data and index_data go together: give both, or eval_data alone')
        if (
            self.early_stopping_patience is not None
            and not self.has_evaluation
            and self.monitor not in (None, 'train_loss')
        ):
            raise ValueError(f'monitor={self.monitor!r} needs evaluation data (eval_data, or query_data + index_data)')
        if not self.tensorboard and 'loggers' in self.model_fields_set and 'tensorboard' in self.loggers:
            raise ValueError(
                f'tensorboard=False and loggers={self.loggers} disagree; leave tensorboard out of loggers (and '
                'tensorboard unset) to train without it'
            )
        self.check_devices()
        matryoshka_sizes(self.matryoshka_dims, self.matryoshka_weights)
        if not self.two_tower and self.text_freeze is not False:
            raise ValueError('text_freeze applies to the text tower of a two-tower model; set text_model too')
        if not self.two_tower and self.loss == CLIP_LOSS:
            raise ValueError(
                "loss='CLIPLoss' trains a two-tower (text-to-image) model: set text_model (e.g. 'all-MiniLM-L6-v2') "
                'beside the image model'
            )
        if self.two_tower and self.loss not in (None, CLIP_LOSS):
            raise ValueError(f"a two-tower model trains with loss='CLIPLoss', not {self.loss!r}; leave loss out")
        return self

    def check_devices(self) -> None:
        """``num_devices`` processes must each find a GPU of their own (or, on CPU, the batch must divide)."""
        n = self.num_devices
        if n == 1:
            return
        if self.batch_size is not None and self.batch_size % n:
            raise ValueError(
                f'batch_size={self.batch_size} is the global batch and must divide among num_devices={n} '
                f'processes; use a multiple of {n}'
            )
        if self.device.startswith('cuda:'):
            raise ValueError(
                f'device={self.device!r} names one GPU, but num_devices={n} trains on {n}; use '
                "device='cuda' (choose the GPUs with CUDA_VISIBLE_DEVICES), or num_devices=1"
            )
        if self.device == 'cpu':
            return
        count = torch.cuda.device_count()
        if self.device == 'auto' and count == 0:
            return  # no GPU: n CPU processes
        if count < n:
            shown = os.environ.get('CUDA_VISIBLE_DEVICES')
            where = f' (CUDA_VISIBLE_DEVICES={shown!r})' if shown is not None else ''
            visible, fewer = (
                ('no CUDA device is visible', '')
                if count == 0
                else (f'only {count} CUDA device(s) are visible', f'set num_devices to at most {count}, or ')
            )
            raise ValueError(
                f'num_devices={n} with device={self.device!r} needs {n} GPUs, but {visible}{where}; '
                f"{fewer}set device='cpu' to train with {n} CPU processes"
            )

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TrainConfig:
        """A config from its JSON values (``plan.config_record``), not validated again: it was when it was made."""
        values = dict(record)
        values['scheduler_options'] = SchedulerOptions.model_construct(**values['scheduler_options'])
        if values.get('csv_options') is not None:
            values['csv_options'] = CSVOptions.model_construct(**values['csv_options'])
        if values.get('hard_negatives') is not None:
            values['hard_negatives'] = HardNegatives.model_construct(**values['hard_negatives'])
        if values.get('output_dir') is not None:
            values['output_dir'] = Path(values['output_dir'])
        return cls.model_construct(**values)

    @property
    def active_loggers(self) -> list[str]:
        """The trackers this run logs to (``tensorboard=False`` takes TensorBoard out of the default)."""
        return [name for name in self.loggers if name != 'tensorboard' or self.tensorboard]

    def input_options(self) -> dict[str, Any]:
        """The options that shape a model's inputs, for ``Inputs.with_options`` (which refuses those that do not
        apply to its kind)."""
        return {'image_size': self.image_size, 'max_seq_length': self.max_seq_length, 'prompts': self.prompts}

    @property
    def two_tower(self) -> bool:
        """A text-to-image run: a text tower beside the image model, or a CLIP model that brings both."""
        return self.text_model is not None or str(self.model).startswith(OPEN_CLIP)

    @property
    def has_evaluation(self) -> bool:
        return self.eval_data is not None or self.query_data is not None or self.val_split > 0


def check_loggers(names: list[str]) -> list[str]:
    """``names`` without repeats, each a known tracker whose package is installed here; else the error says what is
    allowed or how to install it."""
    for name in names:
        if name not in LOGGERS:
            hint = did_you_mean(name, LOGGERS)
            raise ValueError(f'unknown logger {name!r}{hint}; allowed: {", ".join(map(repr, LOGGERS))}')
        module, package = TRACKER_PACKAGES.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise ValueError(
                f'logger {name!r} needs the {package!r} package, which is not installed where the run trains; install '
                f'it (`pip install -r requirements-trackers.txt`, or `pip install {package}`), or leave {name!r} out '
                'of loggers'
            )
    return list(dict.fromkeys(names))
