"""The processes ``meltica live start`` spawns for a deployment (the contract's command lines) and where it
keeps their logs and state."""

from __future__ import annotations

from pathlib import Path

import pytest

from meltica.config.settings import MelticaSettings
from meltica.live.supervisor import RestartPolicy, deployment_children, state_dir_of


def settings(**live: object) -> MelticaSettings:
    return MelticaSettings(environment="dev", live=live)


def test_children_are_ingest_each_worker_and_sinks_with_the_contract_command_lines(tmp_path: Path) -> None:
    config = tmp_path / "live.yaml"
    s = settings(workers=[{"name": "md", "stages": ["candles"]}, {"name": "trade", "stages": ["risk", "execution"]}])
    children = deployment_children(s, config, python="PY")
    path = str(config.resolve())
    assert [(c.name, c.argv) for c in children] == [
        ("ingest", ("PY", "-m", "streams.ingest", "--config", path)),
        ("worker-md", ("PY", "-m", "streams.worker", "--settings", path, "--worker", "md")),
        ("worker-trade", ("PY", "-m", "streams.worker", "--settings", path, "--worker", "trade")),
        ("sinks", ("PY", "-m", "streams.sinks", "--settings", path)),
    ]


def test_no_sinks_process_when_the_deployment_has_none(tmp_path: Path) -> None:
    names = [c.name for c in deployment_children(settings(sinks=False), tmp_path / "f.yaml", python="PY")]
    assert names == ["ingest", "worker-pipeline"]  # the default worker


def test_state_dir_from_settings_then_environment_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert state_dir_of(settings(state_dir="/srv/live")) == Path("/srv/live")
    monkeypatch.setenv("MELTICA_STATE_DIR", "/var/meltica")
    assert state_dir_of(settings()) == Path("/var/meltica/live")
    monkeypatch.delenv("MELTICA_STATE_DIR")
    assert state_dir_of(settings()) == Path(".meltica/live")


def test_back_off_doubles_and_is_capped() -> None:
    policy = RestartPolicy(initial_backoff_s=1.0, factor=2.0, max_backoff_s=5.0)
    assert [policy.backoff(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
