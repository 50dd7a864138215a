"""Test PKI generated at test time with `cryptography`: a CA, a broker certificate for 127.0.0.1/localhost,
a client certificate for mutual TLS, and an unrelated CA for negative tests, all written as PEM files.

Keys are EC P-256 (quick to generate) in unencrypted PKCS#8, the form Kafka's `ssl.keystore.type=PEM`
reads: `broker_keystore` holds the private key followed by the certificate chain, and the CA file is a
`ssl.truststore.type=PEM` truststore. Python's `ssl` reads the same files.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where `generate_tls` wrote each PEM file."""

    ca_cert: Path
    """The test CA's certificate: the truststore of the broker and of the clients."""
    broker_keystore: Path
    """The broker's private key, then its certificate and the CA's (Kafka PEM keystore)."""
    broker_cert: Path
    client_cert: Path
    """The client's certificate (CN=inference-bridge, clientAuth), signed by the test CA."""
    client_key: Path
    client_key_encrypted: Path
    """The same client key, encrypted with the passphrase `ENCRYPTED_KEY_PASSPHRASE`."""
    other_ca_cert: Path
    """A CA that signed nothing the broker presents, for "wrong trust" tests."""
    rogue_client_cert: Path
    """A client certificate signed by the other CA, which the broker must refuse."""
    rogue_client_key: Path


_VALIDITY = datetime.timedelta(days=2)
ENCRYPTED_KEY_PASSPHRASE = b"client-key-passphrase"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "inference-bridge tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    common_name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    usage: x509.ObjectIdentifier,
    san: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = issuer
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def generate_tls(directory: Path) -> TlsFiles:
    """Create the whole test PKI under `directory` (which must exist) and return the file paths."""
    ca = _ca("inference-bridge test CA")
    broker_cert, broker_key = _leaf(
        "localhost",
        ca,
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_cert, client_key = _leaf("inference-bridge", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    other_ca = _ca("unrelated test CA")
    rogue_cert, rogue_key = _leaf("rogue-client", other_ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_pem = _cert_pem(ca[0])
    return TlsFiles(
        ca_cert=_write(directory / "ca.pem", ca_pem),
        broker_keystore=_write(
            directory / "broker-keystore.pem", _key_pem(broker_key) + _cert_pem(broker_cert) + ca_pem, private=True
        ),
        broker_cert=_write(directory / "broker.pem", _cert_pem(broker_cert)),
        client_cert=_write(directory / "client.pem", _cert_pem(client_cert)),
        client_key=_write(directory / "client-key.pem", _key_pem(client_key), private=True),
        client_key_encrypted=_write(
            directory / "client-key-encrypted.pem",
            client_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(ENCRYPTED_KEY_PASSPHRASE),
            ),
            private=True,
        ),
        other_ca_cert=_write(directory / "other-ca.pem", _cert_pem(other_ca[0])),
        rogue_client_cert=_write(directory / "rogue-client.pem", _cert_pem(rogue_cert)),
        rogue_client_key=_write(directory / "rogue-client-key.pem", _key_pem(rogue_key), private=True),
    )
