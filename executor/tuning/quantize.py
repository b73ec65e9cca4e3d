"""int8 quantization of an exported ONNX graph, keeping in float the fewest nodes that hold the parity, and the
parity check itself (each row's cosine against torch, and the largest difference)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from executor.tuning.errors import ExportError
from executor.tuning.inputs import Batch, Inputs

logger = logging.getLogger(__name__)

# int8: how many leading Conv/MatMul/Gemm nodes to keep in float, tried in order until parity holds. The first layers
# are the most sensitive: efficientnet-lite0 fully quantized reaches cosine 0.982, with the stem conv and the first
# depthwise conv kept in float 0.995 (and still 1.5-2x the fp32 throughput on CPU).
INT8_FLOAT_NODES = (0, 2, 4, 8, 16)
QUANTIZABLE = ('Conv', 'MatMul', 'Gemm')
ACTIVATIONS = ('Gelu', 'FastGelu', 'BiasGelu', 'Relu', 'Tanh')  # whose outputs feed a transformer's sensitive matmuls
CALIBRATION_BATCH = 8


class _BatchReader(CalibrationDataReader):
    def __init__(self, inputs: Inputs, batch: Batch) -> None:
        self.batches = iter([_feeds(part) for part in inputs.split(batch, CALIBRATION_BATCH)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def quantize_int8(
    fp32: Path,
    tmp: Path,
    inputs: Inputs,
    batch: Batch,
    reference: list[np.ndarray],
    calibration: Batch,
    min_cosine: float,
    large: bool,
) -> tuple[onnx.ModelProto, int]:
    """int8 keeping the fewest Conv/MatMul/Gemm nodes in float that reach ``min_cosine``: (graph, nodes in float).

    Conv nets (``inputs.int8_static``): static QDQ, uint8 activations and per-channel int8 weights, with the leading
    layers (the most sensitive) kept in float in turn. Weights use 7 bits (``reduce_range``): the file may be served
    on a CPU without VNNI, whose AVX2 u8 x s8 kernels saturate with 8-bit weights (measured on an AVX2-only EPYC: min
    cosine 0.82 with every conv quantized and 0.95 with 16 in float; with 7 bits 0.968, and 0.992 with the first 8 in
    float). Dynamic quantization is no option for them: onnxruntime's ConvInteger takes one scale per weight tensor,
    and efficientnet-lite0's depthwise convs (batch norm folded in) then fall to cosine 0.82-0.85.

    Transformers: dynamic (weights quantized ahead, activations per batch at run time), only the matmuls by a weight
    (attention's own matmuls stay float). The matmuls fed by an activation (the feed-forward down-projections, whose
    inputs carry GELU's outliers) are the sensitive ones, the first layers' most, so the leading ones of those are
    kept in float first (all-MiniLM-L6-v2 on SICK trial sentences: min cosine 0.9856 with every weight matmul
    quantized, 0.9900 with the first layer's down-projection in float, 0.9931 with all 6).
    """
    prepared = tmp / 'prepared.onnx'
    # shape inference, BN folding; onnxruntime's symbolic shape inference gives up on a transformer's
    # Min(512, sequence), and leaves its temporary files in the working folder when it does: not tried on those
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=not inputs.int8_static, save_as_external_data=large)
    graph = onnx.load(str(prepared), load_external_data=False).graph
    nodes = [n.name for n in graph.node if n.op_type in QUANTIZABLE]
    if not nodes:
        raise ExportError(f'the graph has no {"/".join(QUANTIZABLE)} node to quantize; use the fp32 or fp16 export')
    tried = []
    for in_float in _float_node_sets(graph, nodes, inputs.int8_static):
        out = tmp / f'int8-{len(tried)}.onnx'
        if not inputs.int8_static:  # a transformer: weights quantized ahead, activations at run time
            quantize_dynamic(
                str(prepared),
                str(out),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=list(QUANTIZABLE),
                nodes_to_exclude=in_float,
                use_external_data_format=large,
                extra_options={'MatMulConstBOnly': True},
            )
        else:
            quantize_static(
                str(prepared),
                str(out),
                _BatchReader(inputs, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=in_float,
                reduce_range=True,  # 7-bit weights: u8 x s8 sums saturate on CPUs without VNNI (AVX2 only)
                use_external_data_format=large,
                calibration_providers=['CPUExecutionProvider'],
            )
        _, cosine = parity(reference, run_onnx(out, batch))
        tried.append(f'{len(in_float)}: {cosine:.4f}')
        logger.info(
            'int8 with %d of %d Conv/MatMul/Gemm nodes in float: min cosine %.5f', len(in_float), len(nodes), cosine
        )
        if cosine >= min_cosine:
            return onnx.load(str(out)), len(in_float)
    raise ExportError(
        f'int8 quantization does not reach cosine {min_cosine} against torch (nodes in float -> min cosine: '
        f"{', '.join(tried)}); the file was not written. Pass calibration items from the model's domain, lower "
        f'min_cosine, or use the fp32 or fp16 export'
    )


def _float_node_sets(graph: onnx.GraphProto, nodes: list[str], static: bool) -> list[list[str]]:
    """The sets of quantizable nodes to keep in float, tried in turn: leading ones; for a transformer, first the
    leading ones of those fed by an activation function (see ``_quantize_int8``), then all those and leading ones."""
    leading = [nodes[:k] for k in INT8_FLOAT_NODES if k < len(nodes)]
    if static:
        return leading
    made_by = {output: node.op_type for node in graph.node for output in node.output}
    fed = [n.name for n in graph.node if n.name in nodes and made_by.get(n.input[0]) in ACTIVATIONS]
    sets = [fed[:k] for k in INT8_FLOAT_NODES if k < len(fed)] + [fed + [n for n in f if n not in fed] for f in leading]
    return [s for i, s in enumerate(sets) if s not in sets[:i]]


def _feeds(batch: Batch) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in batch.items()}


def run_onnx(path: Path, batch: Batch) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return session.run(None, _feeds(batch))


def parity(reference: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """Max absolute difference and lowest row cosine, over every output."""
    max_abs, min_cos = 0.0, 1.0
    for ref, out in zip(reference, got, strict=True):
        out = out.astype(np.float64)
        ref = ref.astype(np.float64)
        max_abs = max(max_abs, float(np.abs(out - ref).max()))
        norms = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
        min_cos = min(min_cos, float(((out * ref).sum(axis=1) / np.maximum(norms, 1e-12)).min()))
    return max_abs, min_cos
