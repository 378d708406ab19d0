"""Throwaway credentials for a deployment: a CA, per-host TLS certificates with IP SANs (openssl), per-client
tokens, and SuperNode key pairs for Flower's SuperNode authentication.

For a test bed or a first deployment. In production, use your organisation's CA; the files these functions
write have the layout the parties expect, so either source works.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Sequence


def _openssl(*args: str, cwd: Path | None = None) -> None:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {r.stderr.strip()[-400:]}")


def _private(path: Path) -> None:
    os.chmod(path, 0o600)


def make_ca(directory: Path, name: str = "lesft throwaway CA", days: int = 7) -> tuple[Path, Path]:
    """A self-signed CA (EC P-256) in ``directory``: (ca.pem, ca.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "ca.pem", directory / "ca.key"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    _private(key)
    _openssl("req", "-x509", "-new", "-key", str(key), "-sha256", "-days", str(days), "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-out", str(cert))
    return cert, key


def make_cert(directory: Path, name: str, ca: tuple[Path, Path], ips: Sequence[str] = (),
              dns: Sequence[str] = (), days: int = 7, client: bool = False) -> tuple[Path, Path]:
    """A certificate for host ``name`` signed by ``ca``, valid for ``ips`` and ``dns`` names (SANs):
    (NAME.pem, NAME.key) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, csr = directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    sans = [f"IP:{ipaddress.ip_address(ip)}" for ip in ips] + [f"DNS:{d}" for d in dns]
    if not sans and not client:
        raise ValueError(f"certificate {name}: a server certificate needs at least one IP or DNS name")
    usage = "clientAuth" if client else "serverAuth"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   f"extendedKeyUsage={usage}\n" + (f"subjectAltName={','.join(sans)}\n" if sans else ""))
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    _private(key)
    _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", str(days), "-sha256", "-extfile", str(ext), "-out", str(cert))
    csr.unlink()
    ext.unlink()
    return cert, key


def cert_sans(cert: Path) -> list[str]:
    """The subjectAltName entries of ``cert`` as openssl prints them ("IP Address:10.77.0.2", ...)."""
    r = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
                       capture_output=True, text=True, check=True)
    lines = [ln.strip() for ln in r.stdout.splitlines()[1:] if ln.strip()]
    return [s.strip() for ln in lines for s in ln.split(",")]


def make_tokens(path: Path, clients: int) -> dict[int, str]:
    """One random token per client (``secrets.token_urlsafe(24)``: 32 characters), written as
    ``{"0": token, ...}`` with mode 0600, the format ``lesft server --tokens`` reads."""
    tokens = {i: secrets.token_urlsafe(24) for i in range(clients)}
    write_private(path, json.dumps({str(i): t for i, t in tokens.items()}, indent=1))
    return tokens


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, created with mode 0600 (never readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


def make_supernode_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format, as Flower 1.41's SuperNode authentication takes it
    (``flower-supernode --auth-supernode-private-key``; ``flwr supernode register PUBLIC_KEY``):
    (NAME, NAME.pub) in ``directory``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    p = write_private(directory / name, priv.decode())
    q = directory / f"{name}.pub"
    q.write_bytes(pub + f" {name}\n".encode())
    return p, q
