"""`DEMO=text-to-image make demo`: text-to-image search through `flows/search.yml`, offline.

Starts the search flow on 127.0.0.1, trains a two-tower model (efficientnet_lite0 + all-MiniLM-L6-v2, both from
their wheels) with `/train` on scikit-learn's digits captioned from their labels ("a handwritten seven"), indexes
held-out digits with it, searches them with sentences and prints the top matches, then stops the flow.
``DEMO_DATA=/path/to/captions.csv`` (an ``image,caption`` CSV, several captions per image allowed) runs the same on
your own captioned images: 80 % of the images train, the rest are indexed and searched with their own captions.
``DEMO_WORKSPACE`` moves the workspace.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path

from executor.demo import REPO, FinetunerClient, Flow, console, follow, free_port, marked  # the image demo's set-up
from executor.docs import FinetunerDoc
from executor.tuning.data import load_items
from executor.tuning.data.digits import digits_items

WORDS = 'zero one two three four five six seven eight nine'.split()
# Small enough for 2 CPU cores in a few minutes: 32 px digits, the text tower locked, 3 epochs.
TRAINING = dict(
    model='efficientnet_lite0',
    text_model='all-MiniLM-L6-v2',
    text_freeze=True,
    image_size=32,
    batch_size=32,
    epochs=3,
    limit=10,
    to_onnx=True,
)


def write_captions(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('w', newline='', encoding='utf-8') as fh:
        writer = csv.writer(fh)
        writer.writerow(['image', 'caption'])
        writer.writerows(rows)
    return path


def write_data(data_root: Path) -> tuple[str, list[FinetunerDoc], list[tuple[str, str]]]:
    """train.csv under the data root, the images to index (as documents) and the (sentence, relevant label) queries."""
    from PIL import Image

    target = data_root / 'demo-t2i'
    shutil.rmtree(target, ignore_errors=True)
    (target / 'images').mkdir(parents=True)
    source = os.environ.get('DEMO_DATA')
    if not source:
        rows, index = [], []
        for k, item in enumerate(digits_items(per_class=50, size=32)):
            name = f'images/{k:04d}.png'
            Image.fromarray(item.tensor).save(target / name)
            if k % 5 < 3:  # 300 to train
                rows.append((name, f'a handwritten {WORDS[int(item.label)]}'))
            else:  # 200 to index
                index.append(FinetunerDoc(id=name, uri=str(target / name), label=item.label))
        write_captions(target / 'train.csv', rows)
        queries = [(f'a handwritten {WORDS[d]}', str(d)) for d in (7, 0, 3, 4, 8, 2)]
        return "scikit-learn's digits, captioned from their labels: 300 to train, 200 to index", index, queries
    items = [it for it in load_items(source) if it.uri is not None and it.text is not None]
    by_image: dict[str, list[str]] = {}
    for item in items:
        by_image.setdefault(item.uri, []).append(item.text)
    if len(by_image) < 10:
        raise SystemExit(f'DEMO_DATA={source!r} needs an image,caption CSV of at least 10 captioned images')
    images = sorted(by_image)
    random.Random(0).shuffle(images)
    cut = int(0.8 * len(images))
    names = {uri: f'images/{k:06d}{Path(uri).suffix}' for k, uri in enumerate(images)}
    for uri, name in names.items():  # copied: the service reads only under its data roots
        shutil.copyfile(uri, target / name)
    write_captions(target / 'train.csv', [(names[u], c) for u in images[:cut] for c in by_image[u]])
    index = [FinetunerDoc(id=names[u], uri=str(target / names[u]), label=names[u]) for u in images[cut:]]
    queries = [(by_image[u][0], names[u]) for u in images[cut:][:6]]
    return f'{source}: {cut} images to train, {len(images) - cut} to index', index, queries


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    started = time.perf_counter()
    workspace = Path(os.environ.get('DEMO_WORKSPACE', 'workspace/demo-text-to-image')).resolve()
    grpc_port, http_port = free_port(), free_port()
    console.rule('[bold]FinetunerExecutor demo: text-to-image search')
    overrides = {'host': '127.0.0.1', 'port': [grpc_port, http_port], 'protocol': ['grpc', 'http']}
    with Flow.load_config(
        str(REPO / 'flows' / 'search.yml'), uses_with={**overrides, 'workspace': str(workspace)}, quiet=True
    ):
        console.print(f'flows/search.yml is up: gRPC 127.0.0.1:{grpc_port}, HTTP 127.0.0.1:{http_port}')
        data_root = workspace / 'FinetunerExecutor' / '0' / 'data'  # the encoder's own data root in this flow
        described, index, queries = write_data(data_root)
        console.print(f'data: {described}')
        client = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}')

        console.rule('/train: a two-tower model, efficientnet_lite0 + all-MiniLM-L6-v2, CLIPLoss')
        run = client.fit(train_data='demo-t2i/train.csv', **TRAINING)
        follow(run)
        info = run.info()
        if info.status != 'FINISHED':
            console.print(f'[red]run {run.name} is {info.status}: {info.error}[/]')
            return 1

        console.rule('/index the images, /search them with sentences')
        client.post('/index', index, {'run_id': run.name})
        console.print(f'indexed {len(index)} images with the image tower (ONNX)')
        docs = [FinetunerDoc(id=f'q{i}', text=sentence) for i, (sentence, _) in enumerate(queries)]
        for (sentence, relevant), query in zip(queries, client.post('/search', docs, {'run_id': run.name, 'limit': 5})):
            marks = marked(query.matches, relevant)
            console.print(f'{sentence!r} -> top-5: {marks}')
        console.print(
            f'run {run.name}: {Path(info.artifact).parent} (clip-vision/ and clip-text/ hold the ONNX towers)'
        )
    console.print(f'flow stopped; done in {time.perf_counter() - started:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
