"""Encoding throughput: onnxruntime vs torch eager (default layout and channels_last), ORT's share of GEMM peak, and
the service: the default registry model served with no run on runtime 'onnx' vs 'torch', 16 concurrent single-image
clients vs one sequential client (Deployment, gRPC and HTTP), and a Flow (gRPC, batch 32) vs onnxruntime in this
process.

Run from the repository root: ``.venv/bin/python bench/encode.py --quick`` (5-8 minutes on 2 shared cores) or without
``--quick`` for steadier figures; ``--int8`` adds the int8 ONNX export of the default model; ``--no-serving`` skips
the service measurements. ``--text`` adds the text rows: all-MiniLM-L6-v2 on onnxruntime vs torch over SICK test
sentences at their real lengths, batch 1 and 32, and both against the GEMM peak (target onnx >= 1.5x torch at batch
32; with ``--int8`` its int8 export too); ``--text-only`` runs those alone (3-4 minutes); ``--two-tower-only``:
each tower of a two-tower model (flickr8k-dev photos and captions), onnxruntime vs torch at batch 1 and 32:

    .venv/bin/python bench/encode.py --text-only [--quick] [--int8]
    .venv/bin/python bench/encode.py --two-tower-only [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault('JINA_OPTOUT_TELEMETRY', '1')
# spawn, not fork: the Deployment starts after torch and onnxruntime have started their threads in this process,
# and a forked executor would hang in their thread pools. jina sets the start method when it is imported, so first.
os.environ.setdefault('JINA_MP_START_METHOD', 'spawn')
import numpy as np
import torch
from docarray import DocList
from jina import Client, Deployment, Flow
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from executor.docs import FinetunerDoc
from executor.tuning.devices import usable_cores
from executor.tuning.export import export_onnx
from executor.tuning.inference import OnnxEncoder, TorchEncoder, create_encoder
from executor.tuning.inputs import sample_photos
from executor.tuning.models import EmbeddingModel, build_model

# A timed run: a call, and the work one call does (images, or FLOPs for the GEMM).
Run = tuple[Callable[[], object], float]


@dataclass
class Settings:
    batches: tuple[int, ...]
    repeats: int  # timed rounds; each run's best round is kept (the machine is shared: best = least disturbed)
    seconds: float  # about how long one run lasts within a round (several calls when one is quick)
    gemm_size: int  # n of the n x n fp32 matrices multiplied for the GEMM peak
    serve_seconds: float  # how long each client set sends requests to the service


QUICK = Settings(batches=(1, 8, 32), repeats=5, seconds=0.3, gemm_size=2048, serve_seconds=10)
FULL = Settings(batches=(1, 8, 32), repeats=7, seconds=2.0, gemm_size=4096, serve_seconds=30)
CONFIG = Path(__file__).resolve().parents[1] / 'config.yml'
CLIENTS = 16
TEXT_BATCHES = (1, 32)
TEXT_SAMPLE = 256  # SICK test sentences encoded per timed call (a seeded sample: real lengths, 1-30 odd words)
FLOW_BATCH = 32
FLOW_STREAM = 4  # requests of FLOW_BATCH in one streamed post


def photo_batch(model: EmbeddingModel, size: int) -> torch.Tensor:
    """``(size, 3, H, W)``: skimage photos through the model's eval transform, repeated."""
    photos = model.inputs.batch(sample_photos())['images']
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
    print(
        f'\n{label}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, '
        f'input {tuple(model.inputs.data_config["input_size"])}, export {exported["fp32"].seconds:.1f} s'
    )
    print(f'{"batch":>5}' + ''.join(f'{c:>15}' for c in columns) + '   (img/s)')
    for batch in settings.batches:
        x = photo_batch(model, batch)
        runs: dict[str, Run] = {
            'torch eager': (eager(model, x), batch),
            'channels_last': (lambda x=x, batch=batch: channels_last.encode(x, batch_size=batch), batch),
            'onnx': (lambda x=x, batch=batch: onnx['fp32'].encode(x, batch_size=batch), batch),
        }
        if int8:
            runs['onnx int8'] = (lambda x=x, batch=batch: onnx['int8'].encode(x, batch_size=batch), batch)
        rates = throughputs(runs, settings)
        ratios = [rates['onnx'] / rates['torch eager'], rates['onnx'] / rates['channels_last']]
        print(f'{batch:>5}' + ''.join(f'{r:>15.1f}' for r in rates.values()) + ''.join(f'{r:>14.2f}x' for r in ratios))
    if int8:
        report = exported['int8']
        print(
            f'int8 parity vs torch: min cosine {report.min_cosine:.4f}, max |diff| {report.max_abs_diff:.3g}, '
            f'{report.float_nodes} leading convs in float, {report.size_bytes / 1e6:.1f} MB '
            f'(fp32 {exported["fp32"].size_bytes / 1e6:.1f} MB)'
        )
    return onnx['fp32']


def text_runtimes(settings: Settings, int8: bool = False) -> None:
    """Sentences/s of the text default (all-MiniLM-L6-v2) on onnxruntime (its fp32 export) vs torch (``TorchEncoder``,
    as the service's runtime='torch' serves it), both through ``Encoder.encode`` (tokenised, longest first, padded
    per batch). Batch 32: one call encodes ``TEXT_SAMPLE`` SICK test sentences at batch_size=32; batch 1: one call
    per sentence (``encode([s], 1)``, as single-sentence requests arrive), over the same sentences. ``int8`` adds the
    int8 export, calibrated on SICK *train* sentences."""
    import random

    from bench.text_sick import TEXT_MODEL, sick_sentences

    sentences = random.Random(0).sample(sick_sentences('test'), TEXT_SAMPLE)
    model = build_model(TEXT_MODEL)
    encoders: dict[str, OnnxEncoder | TorchEncoder] = {'torch': TorchEncoder(model, device='cpu')}
    with tempfile.TemporaryDirectory() as tmp:
        report = export_onnx(model, Path(tmp) / 'model.onnx')
        encoders['onnx'] = create_encoder(report.path, device='cpu')
        if int8:
            calibration = random.Random(1).sample(sick_sentences('train'), 64)
            quantized = export_onnx(model, Path(tmp) / 'int8' / 'model.onnx', quantize=True, calibration=calibration)
            encoders['onnx int8'] = create_encoder(quantized.path, device='cpu')
    tokens = [len(model.inputs.load(s, 'sentence')) for s in sentences]
    print(
        f'\n{TEXT_MODEL} (text default): {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, '
        f'export {report.seconds:.1f} s (min cosine vs torch {report.min_cosine:.6f}); {TEXT_SAMPLE} SICK test '
        f'sentences, {min(tokens)}-{max(tokens)} tokens (mean {np.mean(tokens):.1f})'
    )
    ratios = [f'{name}/torch' for name in encoders if name != 'torch']
    print(
        f'{"batch":>5}'
        + ''.join(f'{c:>15}' for c in encoders)
        + ''.join(f'{c:>18}' for c in ratios)
        + '   (sentences/s)'
    )

    def call(encoder: OnnxEncoder | TorchEncoder, batch: int) -> Callable[[], object]:
        if batch == 1:
            return lambda: [encoder.encode([s], batch_size=1) for s in sentences]
        return lambda: encoder.encode(sentences, batch_size=batch)

    for batch in TEXT_BATCHES:
        rates = throughputs({name: (call(e, batch), len(sentences)) for name, e in encoders.items()}, settings)
        cells = [f'{r:>15.1f}' for r in rates.values()] + [
            f'{rates[name] / rates["torch"]:>17.2f}x' for name in encoders if name != 'torch'
        ]
        print(f'{batch:>5}' + ''.join(cells))
    reference = encoders['torch'].encode(sentences, 32)
    for name in [n for n in encoders if n != 'torch']:
        got = encoders[name].encode(sentences, 32)
        cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        print(f'{name} vs torch on these sentences: min cosine {cosine.min():.6f}')
    print('target: onnx >= 1.5x torch at batch 32')
    text_efficiency(encoders, sentences, max(TEXT_BATCHES), settings)


def text_efficiency(encoders: dict, sentences: list[str], batch: int, settings: Settings) -> None:
    """GFLOP/s of both runtimes at ``batch`` against this machine's fp32 GEMM peak, timed in the same rounds: how much
    room a faster runtime has left. The FLOPs are counted by torch's FlopCounterMode over the very batches ``encode``
    runs (sorted by length, padded per batch)."""
    n = settings.gemm_size
    a, b = torch.randn(n, n), torch.randn(n, n)
    with FlopCounterMode(display=False) as counter:
        encoders['torch'].encode(sentences, batch_size=batch)
    flops = float(counter.get_total_flops())
    runs: dict[str, Run] = {'gemm': (lambda: torch.matmul(a, b), 2 * n**3)}
    for name in ('torch', 'onnx'):  # fp32 only: int8 work is not fp32 GEMM work
        runs[name] = (lambda encoder=encoders[name]: encoder.encode(sentences, batch_size=batch), flops)
    rates = {name: rate / 1e9 for name, rate in throughputs(runs, settings).items()}
    print(
        f'batch {batch}: {flops / len(sentences) / 1e9:.3f} GFLOP/sentence; torch {rates["torch"]:.1f}, onnx '
        f'{rates["onnx"]:.1f} GFLOP/s; fp32 GEMM peak (torch.matmul {n}x{n}) {rates["gemm"]:.1f} GFLOP/s -> torch '
        f'{100 * rates["torch"] / rates["gemm"]:.0f}%, onnx {100 * rates["onnx"] / rates["gemm"]:.0f}% of peak '
        f'(so no fp32 runtime can pass {rates["gemm"] / rates["torch"]:.2f}x torch here)'
    )


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
    rates = throughputs(
        {
            'gemm': (lambda: torch.matmul(a, b), 2 * n**3),
            'onnx': (lambda: encoder.encode(x, batch_size=batch), flops * batch),
        },
        settings,
    )
    peak, achieved = rates['gemm'] / 1e9, rates['onnx'] / 1e9
    print(
        f'\n{label} in onnxruntime, batch {batch}: {flops / 1e9:.2f} GFLOP/image x {achieved * 1e9 / flops:.1f} '
        f'img/s = {achieved:.1f} GFLOP/s; fp32 GEMM peak (torch.matmul {n}x{n}) {peak:.1f} GFLOP/s -> '
        f'{100 * achieved / peak:.1f}% of peak'
    )


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


async def encode_requests(client_kind: str, port: int, photo: bytes, clients: int, seconds: float) -> float:
    """Requests per second (one image each) when ``clients`` clients each send single-image ``/encode`` requests one
    after another for ``seconds``, all concurrently in one event loop (not threads: 16 client threads would spend the
    GIL that the service's processes need). Every reply is checked for an embedding.

    ``client_kind``: ``jina`` is jina's asyncio ``Client`` with the JPEG as ``blob`` (it opens a new gRPC channel for
    every ``post``); ``grpc`` sends the same jina ``DataRequest`` over one gRPC channel kept open per client, as jina's
    own gateway talks to executors and as a long-lived application client would; ``http`` is plain JSON over one
    aiohttp session with the JPEG as a ``data:`` URI (JSON has no bytes). The clients share this machine's 2 cores
    with the service, so a client's own CPU cost lowers what the service can do."""
    import aiohttp
    import grpc
    from jina.proto import jina_pb2_grpc
    from jina.types.request.data import DataRequest

    docs = DocList[FinetunerDoc]([FinetunerDoc(blob=photo)])
    body = {'data': [{'uri': 'data:image/jpeg;base64,' + base64.b64encode(photo).decode()}], 'parameters': {}}
    stop = time.monotonic() + seconds

    async def jina_client() -> int:
        client, done = Client(host=f'grpc://127.0.0.1:{port}', asyncio=True), 0
        while time.monotonic() < stop:
            async for reply in client.post('/encode', docs, return_type=DocList[FinetunerDoc]):
                assert reply[0].embedding is not None
                done += 1
        return done

    async def grpc_client() -> int:
        done = 0
        async with grpc.aio.insecure_channel(f'127.0.0.1:{port}') as channel:
            call = jina_pb2_grpc.JinaSingleDataRequestRPCStub(channel).process_single_data
            while time.monotonic() < stop:
                request = DataRequest()
                request.header.exec_endpoint = '/encode'
                request.data.docs = docs
                reply = await call(request)
                reply.document_array_cls = DocList[FinetunerDoc]
                assert reply.status.code == 0 and reply.docs[0].embedding is not None, reply.status
                done += 1
        return done

    async def http_client() -> int:
        done = 0
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < stop:
                async with session.post(f'http://127.0.0.1:{port}/encode', json=body) as reply:
                    reply.raise_for_status()
                    assert (await reply.json())['data'][0]['embedding']
                done += 1
        return done

    one = {'jina': jina_client, 'grpc': grpc_client, 'http': http_client}[client_kind]
    started = time.monotonic()
    done = await asyncio.gather(*(one() for _ in range(clients)))
    return sum(done) / (time.monotonic() - started)


def concurrent_clients(artifact: Path, photo: bytes, settings: Settings) -> None:
    """16 concurrent single-image clients vs one sequential client, through a real Deployment of ``config.yml``
    serving the ONNX export: the service merges concurrent requests into batches (dynamic batching). No gateway in
    front, as ``jina executor --uses config.yml`` serves it; the Flow measurement below has one.

    Also printed: the ceiling no service can pass on this machine, onnxruntime alone on an already decoded batch of
    16 in this process, and what it allows for the ratio (ceiling / 1 client): batching can only raise throughput
    towards the model's own rate at batch 16."""
    encoder = OnnxEncoder(artifact / 'model.onnx', device='cpu')
    x = encoder.inputs.batch([Image.open(io.BytesIO(photo))] * CLIENTS)['images']
    ceiling = throughputs({'onnx': (lambda: encoder.encode(x, batch_size=CLIENTS), CLIENTS)}, settings)['onnx']
    encoder = None  # its session's threads would compete with the service's
    print(
        f'\n/encode of one {Image.open(io.BytesIO(photo)).size} JPEG per request through a Deployment (onnx), '
        f'{settings.serve_seconds:.0f} s per client set'
    )
    print(
        f'{"protocol":>8}{"client":>28}{"1 client":>10}{f"{CLIENTS} clients":>12}{"ratio":>8}'
        '   (img/s; target >= 2x, goal 3x)'
    )
    for protocol, kinds in (
        ('grpc', {'jina': 'jina Client (channel/post)', 'grpc': 'one channel per client'}),
        ('http', {'http': 'aiohttp, one session'}),
    ):
        port = free_port()
        with (
            tempfile.TemporaryDirectory(prefix='encode-bench-') as workspace,
            Deployment(
                uses=str(CONFIG),
                protocol=protocol,
                host='127.0.0.1',
                port=port,
                workspace=workspace,
                uses_with={'artifact': str(artifact), 'device': 'cpu'},
                include_gateway=False,
                quiet=True,
            ),
        ):
            asyncio.run(encode_requests(next(iter(kinds)), port, photo, 1, 2.0))  # the first calls load the model
            for kind, label in kinds.items():
                sequential = asyncio.run(encode_requests(kind, port, photo, 1, settings.serve_seconds))
                many = asyncio.run(encode_requests(kind, port, photo, CLIENTS, settings.serve_seconds))
                print(
                    f'{protocol:>8}{label:>28}{sequential:>10.1f}{many:>12.1f}{many / sequential:>7.2f}x'
                    f'   (ceiling {ceiling:.1f} img/s allows {ceiling / sequential:.2f}x)'
                )


def flow_vs_in_process(artifact: Path, photo: bytes, settings: Settings) -> None:
    """JPEGs in batches of 32 through a Flow (gRPC gateway -> FinetunerExecutor) vs the same ONNX file and the same
    decoding in this process: what the service costs on top of the model. Two ways: one request of 32 at a time
    (the client waits for each reply: per-request latency), and a stream of 4 requests of 32 in one ``post``
    (``request_size=32``; jina's client keeps several in flight, as it does when a user encodes a collection) against
    in-process ``encode`` of the same 128 images at batch 32 (which overlaps decoding with the model)."""
    photos = [photo] * FLOW_BATCH
    stream = photos * FLOW_STREAM
    encoder = OnnxEncoder(artifact / 'model.onnx', device='cpu')
    port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix='encode-bench-') as workspace,
        Flow(protocol='grpc', host='127.0.0.1', port=port, workspace=workspace, quiet=True).add(
            uses=str(CONFIG), uses_with={'artifact': str(artifact), 'device': 'cpu'}, quiet=True
        ),
    ):
        client = Client(host=f'grpc://127.0.0.1:{port}')
        docs = DocList[FinetunerDoc]([FinetunerDoc(blob=p) for p in photos])
        many = DocList[FinetunerDoc]([FinetunerDoc(blob=p) for p in stream])

        def flow(inputs: DocList[FinetunerDoc], drop: bool = True) -> None:
            out = client.post(
                '/encode',
                inputs,
                request_size=FLOW_BATCH,
                return_type=DocList[FinetunerDoc],
                parameters={'batch_size': FLOW_BATCH, 'drop_image_content': drop},
            )
            assert len(out) == len(inputs) and all(d.embedding is not None and (d.blob is None) == drop for d in out)

        rates = throughputs(
            {
                'flow': (lambda: flow(docs), FLOW_BATCH),
                'flow, JPEGs sent back': (lambda: flow(docs, drop=False), FLOW_BATCH),
                'in-process': (lambda: encoder.encode(photos, batch_size=FLOW_BATCH), FLOW_BATCH),
                'flow stream': (lambda: flow(many), len(stream)),
                'in-process stream': (lambda: encoder.encode(stream, batch_size=FLOW_BATCH), len(stream)),
            },
            dataclasses.replace(settings, seconds=max(2.0, settings.seconds)),
        )
    print(
        f'\nbatches of {FLOW_BATCH} JPEGs, Flow (gRPC) vs onnxruntime in this process (target >= 0.9); the reply '
        'carries ids and embeddings (drop_image_content=True, as FinetunerClient.encode asks):'
    )
    print(
        f'  one request at a time: {rates["flow"]:.1f} vs {rates["in-process"]:.1f} img/s -> '
        f'{rates["flow"] / rates["in-process"]:.2f} (the JPEGs sent back too: '
        f'{rates["flow, JPEGs sent back"] / rates["in-process"]:.2f})'
    )
    print(
        f'  {FLOW_STREAM} requests per post: {rates["flow stream"]:.1f} vs {rates["in-process stream"]:.1f} img/s -> '
        f'{rates["flow stream"] / rates["in-process stream"]:.2f}'
    )


def registry_model_runtimes(photo: bytes, settings: Settings) -> None:
    """The default registry model served with no run and no artifact, through a real gRPC Deployment of config.yml:
    ``/encode`` of 32 JPEGs with ``runtime='onnx'`` (exported on first use into the model cache) vs ``'torch'``, and
    vs onnxruntime on the same cached file and the same JPEGs in this process."""
    photos = [photo] * FLOW_BATCH
    docs = DocList[FinetunerDoc]([FinetunerDoc(blob=p) for p in photos])
    port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix='encode-bench-') as workspace,
        Deployment(
            uses=str(CONFIG),
            protocol='grpc',
            host='127.0.0.1',
            port=port,
            workspace=workspace,
            uses_with={'device': 'cpu', 'model_cache': f'{workspace}/models'},
            include_gateway=False,
            quiet=True,
        ),
    ):
        client = Client(host=f'grpc://127.0.0.1:{port}')

        def served(runtime: str) -> None:
            out = client.post(
                '/encode',
                docs,
                return_type=DocList[FinetunerDoc],
                parameters={'runtime': runtime, 'batch_size': FLOW_BATCH, 'drop_image_content': True},
            )
            assert len(out) == FLOW_BATCH and all(d.embedding is not None for d in out)

        started = time.perf_counter()
        served('onnx')  # the first call exports the model (parity-checked) into the cache
        first = time.perf_counter() - started
        (cached,) = Path(workspace, 'models').glob('efficientnet_lite0-*/model.onnx')
        encoder = OnnxEncoder(cached, device='cpu')
        rates = throughputs(
            {
                'onnx': (lambda: served('onnx'), FLOW_BATCH),
                'torch': (lambda: served('torch'), FLOW_BATCH),
                'in-process': (lambda: encoder.encode(photos, batch_size=FLOW_BATCH), FLOW_BATCH),
            },
            dataclasses.replace(settings, seconds=max(2.0, settings.seconds)),
        )
    print(
        f'\nthe default registry model, no run (Deployment, gRPC, {FLOW_BATCH} JPEGs per request; the first onnx '
        f'request exported it in {first:.1f} s, cached as {cached.parent.name}):'
    )
    print(
        f"  runtime='onnx' {rates['onnx']:.1f} vs runtime='torch' {rates['torch']:.1f} img/s -> "
        f'{rates["onnx"] / rates["torch"]:.2f}x (target >= 2x); vs onnxruntime in this process '
        f'{rates["in-process"]:.1f} img/s -> {rates["onnx"] / rates["in-process"]:.2f} (goal >= 0.9)'
    )


def two_tower_runtimes(settings: Settings) -> None:
    """Items/s of each tower of a two-tower model (efficientnet_lite0 + all-MiniLM-L6-v2, 256-d projections) on
    onnxruntime (the run's per-tower exports) vs torch, through ``TwoTowerEncoder.tower(...).encode``: flickr8k-dev
    photos and captions (``../shared/data/flickr8k-dev``), batch 1 and 32."""
    import csv
    import random

    from PIL import Image as PILImage

    from executor.tuning.export import export_towers
    from executor.tuning.models import build_two_tower

    flickr = Path(__file__).resolve().parents[2] / 'shared/data/flickr8k-dev'
    with (flickr / 'captions.csv').open(encoding='utf-8', newline='') as fh:
        rows = random.Random(0).sample(list(csv.DictReader(fh)), 64)
    contents = {
        'clip-vision': [PILImage.open(flickr / 'images' / r['image']).convert('RGB') for r in rows],
        'clip-text': [r['caption'] for r in rows],
    }
    model = build_two_tower().eval()
    with tempfile.TemporaryDirectory(prefix='encode-two-tower-') as tmp:
        exported = export_towers(model, tmp)
        onnx = {name: OnnxEncoder(report.path, device='cpu') for name, report in exported.items()}
    torch_towers = {name: TorchEncoder(model.tower(name), device='cpu') for name in onnx}
    print(
        '\ntwo-tower model (efficientnet_lite0 + all-MiniLM-L6-v2, 256-d): each tower, 64 flickr8k-dev items per call'
    )
    print(f'{"tower":>12}{"batch":>7}{"torch":>10}{"onnx":>10}{"onnx/torch":>12}   (items/s)')
    for name in onnx:
        items = contents[name]
        for batch in TEXT_BATCHES:

            def call(encoder, batch=batch, items=items):
                if batch == 1:
                    return lambda: [encoder.encode([c], batch_size=1) for c in items]
                return lambda: encoder.encode(items, batch_size=batch)

            rates = throughputs(
                {'torch': (call(torch_towers[name]), len(items)), 'onnx': (call(onnx[name]), len(items))}, settings
            )
            ratio = rates['onnx'] / rates['torch']
            print(f'{name:>12}{batch:>7}{rates["torch"]:>10.1f}{rates["onnx"]:>10.1f}{ratio:>11.2f}x')


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='fewer and shorter timed runs')
    parser.add_argument('--int8', action='store_true', help='also time the int8 export of the default model')
    parser.add_argument('--no-serving', action='store_true', help='skip the Deployment and Flow measurements')
    parser.add_argument('--registry-only', action='store_true', help='only the registry model served onnx vs torch')
    parser.add_argument('--text', action='store_true', help='also the text model, onnxruntime vs torch')
    parser.add_argument('--text-only', action='store_true', help='only the text model, onnxruntime vs torch')
    parser.add_argument('--two-tower-only', action='store_true', help="only a two-tower model's towers, onnx vs torch")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    print(
        f'torch {torch.__version__}: {torch.get_num_threads()} threads; onnxruntime: {usable_cores()} intra-op '
        f'threads; {"quick" if args.quick else "full"} run, best of {settings.repeats} rounds'
    )

    if args.registry_only:
        registry_model_runtimes(jpeg(sample_photos()[0]), settings)
        return
    if args.text_only:
        text_runtimes(settings, args.int8)
        return
    if args.two_tower_only:
        two_tower_runtimes(settings)
        return
    default = build_model()
    encoder = compare_runtimes('efficientnet_lite0 (default, ImageNet weights)', default, settings, args.int8)
    compare_runtimes('resnet50 (random weights)', build_model('resnet50', pretrained=False), settings)
    ort_efficiency('efficientnet_lite0', default, encoder, max(settings.batches), settings)
    if args.text:
        text_runtimes(settings, args.int8)
    if not args.no_serving:
        photo = jpeg(sample_photos()[0])
        registry_model_runtimes(photo, settings)
        with tempfile.TemporaryDirectory(prefix='encode-artifact-') as tmp:
            export_onnx(default, Path(tmp) / 'model.onnx')
            concurrent_clients(Path(tmp), photo, settings)
            flow_vs_in_process(Path(tmp), photo, settings)


if __name__ == '__main__':
    main()
