"""The operator's settings come from KUBETUNE_* variables, each declared once (kubetune/settings.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kubetune import settings
from kubetune.settings import Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(settings.ENV_PREFIX):
            monkeypatch.delenv(name)


def test_defaults_without_variables() -> None:
    got = Settings()
    assert got.trainer_image == settings.DEFAULT_TRAINER_IMAGE and got.namespaces == ()
    assert got.report_listen == "0.0.0.0:8081" and got.report_url is None and got.resync_seconds == 30
    assert got.report_key_generated and len(got.report_key) == 32
    assert got.report_key != Settings().report_key  # a random key per start


def test_variables_are_parsed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    for name, value in {
        "NAMESPACES": " team-a, ,team-b ", "S3_INSECURE": "yes", "DEFAULT_NODE_SELECTOR": '{"pool": "gpu"}',
        "TRAINER_COMMAND": '["python", "fake.py"]', "REPORT_URL": "http://op:8081/", "LOG_LEVEL": "debug",
        "REPORT_KEY_FILE": str(key), "STATUS_INTERVAL": "0.5", "TERMINATION_GRACE_SECONDS": "1800",
        "RESTRICT_IMAGES_AND_SERVICE_ACCOUNTS": "true", "TRAINER_IMAGE": "",
    }.items():
        monkeypatch.setenv(f"KUBETUNE_{name}", value)
    got = Settings()
    assert got.namespaces == ("team-a", "team-b") and got.s3_insecure and got.default_node_selector == {"pool": "gpu"}
    assert got.trainer_command == ("python", "fake.py") and got.report_url == "http://op:8081"
    assert got.log_level == "DEBUG" and got.status_interval == 0.5 and got.termination_grace_seconds == 1800
    assert got.report_key == b"s3cret" and not got.report_key_generated
    assert got.restrict_images_and_service_accounts
    assert got.trainer_image == settings.DEFAULT_TRAINER_IMAGE  # empty: the default


def test_an_empty_listen_address_turns_the_report_server_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_REPORT_LISTEN", "")
    assert Settings().report_listen is None


def test_the_key_itself_may_be_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_REPORT_KEY", "abc")
    got = Settings()
    assert got.report_key == b"abc" and not got.report_key_generated
    assert "abc" not in repr(got)


@pytest.mark.parametrize(("name", "value"), [("RESYNC_SECONDS", "soon"), ("S3_INSECURE", "maybe"),
                                             ("DEFAULT_NODE_SELECTOR", "pool=gpu")])
def test_a_bad_value_is_refused_at_start_up_naming_the_setting(monkeypatch: pytest.MonkeyPatch, name: str,
                                                               value: str) -> None:
    monkeypatch.setenv(f"KUBETUNE_{name}", value)
    with pytest.raises((ValidationError, ValueError), match=name.lower()):
        Settings()


def test_the_docs_table_is_the_model() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    assert settings.markdown_table() in docs, "run `kubetune crd` (docs/operations.md's settings table)"
