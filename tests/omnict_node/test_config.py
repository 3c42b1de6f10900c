"""Configuration: embedded defaults, TOML file, OMNICT_* environment overrides."""

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from omnict_node.cli import main
from omnict_node.config import load_settings

REPO = Path(__file__).resolve().parents[2]


def test_defaults_need_no_servers(tmp_path, monkeypatch):
    monkeypatch.delenv("OMNICT_CONFIG", raising=False)
    settings = load_settings(data_dir=str(tmp_path))
    assert settings.database.url == f"sqlite:///{tmp_path / 'omnict.db'}"
    assert settings.is_embedded_broker
    assert settings.storage.root == tmp_path / "storage"


def test_toml_file_then_environment_override(tmp_path, monkeypatch):
    config = tmp_path / "node.toml"
    config.write_text('[dicom]\nae_title = "FROMFILE"\nport = 4242\n[completeness]\nstudy_quiet_s = 7\n')
    monkeypatch.setenv("OMNICT_DICOM__PORT", "5151")
    settings = load_settings(config, data_dir=str(tmp_path))
    assert settings.dicom.ae_title == "FROMFILE"
    assert settings.dicom.port == 5151  # the environment wins over the file
    assert settings.completeness.study_quiet_s == 7


def test_shipped_production_example_is_valid(monkeypatch):
    settings = load_settings(REPO / "deploy" / "omnict.toml")
    assert settings.dicom.allowed_peers[0].ae_title == "PACS"
    assert settings.model.segmentation_backend == "totalsegmentator"


def test_unknown_keys_are_rejected(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[dicom]\nae_tittle = 'TYPO'\n")
    with pytest.raises(ValidationError):
        load_settings(config)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="configuration file not found"):
        load_settings(tmp_path / "nope.toml")


def test_db_upgrade_command_migrates_the_configured_database(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNICT_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    from db.migrate import head_revision

    assert f"database at revision {head_revision()}" in result.output
    assert (tmp_path / "omnict.db").exists()


def test_status_on_an_unmigrated_database_says_to_run_db_upgrade(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, OMNICT_DATA_DIR=str(tmp_path / "fresh"))
    result = subprocess.run([sys.executable, "-m", "omnict_node", "status"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode != 0
    assert "omnict-node db upgrade" in result.stderr and "Traceback" not in result.stderr


def test_embedded_workers_share_the_cores_unless_configured(tmp_path, monkeypatch):
    from omnict_node.serve import EmbeddedWorker, embedded_worker_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    settings = load_settings(data_dir=str(tmp_path))
    assert settings.workers.embedded_queues == ["gpu", "cpu"]
    assert embedded_worker_threads(settings) == 4
    one = load_settings(data_dir=str(tmp_path), workers={"embedded_queues": ["cpu,gpu", "cpu", "cpu"] * 3})
    assert embedded_worker_threads(one) == 1  # never fewer than one
    configured = load_settings(data_dir=str(tmp_path), workers={"embedded_threads": 3})
    assert embedded_worker_threads(configured) == 3
    assert EmbeddedWorker(None, configured, "gpu")._environment()["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # the operator's own setting wins
    assert EmbeddedWorker(None, configured, "gpu")._environment()["OMP_NUM_THREADS"] == "6"
