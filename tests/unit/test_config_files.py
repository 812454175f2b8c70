"""A file a config key names: missing or a directory is one ConfigError naming that key (the
key the user set, not the one whose default it stood in for)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from diloco.errors import ConfigError, existing_file, make_directory, read_text_file
from diloco.transports.dataplane.tls import client_context, server_context
from diloco.transports.grpc.config import GrpcTransportConfig
from diloco.transports.grpc.hosting import read_fingerprint_file
from diloco.transports.grpc.security import channel_credentials, read_token, self_signed_pair


def test_an_existing_file_is_returned_with_home_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "token").write_text("x")
    assert existing_file("some.key", "~/token") == tmp_path / "token"


@pytest.mark.parametrize(
    ("name", "message"), [("missing", "file '{}' does not exist"), ("", "'{}' is a directory")]
)
def test_a_missing_file_or_a_directory_names_the_key(
    tmp_path: Path, name: str, message: str
) -> None:
    path = tmp_path / name if name else tmp_path
    expected = re.escape("some.key: " + message.format(path))
    with pytest.raises(ConfigError, match=rf"^{expected}"):
        existing_file("some.key", path)


def test_the_certificate_standing_in_for_the_ca_is_named_as_tls_cert(tmp_path: Path) -> None:
    """No tls_ca set: the CA is tls_cert, and a missing one is tls_cert's error (it was
    'transport.grpc.tls_ca: no such file', a key the user never set)."""
    missing = str(tmp_path / "run.crt")
    with pytest.raises(ConfigError, match=r"^transport\.grpc\.tls_cert: file "):
        channel_credentials(GrpcTransportConfig(tls_cert=missing, tls_key=missing))
    with pytest.raises(ConfigError, match=r"^transport\.grpc\.tls_ca: file "):
        channel_credentials(GrpcTransportConfig(tls_cert=missing, tls_key=missing, tls_ca=missing))


def test_the_data_plane_names_the_ca_the_same_way(tmp_path: Path) -> None:
    cert, key = self_signed_pair(tmp_path)
    missing = str(tmp_path / "ca.crt")
    with pytest.raises(ConfigError, match=r"^transport\.grpc\.tls_ca: file "):
        server_context(str(cert), str(key), ca=missing, mutual=True)
    server_context(str(cert), str(key), mutual=True)  # the certificate is its own CA
    with pytest.raises(ConfigError, match=r"^transport\.grpc\.tls_cert: file "):
        server_context(missing, str(key), mutual=True)


@pytest.mark.parametrize("key", ["transport.grpc.token_file", "transport.grpc.fingerprint_file"])
def test_a_directory_given_as_a_file_is_named(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: '.*' is a directory, not a file"):
        if key.endswith("token_file"):
            read_token(GrpcTransportConfig(token_file=str(tmp_path)))
        else:
            read_fingerprint_file(tmp_path)


def test_a_directory_is_made_with_its_parents_or_its_key_is_named(tmp_path: Path) -> None:
    made = make_directory("run.dir", tmp_path / "a" / "b")
    assert made.is_dir() and made == tmp_path / "a" / "b"
    assert make_directory("run.dir", made) == made  # already there: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^run\.dir: '.*file' is a file, not a directory$"):
        make_directory("run.dir", tmp_path / "file")
    with pytest.raises(ConfigError, match=r"^run\.dir: '.*file/sub' cannot be created: Not a dir"):
        make_directory("run.dir", tmp_path / "file" / "sub")


def test_a_binary_file_given_for_text_names_the_key(tmp_path: Path) -> None:
    binary = tmp_path / "token.bin"
    binary.write_bytes(b"\xff\xfe\x00not text")
    with pytest.raises(
        ConfigError, match=r"^some\.key: '.*token\.bin' is not UTF-8 text \(byte 0\)"
    ):
        read_text_file("some.key", binary)
    (tmp_path / "token").write_text(" secret \n")
    assert read_text_file("some.key", tmp_path / "token") == " secret \n"


@pytest.mark.parametrize("transport", ["grpc", "hivemind"])
def test_a_binary_token_file_names_its_key(tmp_path: Path, transport: str) -> None:
    """Was `UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff`, naming nothing."""
    binary = tmp_path / "token.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    key = f"transport.{transport}.token_file"
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .* is not UTF-8 text"):
        if transport == "grpc":
            read_token(GrpcTransportConfig(token_file=str(binary)))
        else:
            from diloco.transports.hivemind import HivemindTransportConfig
            from diloco.transports.hivemind.auth import read_run_token

            read_run_token(HivemindTransportConfig(token_file=str(binary)))


def test_a_file_that_holds_no_certificate_is_named_by_its_key(tmp_path: Path) -> None:
    """Was `SSLError: [X509: NO_CERTIFICATE_OR_CRL_FOUND]`, naming neither key nor file."""
    garbage = tmp_path / "not-a.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"^transport\.grpc\.tls_ca: .* holds no PEM certificate"):
        client_context(str(garbage))
    with pytest.raises(ConfigError, match=r"^transport\.grpc\.tls_cert: .* holds no PEM cert"):
        client_context(str(garbage), ca_key="tls_cert")
    cert, key = self_signed_pair(tmp_path)
    with pytest.raises(ConfigError, match=r"^transport\.grpc\.tls_ca: .* holds no PEM certificate"):
        server_context(str(cert), str(key), ca=str(garbage), mutual=True)
