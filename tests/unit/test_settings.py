"""The executor's settings: declared once (executor/settings.py), the docs' table written from them, config.yml
holding none of its own, and a misspelt one an error of the start (it used to be ignored silently)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from executor.params import ParameterError
from executor.settings import ServiceConfig, markdown_table

ROOT = Path(__file__).resolve().parents[2]


def test_the_docs_table_is_written_from_the_settings():
    docs = (ROOT / 'docs' / 'service.md').read_text()
    assert markdown_table() in docs, 'docs/service.md is stale: paste `python -m executor.settings` into "uses_with"'
    assert docs.count('| `max_request_docs` |') == 1
    assert '| `max_artifact_bytes` | `8589934592` (8 GiB) |' in markdown_table()


def test_config_yml_declares_no_setting_of_its_own():
    config = yaml.safe_load((ROOT / 'config.yml').read_text())
    assert config['jtype'] == 'FinetunerExecutor' and config['with'] == {}
    assert ServiceConfig.model_validate(config['with']) == ServiceConfig()


def test_a_misspelt_setting_stops_the_start_naming_it(tmp_path: Path):
    from executor.executor import FinetunerExecutor

    with pytest.raises(ParameterError, match=r"uses_with: unknown parameter 'batch_sise' \(did you mean 'batch_size'"):
        FinetunerExecutor(batch_sise=3, metas={'workspace': str(tmp_path)})
    with pytest.raises(ParameterError, match=r"parameter 'max_batch_size': Input should be greater than or equal to 1"):
        FinetunerExecutor(max_batch_size=0, metas={'workspace': str(tmp_path)})
    executor = FinetunerExecutor(batch_size=3, data_roots=None, metas={'workspace': str(tmp_path)})
    try:
        assert executor.settings.batch_size == 3 and executor.settings.data_roots == []
        assert executor.data_roots == [str(Path(executor.workspace) / 'data')]
    finally:
        executor.close()
