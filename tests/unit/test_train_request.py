"""One /train request: its TrainConfig validated once in the service, never in the training process, which loads
the plan the service saved and trains it without reading the data again."""

from __future__ import annotations

import json
from pathlib import Path

from executor.tuning.data.digits import write_digits_folder
from executor.tuning.plan import PLAN_FILE

TINY = dict(model='resnet18', pretrained=False, image_size=32, epochs=1, batch_size=8, device='cpu', tensorboard=False)


def test_one_train_request_validates_its_config_once_and_the_training_process_never(
    tmp_path: Path, validations, monkeypatch
):
    """Issue 28: a /train validated TrainConfig four times (params.py twice, executor.py, worker.py) and read its data
    and decided its task twice (service, then worker)."""
    from docarray import DocList

    from executor.docs import FinetunerDoc
    from executor.executor import FinetunerExecutor
    from executor.params import TrainParams, parse
    from executor.service.jobs import JobQueue
    from executor.service.worker import train_run

    monkeypatch.setattr(JobQueue, 'submit', lambda self, run_id: None)  # the test trains the run itself, below
    executor = FinetunerExecutor(metas={'workspace': str(tmp_path / 'ws')})
    try:
        write_digits_folder(Path(executor.workspace) / 'data' / 'digits', per_class=2, size=16)
        validations.count = 0
        # what the /train endpoint does with a request: parse its parameters, then create the run
        params = parse(TrainParams, {**TINY, 'train_data': 'digits', 'run_name': 'once'}, '/train')
        state = executor._create_run(DocList[FinetunerDoc](), params)
        assert validations.count == 1
    finally:
        executor.close()
    folder = Path(executor.workspace) / 'runs' / state.run_id
    assert json.loads((folder / PLAN_FILE).read_text())['counts'] == {'train': 20}

    read = []
    monkeypatch.setattr('executor.tuning.data.sources.load_items', lambda *a, **k: read.append(a))
    monkeypatch.setattr('executor.tuning.plan.load_items', lambda *a, **k: read.append(a))
    validations.count = 0
    assert train_run(folder) == 0  # the training process, in this one: it loads the plan and trains it
    assert validations.count == 0 and read == []  # no config validated again, no data read again
    status = json.loads((folder / 'status.json').read_text())
    assert status['status'] == 'FINISHED' and (folder / 'model.pt').is_file()
