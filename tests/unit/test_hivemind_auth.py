"""The hivemind run token: its tags, where it is read from, and the keys it separates."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("hivemind")

from diloco.errors import ConfigError  # noqa: E402
from diloco.transports.hivemind.auth import RunToken, read_run_token  # noqa: E402
from diloco.transports.hivemind.config import HivemindTransportConfig  # noqa: E402
from diloco.transports.hivemind.records import group_prefix  # noqa: E402

SECRET = "a-run-token-of-32-characters-xyz"
FINGERPRINT = {"model": "gpt", "outer.inner_steps": "50"}


def test_a_member_proof_holds_only_for_its_peer_and_token() -> None:
    token = RunToken(SECRET, "run")
    proof = token.member_proof("QmPeerA")
    assert token.is_member("QmPeerA", proof)
    assert not token.is_member("QmPeerB", proof)  # copied by another peer: worthless
    assert not RunToken(SECRET + "!", "run").is_member("QmPeerA", proof)
    assert not RunToken(SECRET, "other-run").is_member("QmPeerA", proof)
    for forged in (None, "", 42, proof[:-1] + ("0" if proof[-1] != "0" else "1")):
        assert not token.is_member("QmPeerA", forged)


def test_tags_cover_every_field_and_never_show_the_secret() -> None:
    token = RunToken(SECRET, "run")
    tag = token.sign("progress", "QmPeerA", 3, "sha")
    assert token.verify(tag, "progress", "QmPeerA", 3, "sha")
    assert not token.verify(tag, "progress", "QmPeerA", 4, "sha")
    assert not token.verify(tag, "member", "QmPeerA")
    assert SECRET not in repr(token) and SECRET not in tag and SECRET not in token.group_tag()


def test_islands_with_another_token_or_none_use_another_prefix() -> None:
    token = RunToken(SECRET, "run")
    with_token = group_prefix("run", FINGERPRINT, token)
    assert with_token == group_prefix("run", FINGERPRINT, RunToken(SECRET, "run"))
    assert with_token != group_prefix("run", FINGERPRINT, RunToken(SECRET + "!", "run"))
    assert with_token != group_prefix("run", FINGERPRINT, None)
    assert "." not in with_token  # hivemind prefixes may not hold dots


def test_no_token_is_configured_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DILOCO_TOKEN", SECRET)  # set for grpc: hivemind does not read it
    assert read_run_token(HivemindTransportConfig()) is None


def test_the_token_is_read_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_RUN_TOKEN", f"  {SECRET}\n")
    assert read_run_token(HivemindTransportConfig(token_env="MY_RUN_TOKEN")) == SECRET


def test_a_token_file_is_read_instead_of_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DILOCO_TOKEN", "x" * 20)
    path = tmp_path / "token"
    path.write_text(SECRET + "\n")
    settings = HivemindTransportConfig(token_env="DILOCO_TOKEN", token_file=str(path))
    assert read_run_token(settings) == SECRET


def test_a_configured_token_must_be_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DILOCO_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"no run token: \$DILOCO_TOKEN .*token_env\) is empty"):
        read_run_token(HivemindTransportConfig(token_env="DILOCO_TOKEN"))
    monkeypatch.setenv("DILOCO_TOKEN", "short")
    with pytest.raises(ConfigError, match="must be at least 16 characters, got 5"):
        read_run_token(HivemindTransportConfig(token_env="DILOCO_TOKEN"))
    missing = tmp_path / "absent"
    with pytest.raises(
        ConfigError, match=r"^transport.hivemind.token_file: file .*absent.* does not exist"
    ):
        read_run_token(HivemindTransportConfig(token_file=str(missing)))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="no run token: transport.hivemind.token_file"):
        read_run_token(HivemindTransportConfig(token_file=str(empty)))


def test_token_env_must_name_a_variable() -> None:
    with pytest.raises(ConfigError, match=r"transport.hivemind.token_env must be an environment"):
        HivemindTransportConfig(token_env="$DILOCO_TOKEN")
