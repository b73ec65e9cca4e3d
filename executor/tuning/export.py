"""ONNX export: one checked, self-contained ``.onnx`` file (fp32, fp16 or int8) with its preprocessing beside it.

Every export runs the model in eval mode, checks the graph with ``onnx.checker`` and compares onnxruntime's outputs
with torch's on real items of the model's inputs (``model.inputs.example_contents()``: photos for an image model); a
file outside the tolerance is deleted and the export raises ``ExportError``. The graph's inputs and outputs are the
contract of ``artifact.py``: the inputs' ONNX names with their dynamic axes, ``embeddings`` and, for a classifier,
``logits``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel
from torch import nn

from executor.tuning import artifact
from executor.tuning.errors import ExportError
from executor.tuning.inputs import Batch, Inputs
from executor.tuning.models import TOWERS, EmbeddingModel, TwoTowerModel
from executor.tuning.quantize import parity, quantize_int8, run_onnx

__all__ = ['ATOL', 'MIN_COSINE', 'ExportError', 'ExportReport', 'export_onnx', 'export_towers']

logger = logging.getLogger(__name__)

Variant = Literal['fp32', 'fp16', 'int8']
# Parity an export must reach against torch, per variant (cosine of each row, and max |onnx - torch| for fp32).
MIN_COSINE: dict[str, float] = {'fp32': 0.9999, 'fp16': 0.999, 'int8': 0.99}
ATOL: dict[str, float | None] = {'fp32': 1e-3, 'fp16': None, 'int8': None}
# Protobuf cannot serialise a model over 2 GiB: bigger weights go to one external data file beside the graph.
PROTOBUF_LIMIT = 2**31 - 2**26


@dataclass(frozen=True)
class ExportReport:
    """What ``export_onnx`` wrote and how closely it matches torch on the parity items."""

    path: Path
    variant: Variant
    max_abs_diff: float  # max |onnx - torch| over every output value
    min_cosine: float  # the lowest cosine similarity between an onnx row and its torch row
    size_bytes: int
    seconds: float
    exporter: Literal['dynamo', 'legacy']
    outputs: tuple[str, ...]
    float_nodes: int = 0  # int8: Conv/MatMul/Gemm nodes left in float for parity


def export_onnx(
    model: EmbeddingModel,
    path: str | os.PathLike,
    *,
    fp16: bool = False,
    quantize: bool = False,
    sample: Sequence[Any] | Batch | torch.Tensor | None = None,
    calibration: Sequence[Any] | Batch | torch.Tensor | None = None,
    opset: int | None = None,
    atol: float | None = None,
    min_cosine: float | None = None,
    dynamo: bool = True,
) -> ExportReport:
    """Export ``model`` to ``path`` and check it against torch; writes ``preprocessing.json`` beside it.

    ``fp16``: weights and activations in float16 with float32 inputs and outputs (for GPUs; slow on CPU).
    ``quantize``: int8 static quantization (QDQ, per-channel weights) calibrated on ``calibration`` items, by default
    the inputs' own (skimage photos for images); pass items from the model's domain for the best parity. ``sample``:
    parity items (a list, or a preprocessed batch), by default the inputs' examples (6 skimage photos).
    ``atol``/``min_cosine``: tolerances, defaulting per variant to ``ATOL``/``MIN_COSINE``. ``dynamo=False`` uses
    the legacy TorchScript exporter, which is also the fallback when the dynamo exporter fails.
    """
    if isinstance(model, TwoTowerModel):
        raise ValueError('a two-tower model is exported one tower per file: use export_towers(model, folder)')
    if fp16 and quantize:
        raise ValueError('choose one of fp16=True or quantize=True: int8 quantization starts from the float32 graph')
    variant: Variant = 'fp16' if fp16 else 'int8' if quantize else 'fp32'
    atol = ATOL[variant] if atol is None else atol
    min_cosine = MIN_COSINE[variant] if min_cosine is None else min_cosine
    path = Path(path)
    if path.suffix != '.onnx':
        raise ValueError(f'export path must end in .onnx, got {str(path)!r}')
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    inputs = model.inputs
    batch = _as_batch(inputs, inputs.example_contents() if sample is None else sample, 'sample', 2)
    if any(p.device.type != 'cpu' for p in model.parameters()):
        model = copy.deepcopy(model).cpu()  # traced and checked on the CPU; the caller's model stays on its device
    was_training = model.training
    module = _GraphModule(model).eval()  # the model, with its outputs as the graph gives them
    try:
        with torch.inference_mode():
            reference = [t.numpy() for t in module(*_graph_args(inputs, batch))]
        exporter, float_nodes, max_abs, min_cos = _export_variant(
            module, inputs, batch, reference, path, variant, calibration, opset, dynamo, (min_cosine, atol)
        )
    finally:
        model.train(was_training)
    artifact.write_preprocessing(path.parent, model)
    report = ExportReport(
        path,
        variant,
        max_abs,
        min_cos,
        _size(path),
        time.perf_counter() - start,
        exporter,
        artifact.output_names(model),
        float_nodes,
    )
    logger.info('exported %s (%s, %.1f MB) in %.1f s', path, variant, report.size_bytes / 1e6, report.seconds)
    return report


def export_towers(model: TwoTowerModel, folder: str | os.PathLike, **options: Any) -> dict[str, ExportReport]:
    """Each tower of a two-tower model exported alone to ``folder/<clip-vision|clip-text>/model.onnx`` (its
    ``preprocessing.json`` beside it) and parity-checked, as ``export_onnx`` does (``options`` are its)."""
    return {name: export_onnx(model.tower(name), artifact.tower_onnx_file(folder, name), **options) for name in TOWERS}


def _export_variant(
    module: _GraphModule,
    inputs: Inputs,
    batch: Batch,
    reference: list[np.ndarray],
    path: Path,
    variant: Variant,
    calibration: Any,
    opset: int | None,
    dynamo: bool,
    tolerance: tuple[float, float | None],
) -> tuple[str, int, float, float]:
    """Export into a temporary folder beside ``path``, convert to ``variant``, and move the files over only when
    parity holds (``tolerance``: min cosine, max abs diff): (exporter, nodes in float, max abs diff, min cosine).
    """
    min_cosine, atol = tolerance
    large = sum(p.numel() * p.element_size() for p in module.parameters()) > PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(prefix='.export-', dir=path.parent) as tmp:
        fp32 = Path(tmp) / 'fp32.onnx'
        exporter = _export_graph(module, inputs, batch, fp32, opset, dynamo, large)
        float_nodes = 0
        if variant == 'fp16':
            proto = _to_fp16(onnx.load(str(fp32)), large)
        elif variant == 'int8':
            cal = _as_batch(
                inputs, inputs.calibration_contents() if calibration is None else calibration, 'calibration', 1
            )
            proto, float_nodes = quantize_int8(fp32, Path(tmp), inputs, batch, reference, cal, min_cosine, large)
        else:
            proto = onnx.load(str(fp32))
        final = Path(tmp) / path.name
        _save(proto, final, artifact.preprocessing(module.model), large)
        max_abs, min_cos = parity(reference, run_onnx(final, batch))
        logger.info('%s export of %s: max |onnx - torch| %.3g, min cosine %.6f', variant, path.name, max_abs, min_cos)
        if min_cos < min_cosine or (atol is not None and max_abs > atol):
            raise ExportError(
                f'{variant} ONNX export does not match torch: max abs diff {max_abs:.4g} (allowed '
                f'{atol if atol is not None else "any"}), min cosine {min_cos:.6f} (needed {min_cosine}); the '
                f'file was not written. Check that the model runs the same in eval mode, or for fp16/int8 use '
                f'the fp32 export'
            )
        for item in Path(tmp).iterdir():
            if item.name.startswith(path.name):
                os.replace(item, path.parent / item.name)
    return exporter, float_nodes, max_abs, min_cos


class _GraphModule(nn.Module):
    """The model as the graph runs it: its inputs as positional tensors, in ``inputs.onnx_inputs`` order, and its
    outputs as a tuple (embeddings, and logits for a classifier, so one graph serves /encode and /classify)."""

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__()
        self.model = model
        self.names = model.inputs.onnx_inputs

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embeddings = self.model(dict(zip(self.names, tensors)))  # (B, D)
        if self.model.classifier is None:
            return (embeddings,)
        return embeddings, self.model.classifier(embeddings)  # (B, D), (B, C)


def _graph_args(inputs: Inputs, batch: Batch) -> tuple[torch.Tensor, ...]:
    return tuple(batch[name] for name in inputs.onnx_inputs)


def _as_batch(inputs: Inputs, items: Any, what: str, minimum: int) -> Batch:
    # the parity sample is also the tracing input: with one item the exporter could fix the batch axis to 1
    if isinstance(items, (dict, torch.Tensor)):
        batch = inputs.as_batch(items)
    else:
        if len(items) < minimum:
            raise ValueError(f'{what} needs at least {minimum} items, got {len(items)}')
        batch = inputs.batch(items, [f'{what} {inputs.kind} {i}' for i in range(len(items))])
    if inputs.rows(batch) < minimum:
        raise ValueError(f'{what} needs at least {minimum} items, got {inputs.rows(batch)}')
    return batch


def _export_graph(
    module: _GraphModule, inputs: Inputs, batch: Batch, path: Path, opset: int | None, dynamo: bool, large: bool
) -> Literal['dynamo', 'legacy']:
    """Trace ``module`` into ``path``. The dynamo exporter's graph runs faster in onnxruntime (efficientnet-lite0:
    182 vs 129 img/s on 2 cores), so the legacy TorchScript exporter is only the fallback."""
    args, names = _graph_args(inputs, batch), list(inputs.onnx_inputs)
    outputs = list(artifact.output_names(module.model))
    axes = inputs.dynamic_axes()
    dynamo_error = None
    if dynamo:
        dims: dict[str, Any] = {}
        # one entry: forward takes its tensors as *args, which torch.export sees as one tuple
        shapes = tuple(
            {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in axes[n].items()} for n in names
        )
        try:
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                input_names=names,
                output_names=outputs,
                dynamic_shapes=(shapes,),
                opset_version=opset,
                external_data=large,
                verbose=False,
            )
            return 'dynamo'
        except OSError as err:  # a full disk or a folder not writable: the legacy exporter would fail the same way
            raise ExportError(
                f'could not write the ONNX graph under {path.parent}: {err}; free space there or '
                f'export to another folder'
            ) from err
        except Exception as err:  # the dynamo exporter fails in many library-specific ways; the reason is logged
            dynamo_error = f'{type(err).__name__}: {err}'
            logger.warning(
                'the dynamo ONNX exporter failed (%s); falling back to the legacy TorchScript exporter, '
                'whose graph runs slower',
                dynamo_error,
            )
    try:
        with warnings.catch_warnings():  # its deprecation notice: chosen knowingly, and the reason is logged above
            warnings.simplefilter('ignore', DeprecationWarning)
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=names,
                output_names=outputs,
                dynamic_axes={**axes, **{o: {0: 'batch'} for o in outputs}},
                opset_version=opset,
                do_constant_folding=True,
            )
    except Exception as err:
        if dynamo_error is None:
            raise
        raise ExportError(
            f'neither ONNX exporter could export the model: the dynamo exporter failed with '
            f'{dynamo_error}, then the legacy exporter with {type(err).__name__}: {err}'
        ) from err
    return 'legacy'


def _to_fp16(proto: onnx.ModelProto, large: bool) -> onnx.ModelProto:
    """float16 inside, float32 inputs and outputs (onnxconverter-common's converter, as onnxruntime ships it)."""
    proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=large)
    # the converter appends the input casts at the end of the node list, which onnx.checker rejects
    OnnxModel.graph_topological_sort(proto.graph)
    return proto


def _save(proto: onnx.ModelProto, path: Path, preprocessing: dict[str, Any], large: bool) -> None:
    """One file when it fits in protobuf, else the graph plus one ``<name>.data`` file; checked after writing."""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {artifact.ONNX_METADATA_KEY: json.dumps(preprocessing)})
    onnx.save(proto, str(path), save_as_external_data=large, all_tensors_to_one_file=True, location=f'{path.name}.data')
    onnx.checker.check_model(str(path))


def _size(path: Path) -> int:
    data = path.with_name(f'{path.name}.data')
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
