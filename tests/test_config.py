"""Configuration: defaults, the example file, validation messages, env overrides."""

from __future__ import annotations

import tomllib
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from triage_node.config import (
    DEFAULT_AE_TITLE,
    DEFAULT_DICOM_PORT,
    CallerRule,
    build_config,
    load_config,
)
from triage_node.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_defaults(tmp_path: Path) -> None:
    cfg = load_config(None, env={"TRIAGE_NODE_DATA_DIR": str(tmp_path)})
    assert cfg.dicom.ae_title == DEFAULT_AE_TITLE == "ICHTRIAGE"
    assert cfg.dicom.port == DEFAULT_DICOM_PORT == 11112
    assert cfg.dicom.allowed_callers == ()
    assert cfg.storage.path == tmp_path / "spool"
    assert cfg.database.url == f"sqlite:///{tmp_path / 'triage-node.db'}"
    assert cfg.storage.fsync is True
    assert cfg.source == "built-in defaults"


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(None, env={"TRIAGE_NODE_DATA_DIR": str(tmp_path)})
    with pytest.raises(FrozenInstanceError):
        cfg.dicom.port = 1  # type: ignore[misc]


def test_example_file_matches_defaults(tmp_path: Path) -> None:
    """config.example.toml documents the defaults: loading it changes nothing."""
    env = {"TRIAGE_NODE_DATA_DIR": str(tmp_path)}
    example = load_config(ROOT / "config.example.toml", env=env)
    defaults = load_config(None, env=env)
    assert example.dicom == defaults.dicom
    assert example.storage == defaults.storage
    assert example.database == defaults.database
    assert example.api == defaults.api
    assert example.logging == defaults.logging


def test_example_documents_every_key() -> None:
    """Every key of every section appears in the example (commented or not)."""
    text = (ROOT / "config.example.toml").read_text()
    from triage_node import config as c

    sections = [cls for name, cls in vars(c).items()
                if name.endswith("Config") and name != "Config" and hasattr(
                    cls, "__dataclass_fields__")]
    assert len(sections) >= 9, sections
    for cls in sections:
        for name in cls.__dataclass_fields__:
            if name == "tls":  # a table of its own: [dicom.tls]
                assert "[dicom.tls]" in text
                continue
            assert f"{name} =" in text, f"{cls.__name__}.{name} undocumented"


def test_file_values_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        """
data_dir = "data"
[dicom]
ae_title = "TRIAGE2"
port = 4242
allowed_callers = [{ae_title = "CT1", host = "10.0.0.5"}, {ae_title = "PACS"}]
[storage]
path = "spool2"
"""
    )
    cfg = load_config(tmp_path / "c.toml", env={})
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.storage.path == tmp_path / "spool2"
    assert cfg.database.url.endswith(str(tmp_path / "data" / "triage-node.db"))
    assert cfg.dicom.allowed_callers == (CallerRule("CT1", "10.0.0.5"), CallerRule("PACS", ""))
    assert cfg.dicom.allowed_callers[0].matches("CT1", "10.0.0.5")
    assert not cfg.dicom.allowed_callers[0].matches("CT1", "10.0.0.6")
    assert cfg.dicom.allowed_callers[1].matches("PACS", "192.168.1.1")
    assert cfg.source == str(tmp_path / "c.toml")


def test_env_overrides_secrets(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[database]\nurl = "sqlite:///x.db"\n[api]\ntoken = "a"\n')
    env = {
        "TRIAGE_NODE_DATABASE_URL": "postgresql+psycopg://u:secret@db/triage",
        "TRIAGE_NODE_API_TOKEN": "tok",
        "TRIAGE_NODE_BROKER_URL": "redis://:pw@127.0.0.1:6379/0",
    }
    cfg = load_config(tmp_path / "c.toml", env=env)
    assert cfg.database.url == env["TRIAGE_NODE_DATABASE_URL"]
    assert cfg.api.token == "tok"
    shown = str({k: v for k, v in cfg.redacted().items() if k != "source"})
    assert "secret" not in shown and "tok'" not in shown and ":pw@" not in shown
    assert "u:***@db" in shown


def test_env_names_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[dicom]\nport = 5555\n')
    cfg = load_config(None, env={"TRIAGE_NODE_CONFIG": str(tmp_path / "c.toml")})
    assert cfg.dicom.port == 5555


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[dicom]\nport = 70000', "dicom.port = 70000"),
        ('[dicom]\nport = "11112"', "dicom.port = '11112': expected an integer"),
        ('[dicom]\nae_title = "THIS_IS_TOO_LONG_FOR_AE"', "dicom.ae_title"),
        ('[dicom]\nae_title = "A\\\\B"', "dicom.ae_title"),
        ('[dicom]\nportt = 1', "unknown key dicom.portt"),
        ('[dicom]\nallowed_callers = [{ae_title = "X", host = "not-an-ip"}]',
         "dicom.allowed_callers[0].host = 'not-an-ip'"),
        ('[dicom]\nallowed_callers = "CT1"', "dicom.allowed_callers"),
        ('[dicom]\nmax_pdu_size = 100', "dicom.max_pdu_size = 100"),
        ('[dicom.tls]\ncert = "/nonexistent.pem"', "dicom.tls.cert = '/nonexistent.pem'"),
        ('[storage]\nfsync = "yes"', "storage.fsync = 'yes': expected true or false"),
        ('[database]\nurl = "mysql://x"', "database.url"),
        ('[logging]\nlevel = "LOUD"', "logging.level = 'LOUD'"),
        ('[[destinations]]\nae_title = "PACS"\nhost = "pacs"\nport = 0',
         "destinations[0].port = 0"),
        ('colour = "blue"', "unknown key colour"),
    ],
)
def test_invalid_values_name_key_and_value(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "c.toml").write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.toml", env={})
    assert message in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", env={})
    (tmp_path / "bad.toml").write_text("[dicom\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml", env={})


def test_destinations_parsed() -> None:
    data = tomllib.loads('[[destinations]]\nae_title = "PACS"\nhost = "10.0.0.9"\nport = 104\n'
                        '[[destinations]]\nae_title = "PACS2"\nhost = "pacs2"\nport = 11112\n')
    cfg = build_config(data, env={"TRIAGE_NODE_DATA_DIR": "/tmp/x"})
    assert [d.ae_title for d in cfg.destinations] == ["PACS", "PACS2"]
    assert cfg.destinations[1].port == 11112


def test_triage_section(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        '[triage]\nmin_slices = 20\nbody_parts = ["head"]\ndescription_patterns = ["^ct"]\n')
    cfg = load_config(tmp_path / "c.toml", env={})
    assert cfg.triage.min_slices == 20 and cfg.triage.body_parts == ("HEAD",)
    (tmp_path / "c.toml").write_text('[triage]\ndescription_patterns = ["(unclosed"]\n')
    with pytest.raises(ConfigError, match=r"triage\.description_patterns"):
        load_config(tmp_path / "c.toml", env={})
    (tmp_path / "c.toml").write_text('[triage]\nbody_parts = "HEAD"\n')
    with pytest.raises(ConfigError, match="expected a list of strings"):
        load_config(tmp_path / "c.toml", env={})


def test_model_defaults_to_the_packaged_demo_model_unless_disabled(tmp_path: Path) -> None:
    from triage_node.config import packaged_model_path

    cfg = load_config(None, env={"TRIAGE_NODE_DATA_DIR": str(tmp_path)})
    assert cfg.model.path == str(packaged_model_path() or "")
    (tmp_path / "off.toml").write_text("[model]\nenabled = false\n")
    assert load_config(tmp_path / "off.toml", env={}).model.path == ""
    (tmp_path / "own.toml").write_text('[model]\npath = "/models/ich.tnm"\n')
    assert load_config(tmp_path / "own.toml", env={}).model.path == "/models/ich.tnm"
