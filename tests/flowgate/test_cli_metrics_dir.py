"""``flowgate engine|ambassador`` pick Prometheus's in-process or multiprocess mode before
prometheus_client is imported (flowgate/cli.py ``_metrics_dir``)."""

from __future__ import annotations

import os

import pytest

from flowgate import cli


@pytest.mark.parametrize("name", ["PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"])
def test_an_empty_variable_means_in_process_metrics_for_one_worker(monkeypatch, name) -> None:
    """prometheus_client switches to mmap-backed values (written into the working
    directory) when the variable merely exists: set but empty — as `flowgate up` and the
    benches pass it — must mean unset."""
    monkeypatch.setenv(name, "")
    cli._metrics_dir("test-", workers=1)
    assert name not in os.environ


def test_several_workers_get_a_fresh_directory(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "counter_123.db").write_bytes(b"stale")
    cli._metrics_dir("test-", workers=2)
    assert os.listdir(tmp_path / "metrics") == []
