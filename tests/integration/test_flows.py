"""The flows of flows/ and the Dockerfile: search over a real Flow, misspelt parameters behind its gateway, the
Kubernetes export and the image's build and start-up, checked without a Docker engine."""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from google.protobuf.empty_pb2 import Empty
from jina import Flow
from jina.proto import jina_pb2_grpc

from executor.client import FinetunerClient, ServiceError
from executor.docs import FinetunerDoc
from executor.tuning.data.digits import digits, write_digits_folder
from tests.helpers import http

ROOT = Path(__file__).resolve().parents[2]
FLOWS = ROOT / 'flows'
JINA = Path(sys.executable).with_name('jina')
GATEWAY_IMAGE = 'finetuner-executor:latest'  # jina's gateway and head run from the encoder's image


@pytest.fixture(autouse=True)
def _repository_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flows name their executors' configs relative to the repository root, where they are started."""
    monkeypatch.chdir(ROOT)


@contextmanager
def search_flow(workspace: Path, grpc_port: int, http_port: int) -> Iterator[Flow]:
    overrides = {
        'host': '127.0.0.1',
        'port': [grpc_port, http_port],
        'protocol': ['grpc', 'http'],
        'workspace': str(workspace),
    }
    with Flow.load_config(str(FLOWS / 'search.yml'), uses_with=overrides) as flow:
        yield flow


# ---------------------------------------------------------------------------------------------------------------------
# flows/*.yml
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'name,executors',
    [
        ('local', ['finetuner']),
        ('search', ['encoder', 'indexer']),
        ('k8s', ['encoder', 'indexer', 'merger']),
        ('jcloud', ['encoder', 'indexer']),
    ],
)
def test_each_flow_loads_and_takes_its_gateway_and_workspace_from_uses_with(
    name: str, executors: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv('JINA_HUB_NAMESPACE', 'team')
    flow = Flow.load_config(str(FLOWS / f'{name}.yml'))
    assert [p.name for p in flow.protocol] == ['GRPC', 'HTTP']
    assert [name for name, _ in flow] == executors

    overrides = {'port': [40001, 40002], 'protocol': ['http', 'grpc'], 'workspace': str(tmp_path)}
    flow = Flow.load_config(str(FLOWS / f'{name}.yml'), uses_with=overrides)
    assert (flow.port, [p.name for p in flow.protocol]) == ([40001, 40002], ['HTTP', 'GRPC'])
    assert flow.workspace == str(tmp_path)


def test_jcloud_flow_runs_the_hub_images_with_a_gpu_for_the_encoder(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv('JINA_HUB_NAMESPACE', 'team')
    uses = {name: node.args.uses for name, node in Flow.load_config(str(FLOWS / 'jcloud.yml'))}
    assert uses == {
        'encoder': 'jinaai+docker://team/FinetunerExecutor:latest',
        'indexer': 'jinaai+docker://team/VectorIndexer:latest',
    }
    encoder, indexer = yaml.safe_load((FLOWS / 'jcloud.yml').read_text())['executors']
    assert encoder['jcloud']['resources']['gpu'] == 1 and encoder['uses_with'] == {'device': 'cuda'}
    assert indexer['jcloud']['resources']['storage'] == {'kind': 'ebs', 'size': '10G'}


def _digit_docs(root: Path, per_class: int) -> list[dict]:
    """Digits written as PNG files under `root`, as documents that point at them."""
    write_digits_folder(root, per_class=per_class, size=32)
    return [
        {'id': f'{png.parent.name}-{png.stem}', 'uri': str(png), 'label': png.parent.name}
        for png in sorted(root.glob('*/*.png'))
    ]


def _tensor_docs(prefix: str, images: list[np.ndarray], labels: list[str]) -> list[dict]:
    return [
        {'id': f'{prefix}{i}', 'tensor': img.tolist(), 'label': label}
        for i, (img, label) in enumerate(zip(images, labels))
    ]


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


@pytest.mark.slow
def test_search_flow_finds_the_nearest_digits_and_keeps_its_index_across_restarts(
    tmp_path: Path, free_port: Callable[[], int]
):
    workspace, limit = tmp_path / 'ws', 5
    copies = digits(per_class=1, offset=0, size=32)  # the first indexed image of each digit, pixel for pixel
    held_out = digits(per_class=2, offset=50, size=32)
    queries = _tensor_docs('copy', *copies) + _tensor_docs('new', *held_out)
    with search_flow(workspace, free_port(), http_port := free_port()):
        data_root = workspace / 'FinetunerExecutor' / '0' / 'data'  # the encoder's own data root
        assert data_root.is_dir()
        corpus = _digit_docs(data_root / 'digits', per_class=3)
        indexed = http(http_port, '/index', corpus, {'batch_size': 16})
        assert [d['id'] for d in indexed] == [d['id'] for d in corpus]
        (stats,) = http(http_port, '/count')
        assert (stats['count'], stats['dim']) == (len(corpus), 1280)
        found = http(http_port, '/search', queries, {'limit': limit})

    embeddings = _unit(np.array([d['embedding'] for d in indexed]))  # (30, 1280)
    query_embeddings = _unit(np.array([d['embedding'] for d in found]))  # (30, 1280)
    by_id = {d['id']: d for d in corpus}
    row = {d['id']: i for i, d in enumerate(corpus)}
    for query, vector in zip(found, query_embeddings):
        similarity = embeddings @ vector  # (30,) cosine to every indexed image
        scores = [m['score'] for m in query['matches']]
        # the `limit` most similar images (in any order among equal scores), best first, each with its own score
        np.testing.assert_allclose(scores, np.sort(similarity)[::-1][:limit], atol=1e-4, err_msg=query['id'])
        np.testing.assert_allclose(scores, similarity[[row[m['id']] for m in query['matches']]], atol=1e-4)
        assert all((m['uri'], m['label']) == (by_id[m['id']]['uri'], by_id[m['id']]['label']) for m in query['matches'])
    for query in found[:10]:  # an exact copy of an indexed image finds that image first
        digit, best = query['label'], query['matches'][0]
        assert best['id'] == f'{digit}-{int(digit) * 3:04d}'  # the files are numbered across digits, 3 of each
        assert best['label'] == digit and best['score'] > 0.999
    same_label = np.mean([query['matches'][0]['label'] == query['label'] for query in found[10:]])
    assert same_label >= 0.3  # unseen digits, 10 classes: 0.1 by chance; the pre-trained model gets about 0.5

    with search_flow(workspace, free_port(), http_port := free_port()):
        assert http(http_port, '/count')[0]['count'] == len(corpus)
        again = http(http_port, '/search', queries, {'limit': limit})
    for before, after in zip(found, again):
        assert [m['id'] for m in after['matches']] == [m['id'] for m in before['matches']]
        np.testing.assert_allclose(
            [m['score'] for m in after['matches']], [m['score'] for m in before['matches']], atol=1e-5
        )


@pytest.mark.slow  # 40 s; test_bad_input's flow cases check a misspelt parameter over gRPC and HTTP in make test
def test_a_misspelt_parameter_is_an_error_through_the_search_flow(tmp_path: Path, free_port: Callable[[], int]):
    """Both executors see every parameter: each accepts the other's, and a typo is reported whichever it reaches."""
    images, labels = digits(per_class=1, size=32)
    docs = [FinetunerDoc(id=f'd{i}', tensor=img, label=label) for i, (img, label) in enumerate(zip(images, labels))]
    with search_flow(tmp_path, grpc_port := free_port(), http_port := free_port()):
        client = FinetunerClient(f'grpc://127.0.0.1:{grpc_port}')

        def over_grpc(endpoint: str, parameters: dict) -> list:
            return list(client.post(endpoint, [], parameters))

        def over_http(endpoint: str, parameters: dict) -> list:
            return http(http_port, endpoint, [], parameters)

        for post in (over_grpc, over_http):
            with pytest.raises(ServiceError, match=r"/search: unknown parameter 'limt' \(did you mean 'limit'\?\)"):
                post('/search', {'limt': 3})
            with pytest.raises(ServiceError, match=r"/index: unknown parameter 'batchsize' \(did you mean 'batch_si"):
                post('/index', {'batchsize': 4})
            allowed = r'allowed: batch_size, drop_image_content, model'
            with pytest.raises(ServiceError, match=r"/index: unknown parameter 'limit'; " + allowed):
                post('/index', {'limit': 4})
            with pytest.raises(ServiceError, match=r"/delete: unknown parameter 'id' \(did you mean 'ids'\?\)"):
                post('/delete', {'id': ['d0']})
            with pytest.raises(ServiceError, match=r"/count: unknown parameter 'limit'; allowed: none"):
                post('/count', {'limit': 1})
            with pytest.raises(ServiceError, match=r"parameter 'limit': Input should be greater than or equal to 1"):
                post('/search', {'limit': 0})

        client.post('/index', docs, {'model': 'efficientnet_lite0', 'runtime': 'torch', 'batch_size': 4})
        model_and_limit = {'model': 'efficientnet_lite0', 'runtime': 'torch', 'batch_size': 4, 'limit': 2}
        (by_grpc,) = client.post('/search', docs[:1], model_and_limit)
        (by_http,) = http(http_port, '/search', [{'id': 'q', 'tensor': images[0].tolist()}], model_and_limit)
        assert [m.id for m in by_grpc.matches] == [m['id'] for m in by_http['matches']]
        assert len(by_grpc.matches) == 2 and by_grpc.matches[0].id == 'd0'
        assert [(s['count'], s['dim']) for s in http(http_port, '/count')] == [(10, 1280)]


# ---------------------------------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------------------------------


def _manifests(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The Kubernetes objects of one exported file, by (kind, name)."""
    return {(doc['kind'], doc['metadata']['name']): doc for doc in yaml.safe_load_all(path.read_text())}


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    (container,) = manifest['spec']['template']['spec']['containers']
    return container


def _arg(container: dict[str, Any], name: str) -> str:
    args = container['args']
    return args[args.index(name) + 1]


def test_kubernetes_export_replicates_the_encoder_and_shards_the_index(tmp_path: Path):
    env = {**os.environ, 'JINA_GATEWAY_IMAGE': GATEWAY_IMAGE}
    subprocess.run(
        [str(JINA), 'export', 'kubernetes', 'flows/k8s.yml', str(tmp_path), '--k8s-namespace', 'finetuner'],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('*.yml')) == [
        'encoder/encoder.yml',
        'gateway/gateway.yml',
        'indexer/indexer-0.yml',
        'indexer/indexer-1.yml',
        'indexer/indexer-head.yml',
        'merger/merger.yml',
    ]

    encoder = _manifests(tmp_path / 'encoder' / 'encoder.yml')['Deployment', 'encoder']
    assert encoder['spec']['replicas'] == 2
    container = _container(encoder)
    assert container['image'] == 'finetuner-executor:latest'
    assert (_arg(container, '--uses'), _arg(container, '--port')) == ('config.yml', '8080')
    assert container['ports'] == [{'containerPort': 8080}]
    # the executor is the container's process (--native) and a liveness probe pings it: a worker that dies or stops
    # answering gets its container restarted
    assert '--native' in container['args']
    assert container['livenessProbe']['exec']['command'][:4] == ['jina', 'ping', 'executor', 'grpc://127.0.0.1:8080']

    for shard in (0, 1):
        manifests = _manifests(tmp_path / 'indexer' / f'indexer-{shard}.yml')
        stateful = manifests['StatefulSet', f'indexer-{shard}']  # a persistent volume per shard
        container = _container(stateful)
        assert container['image'] == 'finetuner-indexer:latest' and _arg(container, '--name') == f'indexer-{shard}'
        assert stateful['spec']['template']['metadata']['labels']['shard_id'] == str(shard)
        assert _arg(container, '--workspace') == '/workspace'
        assert container['volumeMounts'][0]['mountPath'] == '/workspace'
        assert stateful['spec']['volumeClaimTemplates'][0]['spec']['resources']['requests']['storage'] == '10G'
        assert manifests['Service', f'indexer-{shard}']['spec']['ports'][0]['port'] == 8080
    head = _container(_manifests(tmp_path / 'indexer' / 'indexer-head.yml')['StatefulSet', 'indexer-head'])
    assert json.loads(_arg(head, '--polling')) == {
        '/index': 'ANY',
        '/search': 'ALL',
        '/delete': 'ALL',
        '/count': 'ALL',
        '*': 'ANY',
    }
    assert json.loads(_arg(head, '--connection-list')) == {
        '0': 'indexer-0.finetuner.svc:8080',
        '1': 'indexer-1.finetuner.svc:8080',
    }
    merger = _manifests(tmp_path / 'merger' / 'merger.yml')['Deployment', 'merger']
    assert _container(merger)['image'] == 'finetuner-merger:latest'

    gateway = _manifests(tmp_path / 'gateway' / 'gateway.yml')
    container = _container(gateway['Deployment', 'gateway'])
    assert container['image'] == GATEWAY_IMAGE
    protocols = container['args'].index('--protocol')
    assert container['args'][protocols + 1 : protocols + 3] == ['GRPC', 'HTTP']
    # Kubernetes gateways listen on jina's fixed ports, one Service per protocol
    assert [p['containerPort'] for p in container['ports']] == [8080, 8081]
    assert gateway['Service', 'gateway']['spec']['ports'][0]['port'] == 8080
    assert gateway['Service', 'gateway-1-http']['spec']['ports'][0]['port'] == 8081
    assert json.loads(_arg(container, '--deployments-addresses')) == {
        'encoder': ['grpc://encoder.finetuner.svc:8080'],
        'indexer': ['grpc://indexer-head.finetuner.svc:8080'],
        'merger': ['grpc://merger.finetuner.svc:8080'],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = '\n'.join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith('#'))
    steps = []
    for line in text.replace('\\\n', ' ').splitlines():
        if line.strip():
            name, _, args = line.strip().partition(' ')
            steps.append((name.upper(), ' '.join(args.split())))
    return steps


def _image(build_args: dict[str, str]) -> dict[str, Any]:
    """What the Dockerfile copies from the build context (to absolute paths in the image) and how its last stage's
    container starts: workdir, env, user, entrypoint, cmd and healthcheck."""
    values: dict[str, str] = {}

    def substitute(word: str) -> str:
        return re.sub(r'\$\{(\w+)\}', lambda var: values[var.group(1)], word)

    image: dict[str, Any] = {'copies': []}
    for name, args in _instructions(ROOT / 'Dockerfile'):
        if name == 'FROM':
            image.update(workdir='/', env={}, user='root')
        elif name == 'ARG':
            key, _, default = args.partition('=')
            values[key] = build_args.get(key, default)
        elif name == 'WORKDIR':
            image['workdir'] = posixpath.join(image['workdir'], args)
        elif name == 'COPY' and not args.startswith('--from'):
            *sources, target = (substitute(word) for word in args.split())
            image['copies'].append((sources, posixpath.join(image['workdir'], target)))
        elif name == 'ENV':
            image['env'].update(word.split('=', 1) for word in shlex.split(args))
        elif name == 'USER':
            image['user'] = args
        elif name in ('ENTRYPOINT', 'CMD'):
            image[name.lower()] = json.loads(args)
        elif name == 'HEALTHCHECK':
            image['healthcheck'] = json.loads(args[args.index('CMD ') + 4 :])
    return image


def _ignore_rule_matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches the path or a folder above it; a leading `**/` matches at any depth."""
    parts = Path(path).parts
    for depth in range(1, len(parts) + 1):
        if fnmatch.fnmatch('/'.join(parts[:depth]), pattern):
            return True
        if pattern.startswith('**/') and fnmatch.fnmatch(parts[depth - 1], pattern[3:]):
            return True
    return False


def _in_build_context(path: str) -> bool:
    """Whether .dockerignore lets the file into the build context (the last rule that matches decides)."""
    included = True
    for rule in (ROOT / '.dockerignore').read_text().splitlines():
        rule = rule.strip()
        if rule and not rule.startswith('#') and _ignore_rule_matches(rule.lstrip('!').rstrip('/'), path):
            included = rule.startswith('!')
    return included


def _build_files(image: dict[str, Any], root: Path) -> None:
    """Lay out under `root` the files the image's COPY instructions take from the build context."""
    for sources, target in image['copies']:
        for source in sources:
            assert (ROOT / source).exists(), f'the Dockerfile copies {source}, which does not exist'
            files = (
                sorted(f for f in (ROOT / source).rglob('*') if f.is_file())
                if (ROOT / source).is_dir()
                else [ROOT / source]
            )
            for file in files:
                if not _in_build_context(file.relative_to(ROOT).as_posix()):
                    continue
                if (ROOT / source).is_dir():  # a folder's contents go into the target folder
                    inside = posixpath.join(target, file.relative_to(ROOT / source).as_posix())
                else:
                    inside = posixpath.join(target, file.name) if target.endswith('/') else target
                (root / inside.lstrip('/')).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, root / inside.lstrip('/'))


def test_dockerfile_runs_jina_as_a_non_root_user_and_copies_only_what_exists():
    image = _image({})
    assert image['entrypoint'] == ['jina', 'executor', '--native', '--uses', 'config.yml']  # its death ends it
    assert image['user'] not in ('root', '0') and image['env']['PYTHONPATH'] == '/app'
    assert image['cmd'] == ['--port', '8080', '--workspace', '/workspace']
    assert image['healthcheck'] == ['jina', 'ping', 'executor', 'localhost:8080']
    assert image['copies'] == [
        (['requirements.txt', 'requirements-trackers.txt', 'requirements-engines.txt', 'requirements.lock'], '/tmp/'),
        (['executor/'], '/app/executor/'),
        (['config.yml'], '/app/config.yml'),
    ]
    for executor in ('indexer.yml', 'merger.yml'):
        assert _image({'EXECUTOR': executor})['copies'][-1] == ([executor], '/app/config.yml')
    for sources, _ in image['copies']:
        assert all((ROOT / source).exists() and _in_build_context(source) for source in sources), sources
    assert _in_build_context('executor/tuning/models/registry.py') and _in_build_context('requirements.lock')
    for excluded in (
        '.venv/bin/python',
        'workspace/runs/x/model.pt',
        'tests/conftest.py',
        '.git/HEAD',
        'executor/__pycache__/docs.cpython-311.pyc',
    ):
        assert not _in_build_context(excluded), excluded
    build = _instructions(ROOT / 'Dockerfile')
    assert ('ARG', 'TORCH=cpu') in build and any('download.pytorch.org/whl/${TORCH}' in a for _, a in build)


def _endpoints(port: int) -> set[str] | None:
    """The endpoints the executor on the port serves, as it tells jina's gateway (the default one as `/default`);
    None while nothing answers there."""
    with grpc.insecure_channel(f'127.0.0.1:{port}') as channel:
        try:
            reply = jina_pb2_grpc.JinaDiscoverEndpointsRPCStub(channel).endpoint_discovery(Empty(), timeout=10)
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise
    return set(reply.endpoints) - {'_jina_dry_run_'}


@pytest.mark.parametrize(
    'executor,endpoints',
    [
        (
            'config.yml',
            {
                '/train',
                '/runs',
                '/runs/status',
                '/runs/logs',
                '/runs/cancel',
                '/runs/artifact',
                '/runs/reports',
                '/runs/delete',
                '/models',
                '/encode',
                '/index',
                '/search',
                '/evaluate',
                '/export',
                '/classify',
            },
        ),
        ('indexer.yml', {'/index', '/search', '/delete', '/count', '/default'}),
        ('merger.yml', {'/search', '/count', '/default'}),
    ],
)
def test_the_image_entrypoint_starts_each_executor_and_passes_its_healthcheck(
    executor: str, endpoints: set[str], tmp_path: Path, free_port: Callable[[], int]
):
    """The image's files, laid out from the Dockerfile and .dockerignore, started with its ENTRYPOINT and CMD."""
    image, root, port = _image({'EXECUTOR': executor}), tmp_path / 'image', free_port()
    _build_files(image, root)
    app = root / image['workdir'].lstrip('/')
    # the image's CMD, with a free port and a temporary workspace; its ENV, with its paths under `root`
    cmd = [str(JINA), *image['entrypoint'][1:], '--port', str(port), '--workspace', str(tmp_path / 'workspace')]
    env = {
        **os.environ,
        **{k: v for k, v in image['env'].items() if k != 'PATH'},
        'PYTHONPATH': str(root / image['env']['PYTHONPATH'].lstrip('/')),
    }
    ping = [str(JINA), *image['healthcheck'][1:-1], f'localhost:{port}']
    log = tmp_path / 'executor.log'
    with log.open('wb') as output:
        server = subprocess.Popen(
            cmd, cwd=app, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while (served := _endpoints(port)) is None:
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f'{executor} did not start in 180 s'
            time.sleep(0.5)
        assert served == endpoints
        assert subprocess.run(ping, env=env, capture_output=True, timeout=60).returncode == 0  # the HEALTHCHECK
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its session also holds the executor process the CLI started
        server.wait(timeout=60)
