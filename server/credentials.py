"""TLS and node-authentication material for a federation, made with ``cryptography`` (no openssl, no ssh-keygen).

* :func:`make_ca`: the federation's own certificate authority (ECDSA P-384, signs end-entity certificates only);
* :func:`make_server_certificate`: the SuperLink's TLS certificate for every address the hospitals dial;
* :func:`write_hospital_key`: a SuperNode authentication key pair in OpenSSH format (as ``ssh-keygen -t ecdsa -b 384``);
* :func:`write_file`: private files are created with mode 0600, never readable by others, not even briefly.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

CERTIFICATE_VALIDITY = dt.timedelta(days=3 * 365)


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (else a DNS name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_ca(common_name: str) -> tuple[EllipticCurvePrivateKey, Any]:
    """A self-signed CA (ECDSA P-384, may sign end-entity certificates only): (key, certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False)
    certificate = (
        _certificate_builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, certificate


def make_server_certificate(ca_key: EllipticCurvePrivateKey, ca_cert: Any,
                            hosts: Iterable[str]) -> tuple[EllipticCurvePrivateKey, Any]:
    """A TLS server certificate for ``hosts`` (IP addresses and DNS names), signed by the CA: (key, certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = list(dict.fromkeys(hosts))
    names = [x509.IPAddress(ipaddress.ip_address(host)) if is_ip(host) else x509.DNSName(host) for host in hosts]
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    certificate = (
        _certificate_builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, certificate


def _new_key() -> EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def _certificate_builder(subject: Any, issuer: Any, public_key: Any) -> Any:
    """A certificate builder valid from five minutes ago (clock skew) for :data:`CERTIFICATE_VALIDITY`."""
    from cryptography import x509

    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + CERTIFICATE_VALIDITY))


def write_hospital_key(path: Path, comment: str) -> None:
    """A SuperNode key pair at ``path`` (OpenSSH private key, mode 0600) and ``path.pub`` (OpenSSH public key),
    the format of ``ssh-keygen -t ecdsa -b 384``."""
    from cryptography.hazmat.primitives import serialization

    key = _new_key()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_file(path, private, private=True)
    write_file(path.with_name(f"{path.name}.pub"), public + f" {comment}\n".encode())


def private_key_pem(key: EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (what the SuperLink reads)."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def certificate_pem(certificate: Any) -> bytes:
    """The certificate as PEM."""
    from cryptography.hazmat.primitives import serialization

    return certificate.public_bytes(serialization.Encoding.PEM)


def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data``; a private file is created with mode 0600 (never readable by others, not even briefly)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as file:
        if private:
            os.fchmod(file.fileno(), 0o600)
        file.write(data)
