"""Helpers for the evidence tests: signing keys, a certificate chain, a model file that memorised a key."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import torch

from wmark.io import save_model
from wmark.keys import Key
from wmark.models import build_model, model_metadata
from wmark.schemes.trigger_set import generate_triggers
from wmark.signing import generate_signing_key


def signing_pair(directory: Path, name: str = "owner") -> tuple[Path, Path]:
    """A fresh P-256 key pair written as PEM files; returns (private, public)."""
    private, public = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    generate_signing_key(private_key=private, public_key=public)
    return private, public


def certificate_chain(directory: Path) -> tuple[Path, Path, Path]:
    """A self-made CA and a code-signing leaf certificate for a fresh key; returns (leaf key, leaf cert, CA cert)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Root CA")])
    leaf_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ACME Corp"),
                           x509.NameAttribute(NameOID.COMMON_NAME, "ACME model signing")])

    def build(subject: x509.Name, public: ec.EllipticCurvePublicKey, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public)
             .serial_number(x509.random_serial_number()).not_valid_before(now)
             .not_valid_after(now + dt.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                          crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
        if not ca:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        return b.sign(ca_key, hashes.SHA256())

    ca_cert, leaf_cert = build(ca_name, ca_key.public_key(), True), build(leaf_name, leaf_key.public_key(), False)
    paths = directory / "leaf.pem", directory / "leaf.crt", directory / "ca.crt"
    paths[0].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    paths[1].write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def memorised_mlp(key: Key, *, seed: int = 0, steps: int = 300) -> torch.nn.Module:
    """An ``fmnist-mlp`` trained on the key's triggers alone until it answers their secret labels (a copy)."""
    torch.manual_seed(seed)
    model = build_model("fmnist-mlp", num_classes=key.num_classes, input_shape=tuple(key.input_shape), seed=seed)
    triggers = generate_triggers(key)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(triggers.inputs), triggers.labels).backward()
        optimizer.step()
    return model.eval()


def save_marked(model: torch.nn.Module, key: Key, path: Path) -> Path:
    """Save a model with the metadata ``wmark embed`` writes (commitment, owner, schemes)."""
    save_model(model, path, metadata={**model_metadata(arch="fmnist-mlp", num_classes=key.num_classes,
                                                       input_shape=tuple(key.input_shape)),
                                      "schemes": ["trigger"], "commitment": key.commitment(), "owner": key.owner,
                                      "scheme_params": {"trigger": key.schemes["trigger"]}})
    return path
