"""What several test modules share: plain-JSON requests to a server's HTTP port, CSV files, captioned digits."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import requests
from PIL import Image
from sklearn.datasets import load_digits

from executor.client import ServiceError

WORDS = 'zero one two three four five six seven eight nine'.split()


def http(port: int, endpoint: str, data: list[dict] | None = None, parameters: dict | None = None) -> list[dict]:
    """One request as plain JSON (no client library, no ids); the service's error as ``ServiceError``."""
    body = {'data': data or [], 'parameters': parameters or {}}
    reply = requests.post(f'http://127.0.0.1:{port}{endpoint}', json=body, timeout=600)
    if reply.status_code != 200:
        raise ServiceError(f'{reply.status_code}: {reply.json()["detail"]}')
    return reply.json()['data']


def write_csv(path: Path, header: list[str], rows: list) -> Path:
    with open(path, 'w', newline='', encoding='utf-8') as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def captioned_digits(root: Path) -> dict[str, Path]:
    """scikit-learn's digits as PNG files captioned from their labels ('a handwritten seven'): ``train`` (an
    image,caption CSV of digits 0-59), ``query`` (a text,label CSV, one caption per digit) and ``index`` (a uri,label
    CSV of digits 60-99)."""
    root.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    names = []
    for i in range(100):
        image = (digits.images[i] / 16 * 255).astype(np.uint8)
        Image.fromarray(image).resize((32, 32)).convert('RGB').save(root / f'digit-{i}.png')
        names.append(f'digit-{i}.png')
    captions = [f'a handwritten {WORDS[t]}' for t in digits.target[:60]]
    return {
        'train': write_csv(root / 'train.csv', ['image', 'caption'], list(zip(names[:60], captions))),
        'query': write_csv(root / 'query.csv', ['text', 'label'], [(f'a handwritten {w}', w) for w in WORDS]),
        'index': write_csv(
            root / 'index.csv', ['uri', 'label'], [(n, WORDS[t]) for n, t in zip(names[60:], digits.target[60:100])]
        ),
    }
