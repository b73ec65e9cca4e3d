"""Issue 21's hostile requests, each against a real Deployment on 127.0.0.1 (gRPC and HTTP), each followed by a good
/encode that must still answer as before.

The Deployment runs in a process of its own, as users start it, with its log in a file and TMPDIR pointing at a
folder of the test's: what the service leaves in /tmp, or writes to its log, is checked too. One test kills the
worker, to show what notices it; a test that finds the module's service stopped starts it again (on the same data
and workspace), so that the tests pass in any order.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from executor.client import FinetunerClient, ServiceError
from executor.docs import FinetunerDoc
from executor.tuning.data.digits import digits, write_digits_folder
from tests.helpers import http, write_csv

ROOT = Path(__file__).resolve().parents[2]
JINA = Path(sys.executable).with_name('jina')
TINY = {'model': 'resnet18', 'pretrained': False, 'image_size': 32, 'epochs': 1, 'batch_size': 20}
START = """
from jina import Deployment
with Deployment(uses='config.yml', uses_with={uses_with!r}, workspace={workspace!r}, protocol=['grpc', 'http'],
                port=[{grpc}, {http}], host='127.0.0.1') as dep:
    dep.block()
"""


@dataclass
class Service:
    grpc: int
    http: int
    process: subprocess.Popen
    log: Path
    tmp: Path
    data: Path
    workspace: Path
    reference: np.ndarray

    @property
    def client(self) -> FinetunerClient:
        return FinetunerClient(f'grpc://127.0.0.1:{self.grpc}')

    def still_serves(self) -> None:
        """A good /encode right after, answered as before."""
        image = digits(per_class=1, size=32)[0][0]
        assert np.allclose(
            np.stack(self.client.encode([FinetunerDoc(tensor=image)]).embedding), self.reference, atol=1e-5
        )

    def refused(self, endpoint: str, docs: list, parameters: dict, expected: str) -> str:
        with pytest.raises(ServiceError, match=expected) as err:
            self.client.post(endpoint, docs, parameters)
        self.still_serves()
        return str(err.value)

    def http_refused(self, endpoint: str, body: bytes | dict, status: int, expected: str) -> str:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = requests.post(
            f'http://127.0.0.1:{self.http}{endpoint}',
            data=data,
            headers={'Content-Type': 'application/json'},
            timeout=120,
        )
        assert reply.status_code == status, reply.text[:500]
        detail = reply.json()['detail']
        assert re.search(expected, detail), detail
        self.still_serves()
        return detail


def ping(kind: str, address: str) -> int:
    command = [str(JINA), 'ping', kind, address, '--timeout', '5000', '--attempts', '1']
    env = {**os.environ, 'JINA_OPTOUT_TELEMETRY': '1'}
    return subprocess.run(command, capture_output=True, env=env, timeout=60).returncode


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def hostile_data(root: Path, outside: Path) -> None:
    """Digits, folders with links leading out of the root, decompression bombs, Finetuner-era CSVs and .pt files."""
    write_digits_folder(root / 'digits', per_class=3, size=32)
    write_digits_folder(outside / 'elsewhere', per_class=3, size=32)
    write_digits_folder(root / 'linked-class', per_class=3, size=32)
    (root / 'linked-class' / '9').rename(root / 'linked-class-9-was')
    (root / 'linked-class' / '9').symlink_to(outside / 'elsewhere' / '9')  # a class folder linked outside
    write_digits_folder(root / 'linked-file', per_class=3, size=32)
    (root / 'linked-file' / '5' / 'passwd.png').symlink_to('/etc/passwd')  # a file linked outside
    (root / 'bomb.png').write_bytes(png(Image.new('1', (12000, 12000))))  # 17 KB, 144 Mpx
    first = sorted((root / 'digits' / '3').iterdir())[0]
    write_csv(root / 'urls.csv', ['uri', 'label'], [['http://example.com/a.png', '1'], ['https://e.com/b.png', '2']])
    rows = [[str(p.relative_to(root)), p.parent.name] for p in sorted(root.glob('digits/*/*'))]
    write_csv(root / 'linked.csv', ['uri', 'label'], [*rows, ['linked-file/5/passwd.png', '5']])  # a row's link
    (root / 'junk.pt').write_bytes(b'not a checkpoint')
    torch.save({'call': os.system}, root / 'evil.pt')  # a pickle naming a function: weights_only refuses it
    (root / 'first.txt').write_text(str(first.relative_to(root)))


def start_service(base: Path, data: Path, grpc: int, http_port: int, settings: dict | None = None) -> Service:
    """The Deployment on `data`, in a process group of its own, with its log and TMPDIR in the new folder `base`
    and its workspace beside it (shared by every start), once it answers a good /encode. `settings`: more
    uses_with."""
    base.mkdir()
    tmp, log = base / 'tmp', base / 'service.log'
    tmp.mkdir()
    workspace = base.parent / 'ws'
    uses_with = {'data_roots': [str(data)], 'runtime': 'torch', 'max_request_docs': 3000, **(settings or {})}
    script = START.format(uses_with=uses_with, workspace=str(workspace), grpc=grpc, http=http_port)
    env = {**os.environ, 'TMPDIR': str(tmp), 'JINA_OPTOUT_TELEMETRY': '1', 'PYTHONPATH': str(ROOT)}
    with open(log, 'w') as out:
        process = subprocess.Popen(
            [sys.executable, '-c', script],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while ping('flow', f'grpc://127.0.0.1:{grpc}') != 0:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        client = FinetunerClient(f'grpc://127.0.0.1:{grpc}')
        image = digits(per_class=1, size=32)[0][0]
        reference = np.stack(client.encode([FinetunerDoc(tensor=image)]).embedding)
    except BaseException:
        stop_service(process)
        raise
    return Service(grpc, http_port, process, log, tmp, data, workspace / 'FinetunerExecutor' / '0', reference)


def stop_service(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Services:
    """The module's service, started on first use and again whenever a test finds it stopped."""

    def __init__(self, base: Path, free_port: Callable[[], int], settings: dict | None = None) -> None:
        self.base, self.free_port, self.settings = base, free_port, settings
        self.data = base / 'data'
        hostile_data(self.data, base / 'outside')
        self.current: Service | None = None
        self.starts = 0

    def get(self) -> Service:
        if self.current is None or self.current.process.poll() is not None:
            self.starts += 1
            base = self.base / f'start-{self.starts}'
            self.current = start_service(base, self.data, self.free_port(), self.free_port(), self.settings)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            stop_service(self.current.process)


@pytest.fixture(scope='module')
def services(tmp_path_factory: pytest.TempPathFactory, free_port: Callable[[], int]) -> Iterator[Services]:
    services = Services(tmp_path_factory.mktemp('hardening'), free_port)
    try:
        yield services
    finally:
        services.close()


@pytest.fixture
def service(services: Services) -> Service:
    return services.get()


def run_names(service: Service) -> list[str]:
    return sorted(r.name for r in service.client.list_runs())


def test_1_a_huge_batch_is_refused_before_it_is_run(service: Service):
    """2000 tiny tensors with batch_size=4096 in one ~80 KB plain-JSON request took 22.8 GB and the worker."""
    body = {'data': [{'tensor': [[1, 2, 3], [4, 5, 6], [7, 8, 9]]} for _ in range(2000)], 'parameters': {}}
    body['parameters']['batch_size'] = 4096
    service.http_refused(
        '/encode', body, 422, r'batch_size=4096 is more than .* \(max_batch_size=128, set in uses_with'
    )
    # documents per request: more than max_request_docs (3000 here) are refused before any is decoded
    many = {'data': [{'tensor': [[0]]} for _ in range(3001)], 'parameters': {}}
    service.http_refused('/encode', many, 413, r'holds 3001 documents, more than the 3000 .*max_request_docs')


def test_2_links_in_a_folder_data_set_are_checked_against_the_data_roots(service: Service):
    runs = run_names(service)
    service.refused(
        '/train',
        [],
        {'train_data': 'linked-class', **TINY},
        r'linked-class/9/\d+.png: .* resolves to .*outside/elsewhere/9/.*, outside the data roots',
    )
    service.refused(
        '/train',
        [],
        {'train_data': 'linked-file', **TINY},
        r"linked-file/5/passwd.png: .* resolves to '/etc/passwd', outside",
    )
    service.refused(
        '/train', [], {'train_data': 'linked.csv', **TINY}, r"linked.csv line 32: .*resolves to '/etc/passwd'"
    )
    assert run_names(service) == runs  # none of them made a run


def test_3_concurrent_trains_with_one_run_name_make_one_run(service: Service):
    runs = run_names(service)
    replies: list = []

    def train(epochs: int) -> None:
        body = {'data': [], 'parameters': {'train_data': 'digits', **TINY, 'epochs': epochs, 'run_name': 'race'}}
        replies.append(requests.post(f'http://127.0.0.1:{service.http}/train', json=body, timeout=120))

    threads = [threading.Thread(target=train, args=(i,)) for i in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(reply.status_code for reply in replies)
    assert statuses == [200, 400, 400], [r.text[:300] for r in replies]
    refusals = [r.json()['detail'] for r in replies if r.status_code != 200]
    assert all("a run named 'race' exists already" in detail for detail in refusals), refusals
    run = next(r.json()['data'][0] for r in replies if r.status_code == 200)
    assert run_names(service) == sorted([*runs, 'race'])
    assert service.client.get_run('race').info().epochs == run['epochs']  # the run is the request that made it
    service.client.get_run('race').cancel()
    service.still_serves()


def test_3b_training_documents_are_sent_as_one_request(service: Service):
    """jina's Client sends 100 documents per request: 150 training documents made two runs."""
    images, labels = digits(per_class=15, size=32)
    docs = [FinetunerDoc(tensor=image, label=label) for image, label in zip(images, labels)]
    run = service.client.fit(train_data=docs, run_name='many-docs', **TINY)
    assert [r.name for r in service.client.list_runs()].count('many-docs') == 1
    run.cancel()
    records = service.workspace / 'runs' / 'many-docs' / 'plan' / 'train.jsonl'  # the run's planned training items
    assert len(records.read_text().splitlines()) == 150  # one run holds them all
    service.still_serves()


def test_4_decompression_bombs_are_refused_from_their_header_naming_the_document(service: Service):
    bomb = (service.data / 'bomb.png').read_bytes()
    assert len(bomb) < 20_000
    docs = [FinetunerDoc(id=f'bomb-{i}', blob=bomb) for i in range(4)]
    service.refused('/encode', docs, {}, r"document 'bomb-0': the image is 12000 x 12000 .*max_image_pixels")
    service.refused(
        '/encode', [FinetunerDoc(id='by-path', uri='bomb.png')], {}, r"document 'bomb.png': .*12000 x 12000"
    )
    huge = png(Image.new('1', (30000, 30000)))  # PIL's own bomb error, above 2x its default bound
    service.refused(
        '/encode',
        [FinetunerDoc(id='giant', blob=huge)],
        {},
        r"document 'giant': the image is too large to decode \(Image size \(900000000 pixels\)",
    )


def test_5_relative_uris_resolve_under_the_data_roots(service: Service):
    first = (service.data / 'first.txt').read_text()  # digits/3/<file>.png, as the README sends it
    [reply] = http(service.http, '/encode', [{'uri': first}])
    [expected] = service.client.encode([FinetunerDoc(tensor=np.asarray(Image.open(service.data / first)))]).embedding
    assert np.allclose(reply['embedding'], expected, atol=1e-5)
    detail = service.refused('/encode', [FinetunerDoc(uri='digits/3/missing.png')], {}, r'does not exist')
    assert str(service.workspace) not in detail and str(service.data.parent) not in detail.replace(
        str(service.data), ''
    )


def test_6_what_can_be_checked_before_a_run_exists_is_checked_there(service: Service):
    runs = run_names(service)
    cases = [
        ({'model': 'missing.pt'}, r"model file 'missing.pt' does not exist"),
        ({'model': 'junk.pt'}, r"'junk.pt' cannot be read as a model artifact \(RuntimeError\)"),
        ({'model': 'evil.pt'}, r"'evil.pt' cannot be read as a model artifact \(UnpicklingError\)"),
        ({'weights': 'junk.pt', 'model': 'resnet18'}, r"weights file 'junk.pt' cannot be read \(UnpicklingError\)"),
        ({'train_data': 'urls.csv'}, r"urls.csv line 2: uri 'http://example.com/a.png' is a URL.*never downloads"),
        ({'loss_options': {'marginz': 1}}, r"loss TripletMarginLoss has no option \['marginz'\]; it takes \["),
        ({'optimizer_options': {'lr': 0.1}, 'learning_rate': 0.01}, r'holds lr=0.1, which learning_rate would'),
    ]
    for parameters, expected in cases:
        parameters = {'train_data': 'digits', **TINY, **parameters}
        detail = service.refused('/train', [], parameters, expected)
        assert 'weights_only=False' not in detail and '\x1b[' not in detail, detail
    assert run_names(service) == runs  # none of them made a run


def test_8_small_defects_name_the_document_and_show_no_server_paths(service: Service):
    cases = [
        ([FinetunerDoc(id='nul', uri='digits/\x00.png')], r"document 'digits/.*x00.png': the path holds a NUL byte"),
        ([FinetunerDoc(id='strings', tensor=np.array([['a', 'b'], ['c', 'd']]))], r"document 'strings': tensor"),
        ([FinetunerDoc(id='b64', uri='data:image/png;base64,@@@')], r"document 'b64': .*invalid base64"),
        ([FinetunerDoc(id='junk', blob=b'junk')], r"document 'junk': cannot decode the image \(cannot identify"),
    ]
    for docs, expected in cases:
        detail = service.refused('/encode', docs, {}, expected)
        assert ' at 0x' not in detail and str(service.workspace) not in detail, detail
    # a body over 1 MiB through a Deployment's HTTP port (jina's load balancer drops it): 413, not 'Field required'
    body = {'data': [{'uri': 'x' * 2_000_000}], 'parameters': {}}
    service.http_refused('/encode', body, 413, r'more than 1048576 bytes.*arrives empty')


def test_9_stopping_leaves_nothing_in_tmp_and_a_dead_worker_fails_the_health_check(service: Service):
    # documents over both protocols, whatever ran before: pydantic's warning came once per document
    http(service.http, '/encode', [{'tensor': np.zeros((8, 8, 3), dtype=np.uint8).tolist()} for _ in range(3)])
    service.still_serves()
    log = service.log.read_text()
    assert 'PydanticSerializationUnexpectedValue' not in log  # once per document before (2052 lines per request)
    try:
        worker = max(_children(service.process.pid), key=_resident)  # the one that holds the model
        address = f'grpc://127.0.0.1:{service.grpc}'
        assert ping('flow', address) == 0
        os.kill(worker, signal.SIGKILL)  # as the kernel's OOM killer does
        time.sleep(2)
        assert ping('flow', address) != 0  # the health check reaches the executor through the gateway, and fails
        os.killpg(service.process.pid, signal.SIGTERM)
        service.process.wait(60)
    finally:
        stop_service(service.process)  # stopped whatever failed: the next test that needs it starts it again
    # no folder left behind (jina's worker left an empty one per start); a library's one-line .ses file may stay
    assert [p for p in service.tmp.iterdir() if p.is_dir()] == []


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _resident(pid: int) -> int:
    return int(Path(f'/proc/{pid}/statm').read_text().split()[1])


def test_7_an_artifact_zip_is_unpacked_within_max_artifact_bytes(tmp_path: Path, free_port: Callable[[], int]):
    archive = tmp_path / 'bomb.zip'
    with zipfile.ZipFile(archive, 'w', compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr('model.pt', b'\0' * (64 * 2**20))
    from jina import Deployment
    from jina.excepts import RuntimeFailToStart

    deployment = Deployment(
        uses=str(ROOT / 'config.yml'),
        uses_with={'artifact': str(archive), 'runtime': 'torch', 'max_artifact_bytes': 2**20},
        workspace=str(tmp_path / 'ws'),
        host='127.0.0.1',
        port=free_port(),
    )
    with pytest.raises(RuntimeFailToStart):
        with deployment:
            pass
    unpacked = tmp_path / 'ws' / 'FinetunerExecutor' / '0' / 'artifacts'
    assert not unpacked.exists() or list(unpacked.iterdir()) == []


@pytest.mark.slow  # about 40 s, most of it a training run; test_9 kills a worker in make test
def test_the_docker_images_command_serves_and_its_death_ends_it(tmp_path: Path, free_port: Callable[[], int]):
    """The image runs `jina executor --native`: it serves and trains, and when its executor dies the command ends
    (so the container does, for `--restart` or the kubelet to start a new one), and the HEALTHCHECK's ping fails."""
    port = free_port()
    command = [str(JINA), 'executor', '--native', '--uses', 'config.yml', '--port', str(port), '--host', '127.0.0.1']
    command += ['--workspace', str(tmp_path / 'ws'), '--uses-with', json.dumps({'runtime': 'torch'})]
    env = {**os.environ, 'JINA_OPTOUT_TELEMETRY': '1', 'PYTHONPATH': str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while ping('executor', f'127.0.0.1:{port}') != 0:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(1)
        client = FinetunerClient(f'grpc://127.0.0.1:{port}')
        images, labels = digits(per_class=2, size=32)
        run = client.fit(
            train_data=[FinetunerDoc(tensor=i, label=y) for i, y in zip(images, labels)], wait=True, **TINY
        )
        assert run.status()['status'] == 'FINISHED'
        assert len(client.encode([FinetunerDoc(tensor=images[0])], run_id=run.name).embedding[0]) > 0
        process.send_signal(signal.SIGKILL)  # as the OOM killer ends it
        assert process.wait(30) == -signal.SIGKILL
        assert ping('executor', f'127.0.0.1:{port}') != 0
    finally:
        if process.poll() is None:
            process.kill()
