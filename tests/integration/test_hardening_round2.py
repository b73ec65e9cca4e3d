"""Issue 32's hostile requests, each sent as plain JSON over HTTP to one real Deployment on 127.0.0.1 (shared by the
module), each followed by a good /encode that must answer as before: bounds on every list a request carries, on what
the pre-run check would allocate (the serving worker's peak memory is measured), errors that never echo a file's
contents and quote at most a bounded excerpt of the request, 4xx where 500s were, long work that stops with its
client or its service, and SIGTERM ending the service within 10 s while a long request is in flight.

The Deployment is test_hardening's (its process, log and TMPDIR), with ``max_model_names`` raised so that a /models
request can be long enough to be given up on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from docarray import DocList
from jina import Client

from executor.docs import FinetunerDoc
from executor.tuning.data.digits import write_digits_folder
from executor.tuning.models import list_models
from tests.helpers import write_csv
from tests.integration.test_hardening import (
    JINA,
    ROOT,
    TINY,
    Service,
    Services,
    _children,
    _resident,
    ping,
    stop_service,
)

LONG_NAMES = 1500  # the module's max_model_names: /models with this many names measures for minutes
SETTINGS = {'max_model_names': LONG_NAMES}


def round2_data(root: Path) -> None:
    """The files issue 32's requests name, under the data root."""
    write_digits_folder(root / 'r2', per_class=3, size=32)
    images = sorted(str(p.relative_to(root)) for p in (root / 'r2').glob('*/*.png'))
    rows = [[path, Path(path).parent.name] for path in images]
    lines = ''.join(f'secret-{i},x\n' for i in range(5000))
    (root / 'leak.csv').write_bytes(b'text,label\n' + lines.encode() + b'\xff,y\n')  # one byte that is not UTF-8
    (root / 'wide.csv').write_text(','.join(f'c{i}' for i in range(10**6)) + '\n1,2\n')  # a 6.9 MB header line
    (root / 'columns.csv').write_text(','.join(f'c{i}' for i in range(5000)) + '\n1,2\n')  # 5000 short columns
    (root / 'field.csv').write_text('text,label\n' + 'a' * 200_000 + ',x\nb,y\n')  # a field over 131072
    with open(root / 'bom.csv', 'w', encoding='utf-8-sig', newline='') as fh:  # Excel's UTF-8: a BOM first
        fh.write('uri,label\r\n' + ''.join(f'{path},{label}\r\n' for path, label in rows))
    write_csv(root / 'dup.csv', ['uri', 'label', 'uri'], [[p, y, p] for p, y in rows])
    (root / 'u16.csv').write_bytes('uri,label\n'.encode('utf-16-le'))  # UTF-16 without its BOM
    os.mkfifo(root / 'fifo.csv')


@pytest.fixture(scope='module')
def services(tmp_path_factory: pytest.TempPathFactory, free_port: Callable[[], int]) -> Iterator[Services]:
    services = Services(tmp_path_factory.mktemp('hardening2'), free_port, SETTINGS)
    round2_data(services.data)
    try:
        yield services
    finally:
        services.close()


@pytest.fixture
def service(services: Services) -> Service:
    return services.get()


def post(service: Service, endpoint: str, body: dict | bytes, timeout: float = 120) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    url = f'http://127.0.0.1:{service.http}{endpoint}'
    return requests.post(url, data=data, headers={'Content-Type': 'application/json'}, timeout=timeout)


def refused(service: Service, endpoint: str, body: dict | bytes, status: int, expected: str) -> str:
    """The request answered ``status`` with a detail matching ``expected``, at most ~4,000 characters, naming no
    server folder; then a good /encode answers as before."""
    detail = service.http_refused(endpoint, body, status, expected)
    assert len(detail) < 4200, len(detail)
    assert str(service.workspace) not in detail and str(service.data) not in detail, detail
    return detail


def train(parameters: dict) -> dict:
    return {'data': [], 'parameters': {'train_data': 'r2', **TINY, **parameters}}


def worker(service: Service) -> int:
    return max(_children(service.process.pid), key=_resident)  # the process that holds the model


def peak_rss_mb(pid: int) -> float:
    status = Path(f'/proc/{pid}/status').read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith('VmHWM:'))) / 1024


def test_1_every_list_is_bounded_and_models_names_count_once(service: Service):
    refused(
        service,
        '/models',
        {'data': [], 'parameters': {'names': ['efficientnet_lite0'] * 20_000}},  # 400 KB: under the 1 MiB of HTTP
        413,
        r"parameter 'names' holds 20000 items, more than the 10000 .*\(max_parameter_items, set in uses_with\)",
    )
    reply = post(service, '/models', {'data': [], 'parameters': {'names': ['efficientnet_lite0'] * 5000}})
    assert reply.status_code == 200, reply.text[:300]
    assert [model['name'] for model in reply.json()['data']] == ['efficientnet_lite0']  # measured once
    names = list_models()[: LONG_NAMES + 1]
    refused(
        service,
        '/models',
        {'data': [], 'parameters': {'names': names}},
        422,
        rf'names holds {LONG_NAMES + 1} distinct models, more than the {LONG_NAMES} .*\(max_model_names',
    )
    deep: list = []
    for _ in range(200):
        deep = [deep]
    refused(service, '/train', train({'callbacks': deep}), 422, r'nested more than 16 levels deep')


def test_2_the_pre_run_check_allocates_nothing_a_request_sizes(service: Service):
    runs = sorted(r.name for r in service.client.list_runs())
    pid = worker(service)
    # the same path once with a small ArcFace (refused after it is built): what a first /train loads is not counted
    refused(service, '/train', train({'loss': 'ArcFaceLoss', 'loss_options': {'scale': 'x'}}), 400, r"'scale' takes")
    reply = post(service, '/train', train({'loss': 'ArcFaceLoss', 'run_name': 'warm-up'}))
    assert reply.status_code == 200, reply.text[:300]
    service.client.get_run('warm-up').cancel()
    runs.append('warm-up')
    Path(f'/proc/{pid}/clear_refs').write_text('5')  # the peak (VmHWM) starts again from the current size
    before = peak_rss_mb(pid)
    refused(
        service,
        '/train',
        train({'loss': 'ArcFaceLoss', 'matryoshka_dims': [62_500_000]}),
        422,
        r"parameter 'matryoshka_dims.0': Input should be less than or equal to 65536 \(got 62500000",
    )
    refused(
        service,
        '/train',
        train({'matryoshka_dims': [1e9]}),
        422,
        r"parameter 'matryoshka_dims.0': Input should be less than or equal to 65536",
    )
    refused(
        service,
        '/train',
        train({'loss': 'ArcFaceLoss', 'output_dim': 65536, 'loss_options': {'num_classes': 100_000}}),
        400,
        r'loss ArcFaceLoss would hold 6553600000 weights \(num_classes=100000 x embedding_size=65536\), more than',
    )
    refused(service, '/train', train({'output_dim': 10**6}), 422, r"parameter 'output_dim': .*65536")
    growth = peak_rss_mb(pid) - before
    print(f'serving worker peak RSS {before:.0f} MB -> {before + growth:.0f} MB over the sized requests')
    assert growth < 64, growth  # ArcFace's 100000 x 65536 weights would be 26 GB; 62.5M dims took 954 MB before
    assert sorted(r.name for r in service.client.list_runs()) == sorted(runs)


def test_3_a_bad_byte_names_the_file_and_line_and_never_its_contents(service: Service):
    detail = refused(service, '/train', train({'train_data': 'leak.csv'}), 400, r'leak.csv line 5002: not utf-8 text')
    assert 'secret' not in detail
    detail = refused(
        service,
        '/evaluate',
        {'data': [], 'parameters': {'data': 'leak.csv'}},
        400,
        r'leak.csv line 5002: not utf-8 text',
    )
    assert 'secret' not in detail


def test_4_wide_and_long_csv_lines_are_refused_in_a_short_message(service: Service):
    log_before = service.log.stat().st_size
    start = time.monotonic()
    refused(service, '/train', train({'train_data': 'wide.csv'}), 400, r'wide.csv line 1: longer than the 1048576')
    detail = refused(
        service, '/train', train({'train_data': 'columns.csv'}), 400, r'columns.csv line 1: 5000 columns, more than'
    )
    assert 'c4999' not in detail  # the count, not the columns
    refused(service, '/train', train({'train_data': 'field.csv'}), 400, r'field.csv line 2: .*field larger than')
    print(f'wide CSVs refused in {time.monotonic() - start:.1f} s (with the /encode after each)')
    assert service.log.stat().st_size - log_before < 100_000  # 65 MB of log for one request before


def test_5_lone_surrogates_answer_400_naming_the_field(service: Service):
    body = b'{"data": [{"id": "s", "text": "\\ud800abc"}], "parameters": {}}'
    refused(service, '/encode', body, 400, r"document 's': its text holds a lone surrogate")
    body = b'{"data": [{"id": "\\udfffid", "text": "abc"}], "parameters": {}}'
    refused(service, '/encode', body, 400, r'its id holds a lone surrogate')
    # parameters: jina turns them into protobuf before the executor sees them, which fails on a lone surrogate
    body = b'{"data": [], "parameters": {"loss_options": {"\\ud800x": 1}}}'
    refused(service, '/train', body, 400, r"holds a lone surrogate .* in the text '\\ud800x'")
    body = b'{"data": [], "parameters": {"model": "\\ud800"}}'
    refused(service, '/encode', body, 400, r'holds a lone surrogate')


def test_6_csv_options_and_files_that_are_not_csv(service: Service):
    for encoding in ('rot13', 'uu_codec'):
        refused(
            service,
            '/train',
            train({'train_data': 'bom.csv', 'csv_options': {'encoding': encoding}}),
            422,
            rf"'{encoding}' is not a text encoding",
        )
    refused(
        service,
        '/train',
        train({'train_data': 'u16.csv', 'csv_options': {'encoding': 'utf-16'}}),
        400,
        r'u16.csv line 1: not utf-16 text',
    )
    refused(service, '/train', train({'train_data': 'dup.csv'}), 400, r"dup.csv line 1: the header names \['uri'\]")
    refused(service, '/train', train({'train_data': 'fifo.csv'}), 400, r"'fifo.csv' is not a regular file")
    reply = post(service, '/train', train({'train_data': 'bom.csv', 'run_name': 'bom'}))  # the BOM is no column
    assert reply.status_code == 200, reply.text[:300]
    service.client.get_run('bom').cancel()


def test_7_options_are_checked_against_the_constructor_before_a_run_exists(service: Service):
    runs = sorted(r.name for r in service.client.list_runs())
    cases = [
        ({'loss_options': {'distance': 'os.system'}}, r"option 'distance' takes a Python object .*got 'os.system'"),
        ({'loss_options': {'distance': {'a': 1}}}, r"option 'distance' takes a Python object .*not a JSON object"),
        ({'loss_options': {'margin': 'nan'}}, r"option 'margin' takes a value like its default 0.05, not a string"),
        ({'loss_options': {'swap': 1}}, r"option 'swap' takes true or false"),
        ({'optimizer_options': {'weight_decay': True}}, r"Adam option 'weight_decay' .*not a boolean"),
    ]
    for parameters, expected in cases:
        refused(service, '/train', train(parameters), 400, expected)
    assert sorted(r.name for r in service.client.list_runs()) == runs
    # JSON numbers arrive as floats; ArcFace takes ints
    options = {'num_classes': 10, 'embedding_size': 16}
    reply = post(service, '/train', train({'loss': 'ArcFaceLoss', 'loss_options': options, 'run_name': 'arcface'}))
    assert reply.status_code == 200, reply.text[:300]
    service.client.get_run('arcface').cancel()
    refused(service, '/encode', {'data': [], 'parameters': {'truncate_dim': True}}, 422, r'not true or false')


def test_8_over_long_paths_and_names_are_400(service: Service):
    refused(
        service,
        '/train',
        train({'train_data': 'a/' * 250_000}),
        400,
        r'the path .*characters more\) is longer than a file path can be',
    )
    one = [{'tensor': [[0, 0], [0, 0]]}]
    refused(service, '/encode', {'data': one, 'parameters': {'model': 'm' * 500_000}}, 400, r'unknown model')
    detail = refused(
        service, '/encode', {'data': [{'uri': 'x' * 300}], 'parameters': {}}, 400, r'longer than a file path'
    )
    assert len(detail) < 1000


def test_9_an_artifact_asked_for_while_it_is_deleted_is_404(service: Service):
    client = service.client
    client.fit(train_data='r2', run_name='doomed', wait=True, **TINY)
    run = {'data': [], 'parameters': {'run_id': 'doomed'}}
    replies: list[requests.Response] = []

    def artifact() -> None:
        for _ in range(200):  # until the run is gone
            replies.append(post(service, '/runs/artifact', run))
            if replies[-1].status_code != 200:
                return

    thread = threading.Thread(target=artifact)
    thread.start()
    time.sleep(0.05)
    while 'still exiting' in (deleted := post(service, '/runs/delete', run)).text:  # its process is ending
        time.sleep(0.1)
    thread.join()
    assert deleted.status_code == 200, deleted.text[:300]
    assert {reply.status_code for reply in replies} <= {200, 404}, [r.text[:300] for r in replies]
    assert replies[-1].status_code == 404 and "unknown run_id 'doomed'" in replies[-1].json()['detail']
    service.still_serves()


def test_10_the_readme_command_gives_up_with_its_client_and_stops_on_sigterm(
    tmp_path: Path, free_port: Callable[[], int]
):
    """`jina executor --uses config.yml` (README): gRPC straight to the worker, so a client that gives up cancels
    the request there (a Deployment's gateway carries no cancellation on to its worker: there max_model_names bounds
    the work). SIGTERM ends the command's main process at once; its worker held the port for good before."""
    port, log = free_port(), tmp_path / 'executor.log'
    command = [str(JINA), 'executor', '--uses', 'config.yml', '--port', str(port), '--host', '127.0.0.1']
    command += ['--workspace', str(tmp_path / 'ws'), '--uses-with', json.dumps({'runtime': 'torch', **SETTINGS})]
    env = {**os.environ, 'JINA_OPTOUT_TELEMETRY': '1', 'PYTHONPATH': str(ROOT)}
    with open(log, 'w') as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while ping('executor', f'127.0.0.1:{port}') != 0:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        processes = [process.pid, *_children(process.pid)]
        client = Client(host=f'grpc://127.0.0.1:{port}')
        names = {'names': list_models()[:LONG_NAMES]}
        with pytest.raises(ConnectionError, match='DEADLINE_EXCEEDED'):  # the client gives up after 3 s
            client.post('/models', inputs=DocList[FinetunerDoc](), parameters=names, timeout=3)
        while 'describing models stopped after' not in log.read_text(errors='replace'):
            assert time.monotonic() < deadline, log.read_text(errors='replace')[-2000:]
            time.sleep(0.2)
        long = threading.Thread(target=_ignore, args=(lambda: client.post('/models', parameters=names, timeout=60),))
        long.start()
        time.sleep(3)  # measuring models
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        while any(_alive(pid) for pid in processes) and time.monotonic() - start < 10:
            time.sleep(0.1)
        stopped = time.monotonic() - start
        print(f'jina executor: SIGTERM during /models stopped every process in {stopped:.1f} s')
        assert not any(_alive(pid) for pid in processes), log.read_text(errors='replace')[-2000:]
        assert ping('executor', f'127.0.0.1:{port}') != 0  # nothing holds the port
        long.join()
    finally:
        for pid in [process.pid, *_children(process.pid)]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        process.wait()


def test_11_sigterm_stops_the_service_within_10_s_during_a_long_request(service: Service):
    names = list_models()[:LONG_NAMES]
    processes = [service.process.pid, *_children(service.process.pid)]
    thread = threading.Thread(
        target=lambda: _ignore(lambda: post(service, '/models', {'data': [], 'parameters': {'names': names}}, 60))
    )
    thread.start()
    time.sleep(3)  # measuring models
    start = time.monotonic()
    os.killpg(service.process.pid, signal.SIGTERM)
    try:
        service.process.wait(10)
        while any(_alive(pid) for pid in processes) and time.monotonic() - start < 10:
            time.sleep(0.1)
        stopped = time.monotonic() - start
    finally:
        stop_service(service.process)
    print(f'SIGTERM during /models: the service stopped in {stopped:.1f} s')
    assert not any(_alive(pid) for pid in processes)
    thread.join()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return False
    return stat.rsplit(')', 1)[1].split()[0] != 'Z'


def _ignore(call: Callable[[], object]) -> None:
    try:
        call()
    except (requests.RequestException, ConnectionError):  # the service stopped under it
        pass
