"""Encoding throughput: onnxruntime vs torch eager (default layout and channels_last), and ORT's share of GEMM peak.

Run from the repository root: ``.venv/bin/python bench/encode.py --quick`` (3-5 minutes on 2 shared cores) or without
``--quick`` for steadier figures; ``--int8`` adds the int8 ONNX export of the default model.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from executor.tuning.export import export_onnx, sample_photos  # noqa: E402
from executor.tuning.inference import OnnxEncoder, Preprocessor, TorchEncoder, usable_cores  # noqa: E402
from executor.tuning.models import EmbeddingModel, build_model  # noqa: E402

# A timed run: a call, and the work one call does (images, or FLOPs for the GEMM).
Run = tuple[Callable[[], object], float]


@dataclass
class Settings:
    batches: tuple[int, ...]
    repeats: int  # timed rounds; each run's best round is kept (the machine is shared: best = least disturbed)
    seconds: float  # about how long one run lasts within a round (several calls when one is quick)
    gemm_size: int  # n of the n x n fp32 matrices multiplied for the GEMM peak


QUICK = Settings(batches=(1, 8, 32), repeats=5, seconds=0.3, gemm_size=2048)
FULL = Settings(batches=(1, 8, 32), repeats=7, seconds=2.0, gemm_size=4096)


def photo_batch(model: EmbeddingModel, size: int) -> torch.Tensor:
    """``(size, 3, H, W)``: skimage photos through the model's eval transform, repeated."""
    photos = Preprocessor(model.data_config).batch(sample_photos())
    return photos.repeat((size + len(photos) - 1) // len(photos), 1, 1, 1)[:size].contiguous()


def throughputs(runs: dict[str, Run], settings: Settings) -> dict[str, float]:
    """Best work per second of each run over the rounds. The runs take turns within every round, so a change in the
    load of this shared machine hits all of them alike."""
    calls = {}
    for name, (call, _) in runs.items():  # the warm-up call also sizes the timed runs
        start = time.perf_counter()
        call()
        calls[name] = max(1, round(settings.seconds / (time.perf_counter() - start)))
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(settings.repeats):
        for name, (call, work) in runs.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                call()
            rates[name].append(calls[name] * work / (time.perf_counter() - start))
    return {name: max(r) for name, r in rates.items()}


def eager(model: EmbeddingModel, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Plain eager torch in the default memory layout, as a model is after training."""
    model = model.eval()

    @torch.inference_mode()
    def call() -> torch.Tensor:
        return model(x)

    return call


def compare_runtimes(label: str, model: EmbeddingModel, settings: Settings, int8: bool = False) -> OnnxEncoder:
    """Print img/s of torch eager, torch channels_last and onnxruntime per batch size; returns the ORT encoder."""
    with tempfile.TemporaryDirectory() as tmp:
        exported = {'fp32': export_onnx(model, Path(tmp) / 'model.onnx')}
        if int8:
            exported['int8'] = export_onnx(model, Path(tmp) / 'model-int8.onnx', quantize=True)
        onnx = {variant: OnnxEncoder(report.path, device='cpu') for variant, report in exported.items()}
    channels_last = TorchEncoder(model, device='cpu')
    columns = ['torch eager', 'channels_last', 'onnx', *(['onnx int8'] if int8 else []), 'onnx/eager', 'onnx/ch_last']
    print(f'\n{label}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, '
          f'input {tuple(model.data_config["input_size"])}, export {exported["fp32"].seconds:.1f} s')
    print(f'{"batch":>5}' + ''.join(f'{c:>15}' for c in columns) + '   (img/s)')
    for batch in settings.batches:
        x = photo_batch(model, batch)
        runs: dict[str, Run] = {
            'torch eager': (eager(model, x), batch),
            'channels_last': (lambda: channels_last.encode(x, batch_size=batch), batch),
            'onnx': (lambda: onnx['fp32'].encode(x, batch_size=batch), batch),
        }
        if int8:
            runs['onnx int8'] = (lambda: onnx['int8'].encode(x, batch_size=batch), batch)
        rates = throughputs(runs, settings)
        ratios = [rates['onnx'] / rates['torch eager'], rates['onnx'] / rates['channels_last']]
        print(f'{batch:>5}' + ''.join(f'{r:>15.1f}' for r in rates.values()) + ''.join(f'{r:>14.2f}x' for r in ratios))
    if int8:
        report = exported['int8']
        print(f'int8 parity vs torch: min cosine {report.min_cosine:.4f}, max |diff| {report.max_abs_diff:.3g}, '
              f'{report.float_nodes} leading convs in float, {report.size_bytes / 1e6:.1f} MB '
              f'(fp32 {exported["fp32"].size_bytes / 1e6:.1f} MB)')
    return onnx['fp32']


def flops_per_image(model: EmbeddingModel) -> float:
    """Forward FLOPs for one image (a multiply-add counts 2), by torch's FlopCounterMode."""
    x = photo_batch(model, 1)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return float(counter.get_total_flops())


def ort_efficiency(label: str, model: EmbeddingModel, encoder: OnnxEncoder, batch: int, settings: Settings) -> None:
    """Print the GFLOP/s onnxruntime achieves on ``model`` against this machine's fp32 GEMM peak (``torch.matmul`` of
    two large matrices), both timed in the same rounds."""
    n = settings.gemm_size
    a, b = torch.randn(n, n), torch.randn(n, n)
    x = photo_batch(model, batch)
    flops = flops_per_image(model)
    rates = throughputs({
        'gemm': (lambda: torch.matmul(a, b), 2 * n**3),
        'onnx': (lambda: encoder.encode(x, batch_size=batch), flops * batch),
    }, settings)
    peak, achieved = rates['gemm'] / 1e9, rates['onnx'] / 1e9
    print(f'\n{label} in onnxruntime, batch {batch}: {flops / 1e9:.2f} GFLOP/image x {achieved * 1e9 / flops:.1f} '
          f'img/s = {achieved:.1f} GFLOP/s; fp32 GEMM peak (torch.matmul {n}x{n}) {peak:.1f} GFLOP/s -> '
          f'{100 * achieved / peak:.1f}% of peak')


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='fewer and shorter timed runs')
    parser.add_argument('--int8', action='store_true', help='also time the int8 export of the default model')
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    print(f'torch {torch.__version__}: {torch.get_num_threads()} threads; onnxruntime: {usable_cores()} intra-op '
          f'threads; {"quick" if args.quick else "full"} run, best of {settings.repeats} rounds')

    default = build_model()
    encoder = compare_runtimes('efficientnet_lite0 (default, ImageNet weights)', default, settings, args.int8)
    compare_runtimes('resnet50 (random weights)', build_model('resnet50', pretrained=False), settings)
    ort_efficiency('efficientnet_lite0', default, encoder, max(settings.batches), settings)


if __name__ == '__main__':
    main()
