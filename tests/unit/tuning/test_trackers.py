"""Experiment trackers: a 1-epoch run logged to Weights & Biases offline and to an MLflow file store, each read back
(the offline run's records, the store through MLflow's client); bad `loggers` refused before any training."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from executor.tuning import TrainConfig, fit
from executor.tuning.data.digits import digits_items
from executor.tuning.trackers import flat_params, mlflow_name

# timm's random-init test_resnet (0.4 M weights) on 32 px digits: 2 optimizer steps of 20 images, evaluated before
# and after the epoch
TINY = dict(model='test_resnet', pretrained=False, image_size=32, batch_size=20, epochs=1, seed=0, learning_rate=1e-3)
WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of records, each with a 7-byte header


@pytest.fixture(scope='module')
def items() -> list:
    return digits_items(per_class=4, size=32)


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tracker configuration from the machine; any network use of W&B would go to a closed local port."""
    for name in ('WANDB_MODE', 'WANDB_PROJECT', 'WANDB_DIR', 'MLFLOW_TRACKING_URI', 'MLFLOW_EXPERIMENT_NAME'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('WANDB_BASE_URL', 'http://127.0.0.1:9')
    monkeypatch.setenv('WANDB_API_KEY', '0' * 40)  # not a real key: offline mode must not need or use one


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of an offline W&B run file (``run-<id>.wandb``)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b':W&B'
    pos, pending = 7, b''
    while pos + 7 <= len(data):
        if WANDB_BLOCK - pos % WANDB_BLOCK < 7:  # a block's tail too short for a header is padding
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        _checksum, length, kind = struct.unpack('<IHB', data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b''
            yield record


def test_a_run_logged_to_wandb_offline_reads_back(tmp_path: Path, items: list, isolated: None):
    result = fit(train_data=items, eval_data=items, loggers=['wandb'], output_dir=tmp_path / 'wb-run', **TINY)
    (run_file,) = (tmp_path / 'wb-run' / 'wandb').glob('offline-run-*/run-*.wandb')
    history: list[dict[str, Any]] = []
    config, artifact = {}, None
    for record in wandb_records(run_file):
        kind = record.WhichOneof('record_type')
        if kind == 'history':
            history.append(
                {
                    item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        elif kind == 'run':
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == 'artifact':
            artifact = record.artifact
    batch = [row for row in history if 'train/batch_loss' in row]
    epoch = [row for row in history if 'epoch/train_loss' in row]
    print(f'W&B offline: {len(batch)} batch rows, epoch row {epoch}, {len(config)} config keys')
    assert [row['step'] for row in batch] == [1, 2]
    assert len(epoch) == 1 and epoch[0]['epoch'] == 1
    assert epoch[0]['epoch/train_loss'] == pytest.approx(result.history[0]['train_loss'])
    assert epoch[0]['epoch/ndcg@10'] == pytest.approx(result.history[0]['ndcg@10'])
    assert config['model'] == 'test_resnet' and config['epochs'] == 1 and config['task'] == 'metric'
    assert config['loggers'] == ['wandb'] and config['scheduler_options']['num_warmup_steps'] == 0
    assert artifact is not None and artifact.type == 'model' and artifact.name == 'wb-run-model'
    files = {entry.path for entry in artifact.manifest.contents}
    assert {'model.pt', 'preprocessing.json', 'config.json', 'history.jsonl'} <= files
    assert not (tmp_path / 'wb-run' / 'tensorboard').exists()  # loggers replaced the default


def test_a_run_logged_to_an_mlflow_file_store_reads_back(tmp_path: Path, items: list, isolated: None):
    from mlflow.tracking import MlflowClient

    output = tmp_path / 'ml-run'
    result = fit(train_data=items, eval_data=items, loggers=['tensorboard', 'mlflow'], output_dir=output, **TINY)
    client = MlflowClient(tracking_uri=(output / 'mlruns').resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name('finetuner-executor').experiment_id])
    batch = client.get_metric_history(run.info.run_id, 'train/batch_loss')
    print(f'MLflow: status {run.info.status}, metrics {sorted(run.data.metrics)}, {len(run.data.params)} params')
    assert run.info.status == 'FINISHED' and run.info.run_name == 'ml-run'
    assert [m.step for m in batch] == [1, 2]
    assert run.data.metrics['epoch/train_loss'] == pytest.approx(result.history[0]['train_loss'])
    assert run.data.metrics['epoch/ndcg_at_10'] == pytest.approx(result.history[0]['ndcg@10'])
    params = run.data.params
    assert (
        params['model'] == 'test_resnet'
        and params['epochs'] == '1'
        and params['loggers'] == '["tensorboard", "mlflow"]'
    )
    assert params['scheduler_options.num_warmup_steps'] == '0.0'
    logged = {f.path for f in client.list_artifacts(run.info.run_id, 'model')}
    assert {'model/model.pt', 'model/preprocessing.json', 'model/reports'} <= logged
    assert (output / 'tensorboard').is_dir()  # and TensorBoard beside it


def test_mlflow_names_and_parameters():
    assert mlflow_name('epoch/ndcg@10') == 'epoch/ndcg_at_10'
    assert mlflow_name('epoch/accuracy/cat (big)') == 'epoch/accuracy/cat _big_'
    params = flat_params({'a': {'b': 1, 'c': [1, 2]}, 'd': None, 'e': 'x' * 600, 'f': {}})
    assert params == {'a.b': '1', 'a.c': '[1, 2]', 'd': 'null', 'e': 'x' * 497 + '...', 'f': '{}'}


def test_an_unknown_logger_is_refused_naming_the_allowed_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown logger 'wandbb' \(did you mean 'wandb'\?\); allowed: 'tensorboard', 'wandb', 'mlflow'",
    ):
        TrainConfig(loggers=['wandbb'])
    with pytest.raises(ValueError, match='tensorboard=False and loggers=.* disagree'):
        TrainConfig(loggers=['tensorboard'], tensorboard=False)
    assert TrainConfig(tensorboard=False).active_loggers == []
    assert TrainConfig(loggers=['mlflow', 'mlflow']).loggers == ['mlflow']


@pytest.mark.parametrize(('name', 'package'), [('wandb', 'wandb'), ('mlflow', 'mlflow-skinny')])
def test_a_tracker_that_is_not_installed_is_refused_with_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, name: str, package: str
):
    monkeypatch.setitem(sys.modules, name, None)  # `import <name>` fails as it does where it is not installed
    with pytest.raises(ValueError, match=rf"logger '{name}' needs the '{package}' package, which is not installed"):
        TrainConfig(loggers=[name])
    from executor.tuning.trackers import tracker_callbacks

    (callback,) = tracker_callbacks([name], Path('unused'))
    with pytest.raises(ImportError, match=rf'pip install {package}'):
        callback.on_fit_start(None)
