"""HTTPS with a self-signed certificate made here, through the openai client trusting only that certificate;
--root-path behind it; a key that does not load is one line at start-up."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import openai
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.server.conftest import start_server, stop_server


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_file, cert_file = folder / "key.pem", folder / "cert.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


def test_https_with_a_self_signed_certificate(tiny_chat_model: Path, tmp_path: Path) -> None:
    key_file, cert_file = _self_signed(tmp_path)
    server = start_server(str(tiny_chat_model), tmp_path / "serve.log", "--ssl-keyfile", str(key_file),
                          "--ssl-certfile", str(cert_file), "--root-path", "/llm", "--kv-cache-memory", "32MiB",
                          scheme="https")
    try:
        trusted = ssl.create_default_context(cafile=str(cert_file))
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                               http_client=httpx.Client(verify=trusted))
        reply = client.completions.create(model=client.models.list().data[0].id, prompt="secure", max_tokens=3)
        assert reply.choices[0].text is not None
        assert f"serving {tiny_chat_model} on https://127.0.0.1:" in server.log_text()
        assert httpx.get(f"{server.url}/openapi.json", verify=trusted).json()["servers"] == [{"url": "/llm"}]
        try:
            httpx.get(f"{server.url}/health")  # the default trust store does not know this certificate
            raise AssertionError("an unknown certificate was trusted")
        except httpx.ConnectError as error:
            assert "CERTIFICATE_VERIFY_FAILED" in str(error)
    finally:
        stop_server(server)


def test_a_key_that_does_not_load_is_one_line(tmp_path: Path) -> None:
    key_file, cert_file = _self_signed(tmp_path)
    key_file.write_text("not a key")
    done = subprocess.run([sys.executable, "-m", "paged.cli.main", "serve", "--ssl-keyfile", str(key_file),
                           "--ssl-certfile", str(cert_file)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "TLS: cannot load --ssl-certfile/--ssl-keyfile" in done.stderr
