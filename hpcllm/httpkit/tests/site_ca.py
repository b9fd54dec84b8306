"""A site CA and a server certificate for localhost / 127.0.0.1, made with the openssl command (test helper; the
site_ca fixture lives in hpcllm/httpkit/tests/conftest.py and hpcllm/worker/tests/conftest.py)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class SiteCA:
    ca: Path
    cert: Path
    key: Path


def make_site_ca(folder: Path) -> SiteCA:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "key.pem", "server.csr", "cert.pem"))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName = DNS:localhost, IP:127.0.0.1\nbasicConstraints = CA:FALSE\n"
                   "keyUsage = digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
            "-subj", "/CN=hpcllm test site CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return SiteCA(ca=ca, cert=cert, key=key)


def site_ca_or_skip(tmp_path_factory) -> SiteCA:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    return make_site_ca(tmp_path_factory.mktemp("site-ca"))
