"""Signatures and provenance: the owner signs what it released, anyone checks it before trusting it.

Signing uses the OpenSSF ``model-signing`` library (``model_signing``): a detached Sigstore bundle (a DSSE
envelope over an in-toto statement listing each file's SHA-256) written next to the signed path as
``PATH.sig``. Two offline signers are supported, an elliptic-curve key pair (PEM) and a signing certificate
with its chain; the keyless Sigstore signer (OIDC identity, transparency-log timestamp) is the online
option and needs the network (see ``docs/evidence.md``). A bundle made here verifies with the library's own
command line as well (``model_signing verify key PATH --signature PATH.sig --public_key PUB.pem``).

A marked model is signed together with a *provenance statement* ``PATH.provenance.json`` (its own bundle
``PATH.provenance.json.sig``): the model's file digests, the key commitment and scheme parameters recorded
in its ``wmark.*`` metadata, the key's public parameters when given, and the signer's clock. Verifying a
model checks both bundles with the same signer, that the statement names exactly these bytes, and that its
commitment is the one in the model's metadata; :func:`check_key_provenance` then refuses any key whose
commitment differs, which is what stops an accuser from picking a key after seeing a suspect.

Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> pub = generate_signing_key(private_key=os.path.join(d, "owner.pem"),
    ...                            public_key=os.path.join(d, "owner.pub.pem"))["public_key"]
    >>> _ = open(os.path.join(d, "a.txt"), "w").write("hello")
    >>> _ = sign_file(path=os.path.join(d, "a.txt"), private_key=os.path.join(d, "owner.pem"))
    >>> verify_file(path=os.path.join(d, "a.txt"), public_key=pub).verified
    True
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wmark import __version__
from wmark.errors import UsageError
from wmark.io import atomic_write
from wmark.keys import Key, check_outputs_spare_keys

PathLike = str | os.PathLike[str]
SIGNATURE_SUFFIX = ".sig"
PROVENANCE_SUFFIX = ".provenance.json"
PROVENANCE_FORMAT = "wmark-provenance/1"
CLOCK_NOTE = ("the signer's own clock: a claim, not a trusted timestamp; Sigstore's transparency log or an "
              "RFC 3161 time-stamping authority proves a date")


class EvidenceError(UsageError):
    """A signature, digest or commitment does not check out: the evidence was altered or is not the owner's."""


@dataclass
class SignatureInfo:
    """What a signature bundle says about a path.

    Attributes:
        path: The signed file or directory.
        signature: The bundle file.
        signer_kind: ``key`` (elliptic-curve key pair), ``certificate`` or ``sigstore``.
        signer: The key's fingerprint (SHA-256 of its PEM public key, as the bundle's hint) or the
            certificate's subject.
        verified: Whether the bundle was checked against a public key or certificate chain and the bytes.
        files: Signed file name -> SHA-256, as listed in the bundle.
    """

    path: str
    signature: str
    signer_kind: str
    signer: str
    verified: bool
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def signature_path(path: PathLike) -> Path:
    """Where the bundle of ``path`` lives: ``PATH.sig`` next to it (a directory's next to the directory)."""
    p = Path(path)
    return p.with_name(p.name + SIGNATURE_SUFFIX)


def provenance_path(path: PathLike) -> Path:
    """Where the provenance statement of a signed model lives: ``PATH.provenance.json``."""
    p = Path(path)
    return p.with_name(p.name + PROVENANCE_SUFFIX)


def _require_library() -> Any:
    try:
        import model_signing
    except ImportError:
        raise UsageError("Signing needs the model-signing package; install wmark with the 'signing' extra.") from None
    return model_signing


def generate_signing_key(*, private_key: PathLike, public_key: PathLike, overwrite: bool = False) -> dict[str, str]:
    """Write a new NIST P-256 key pair as PEM: the private key readable only by its owner (0600).

    Returns:
        The two paths and the public key's fingerprint.

    Raises:
        UsageError: If either file exists and ``overwrite`` is false.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    for p in (private_key, public_key):
        if Path(p).exists() and not overwrite:
            raise UsageError(f"{p} already exists; refusing to overwrite a signing key.")
    secret = ec.generate_private_key(ec.SECP256R1())
    pem = secret.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with atomic_write(private_key, mode=0o600) as tmp:
        Path(tmp).write_bytes(secret.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    with atomic_write(public_key) as tmp:
        Path(tmp).write_bytes(pem)
    return {"private_key": str(private_key), "public_key": str(public_key),
            "fingerprint": hashlib.sha256(pem).hexdigest()}


def public_key_fingerprint(public_key: PathLike) -> str:
    """SHA-256 of a PEM public key in canonical form: the hint ``model-signing`` writes into key bundles."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(Path(public_key).read_bytes())
    except (OSError, ValueError):
        raise UsageError(f"{public_key} is not a readable PEM public key.") from None
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _existing(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {p} does not exist.")
    return p


def sign_file(*, path: PathLike, private_key: PathLike, certificate: PathLike | None = None,
              chain: Sequence[PathLike] = (), signature: PathLike | None = None) -> Path:
    """Sign a file or directory with ``model-signing``; return the bundle's path (default ``PATH.sig``).

    Args:
        path: What to sign (a model file or directory, a report, a transcript). Sign after its last change.
        private_key: The signer's elliptic-curve private key (PEM, unencrypted).
        certificate: With a signing certificate for that key, sign as that certificate (its ``chain`` of
            intermediate certificates is embedded too) instead of as a bare key.
        signature: Where to write the bundle.

    Raises:
        UsageError: If the bundle's path cannot be written or holds a wmark key (checked before signing), or the
            key cannot sign.
    """
    ms = _require_library()
    target = _existing(path, "The file to sign")
    _existing(private_key, "The private key")
    out = Path(signature) if signature is not None else signature_path(target)
    check_outputs_spare_keys(out)
    if certificate is not None and not chain:
        raise UsageError("A certificate signature embeds its chain: pass the issuing CA certificate(s) as well.")
    if target.is_dir():
        links = sorted(f for f in _files_under(target, skip=out) if (target / f).is_symlink())
        if links:
            # model-signing refuses them deep inside, with a message cannot_sign would blame on the key
            raise UsageError(f"{target} holds a symbolic link ({links[0]}), which a signature cannot vouch for; "
                             "replace it with the file it points to, or sign a directory without links.")
    # Every file of a directory is signed: the library leaves out .git* files unless told not to.
    config = ms.signing.Config().set_hashing_config(ms.hashing.Config().set_ignored_paths(paths=[],
                                                                                         ignore_git_paths=False))

    def cannot_sign(why: str) -> UsageError:
        return UsageError(f"Could not sign {target} with {private_key} ({(why.splitlines() or [''])[0][:120]}); "
                          "use an unencrypted P-256/384/521 EC key (and its certificate).")

    try:
        if certificate is not None:
            config.use_certificate_signer(private_key=private_key, signing_certificate=certificate,
                                          certificate_chain=[Path(c) for c in chain])
        else:
            config.use_elliptic_key_signer(private_key=private_key)
    except AttributeError:
        # model-signing reads the key's curve, which an RSA, DSA or Ed25519 key has none of
        raise cannot_sign("not an elliptic-curve key") from None
    except (ValueError, TypeError) as exc:  # TypeError: an encrypted key (no password is asked for)
        raise cannot_sign(str(exc)) from None
    try:
        with atomic_write(out) as tmp:
            config.sign(target, tmp)
    except ValueError as exc:
        raise cannot_sign(str(exc)) from None
    return out


def _bundle(signature: Path) -> dict[str, Any]:
    try:
        doc = json.loads(signature.read_text())
        payload = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise EvidenceError(f"The signature {signature} is not a readable Sigstore bundle: it was altered or "
                            "truncated.") from None
    return {"bundle": doc, "statement": payload}


def describe_signature(*, path: PathLike, signature: PathLike | None = None) -> dict[str, Any] | None:
    """What the bundle next to ``path`` claims, without checking it (``None`` when there is none).

    Use :func:`verify_file` to check it; this is what ``wmark inspect`` shows without a public key.
    """
    sig = Path(signature) if signature is not None else signature_path(path)
    if not sig.is_file():
        return None
    parsed = _bundle(sig)
    try:
        kind, signer = _signer_of(parsed["bundle"].get("verificationMaterial", {}))
        files = {s.get("name", ""): s.get("digest", {}).get("sha256", "")
                 for s in parsed["statement"].get("subject", [])}
    except (AttributeError, TypeError, KeyError, IndexError):  # a field of the wrong JSON type: edited by hand
        raise EvidenceError(f"The signature {sig} is not a readable Sigstore bundle: it was altered or "
                            "truncated.") from None
    return SignatureInfo(path=str(path), signature=str(sig), signer_kind=kind, signer=signer, verified=False,
                         files=files).to_dict()


def _signer_of(material: dict[str, Any]) -> tuple[str, str]:
    if "publicKey" in material:
        return "key", "sha256:" + str(material["publicKey"].get("hint", ""))
    chain = material.get("x509CertificateChain", {}).get("certificates") or []
    raw = chain[0].get("rawBytes") if chain else material.get("certificate", {}).get("rawBytes")
    if raw:
        from cryptography import x509

        try:
            subject = x509.load_der_x509_certificate(base64.b64decode(raw)).subject.rfc4514_string()
        except ValueError:
            subject = "an unreadable certificate"
        return ("certificate" if chain else "sigstore"), subject
    return "unknown", "unknown"


def verify_file(*, path: PathLike, public_key: PathLike | None = None,
                certificate_chain: Sequence[PathLike] | None = None, signature: PathLike | None = None,
                ) -> SignatureInfo:
    """Check that ``path`` is exactly what the holder of ``public_key`` (or a certificate chaining to
    ``certificate_chain``) signed.

    Raises:
        EvidenceError: If there is no bundle, it is malformed, it was made by another signer, or any signed
            byte changed; the message is one sentence naming which.
    """
    ms = _require_library()
    target = _existing(path, "The signed file")
    sig = Path(signature) if signature is not None else signature_path(target)
    if not sig.is_file():
        raise EvidenceError(f"{target} is not signed: there is no signature bundle {sig}.")
    if (public_key is None) == (certificate_chain is None):
        raise UsageError("Check a signature against exactly one of a public key or a certificate chain.")
    described = describe_signature(path=target, signature=sig)
    config = ms.verifying.Config()
    try:
        predicate = _bundle(sig)["statement"].get("predicate") or {}
        serialization = predicate.get("serialization") or {}
        signed = _signed_names(predicate)
        if serialization.get("method") == "files":
            # Hash the files as sign_file signed them, .git* included (the library's guess from the bundle skips them).
            config.set_hashing_config(ms.hashing.Config().use_file_serialization(
                hashing_algorithm=serialization.get("hash_type", "sha256"),
                allow_symlinks=serialization.get("allow_symlinks") is True,
            ).set_ignored_paths(paths=[], ignore_git_paths=False))
    except (AttributeError, TypeError, ValueError):  # a field of the wrong JSON type or value: edited by hand
        raise EvidenceError(f"The signature {sig} is not a readable Sigstore bundle: it was altered or "
                            "truncated.") from None
    if public_key is not None:
        _existing(public_key, "The public key")
        try:
            config.use_elliptic_key_verifier(public_key=public_key)
        except (ValueError, TypeError, AttributeError) as exc:  # AttributeError: an RSA or Ed25519 key (no curve)
            raise UsageError(f"Could not read {public_key} as an elliptic-curve public key ({str(exc)[:80]}); use the "
                             "P-256/384/521 EC public key (PEM) that matches the signing key.") from None
    else:
        config.use_certificate_verifier(certificate_chain=[Path(c) for c in certificate_chain or ()])
    try:
        config.verify(target, sig)
    except ValueError as exc:
        text = str(exc)
        if "Key mismatch" in text:
            raise EvidenceError(f"{target} was signed by another key than {public_key}.") from None
        if "mismatch" in text.lower():
            raise EvidenceError(f"{target} differs from what was signed in {sig}: it was altered after signing.") from None
        raise EvidenceError(f"The signature {sig} of {target} is invalid ({text.splitlines()[0][:120]}).") from None
    except _verification_errors() as exc:
        raise EvidenceError(f"The signature {sig} of {target} does not verify ({type(exc).__name__}): the bundle "
                            "was altered or made with another key.") from None
    assert described is not None
    if target.is_dir():
        unsigned = sorted(_files_under(target, skip=sig) - signed)
        if unsigned:
            raise EvidenceError(f"{target} holds {unsigned[0]}, which {sig} does not sign: a file was added after "
                                "signing, or the signer left it out.")
    return SignatureInfo(path=str(target), signature=str(sig), signer_kind=described["signer_kind"],
                         signer=described["signer"], verified=True, files=described["files"])


def _files_under(directory: Path, *, skip: Path) -> set[str]:
    """Every file and symlink under ``directory`` (symlinks are listed, never followed), as POSIX paths."""
    out = set()
    for root, dirs, files in os.walk(directory):
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            f = Path(root) / name
            if f.absolute() != skip.absolute():
                out.add(f.relative_to(directory).as_posix())
    return out


def _signed_names(predicate: dict[str, Any]) -> set[str]:
    """The files a model-signing predicate covers (a sharded one names each shard as ``PATH:START:END``)."""
    sharded = (predicate.get("serialization") or {}).get("method") == "shards"
    names = {str(r.get("name", "")) for r in predicate.get("resources") or []}
    return {n.rsplit(":", 2)[0] for n in names} if sharded else names


def _verification_errors() -> tuple[type[BaseException], ...]:
    """What the library raises for a bad signature, a broken chain or an unreadable bundle field."""
    from cryptography.exceptions import InvalidSignature

    errors: list[type[BaseException]] = [InvalidSignature, KeyError, TypeError, IndexError]
    try:
        from OpenSSL.crypto import X509StoreContextError

        errors.append(X509StoreContextError)
    except ImportError:
        pass
    return tuple(errors)


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def path_digests(path: PathLike) -> dict[str, str]:
    """SHA-256 of every file of a model (a file: its name; a directory: relative paths, sorted)."""
    p = Path(path)
    if p.is_file():
        return {p.name: file_sha256(p)}
    return {str(f.relative_to(p)): file_sha256(f) for f in sorted(p.rglob("*")) if f.is_file()}


def _model_metadata(path: Path) -> dict[str, Any]:
    """The ``wmark.*`` metadata of a safetensors model (every such file of a directory, merged)."""
    from wmark.io import read_metadata, wmark_metadata

    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    merged: dict[str, Any] = {}
    for f in files:
        try:
            merged.update(wmark_metadata(read_metadata(f)))
        except UsageError:
            continue  # not a safetensors file: it is still signed, it just carries no wmark metadata
    return merged


def sign_model(*, path: PathLike, private_key: PathLike, key: Key | None = None,
               certificate: PathLike | None = None, chain: Sequence[PathLike] = ()) -> dict[str, Any]:
    """Sign a released model and its provenance statement (``PATH.sig``, ``PATH.provenance.json[.sig]``).

    The statement binds the model's bytes to the key commitment in its ``wmark.*`` metadata (or to
    ``key``'s, for a model without it: an API-side mark, a model marked elsewhere) and records the scheme
    parameters and the key's public parameters, never its secret.

    Args:
        path: The marked model file or directory, after its last change.
        private_key: The owner's signing key (PEM).
        key: The owner's :class:`~wmark.keys.Key` (optional when the model records its commitment).
        certificate: Sign as this certificate (with its ``chain``) instead of as a bare key.

    Raises:
        UsageError: If ``key``'s commitment differs from the one the model records, or a file it writes cannot be
            written or holds a wmark key (all checked before the first is written).
    """
    target = _existing(path, "The model to sign")
    _existing(private_key, "The private key")
    prov = provenance_path(target)
    check_outputs_spare_keys(signature_path(target), prov, signature_path(prov))
    meta = _model_metadata(target)
    recorded = meta.get("commitment")
    commitment = key.commitment() if key is not None else recorded
    if key is not None and recorded is not None and recorded != commitment:
        raise UsageError(f"{target} records key commitment {str(recorded)[:16]}..., not this key's "
                         f"{str(commitment)[:16]}...; sign it with the key it was marked with.")
    statement = {
        "format": PROVENANCE_FORMAT,
        "model": {"name": target.name, "kind": "directory" if target.is_dir() else "file",
                  "sha256": path_digests(target)},
        "commitment": commitment,
        "owner": key.owner if key is not None else meta.get("owner"),
        "schemes": meta.get("schemes"),
        "scheme_params": meta.get("scheme_params"),
        "key_public": key.public_params() if key is not None else None,
        "signed_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "signed_at_is": CLOCK_NOTE,
        "wmark_version": __version__,
    }
    # What an earlier release left there (the statement's bundle is written last, atomically: it needs none).
    earlier = {p: p.read_bytes() if p.is_file() else None for p in (signature_path(target), prov)}
    # The model is signed first: a private key the library cannot use is refused before anything is written.
    model_sig = sign_file(path=target, private_key=private_key, certificate=certificate, chain=chain)
    try:
        with atomic_write(prov) as tmp:
            Path(tmp).write_text(json.dumps(statement, indent=2, sort_keys=True) + "\n")
        prov_sig = sign_file(path=prov, private_key=private_key, certificate=certificate, chain=chain)
    except BaseException:
        # A model signature without its statement is half a release: take back what this call wrote, putting an
        # earlier release's files back as they were.
        for written, before in earlier.items():
            if before is None:
                written.unlink(missing_ok=True)
            else:
                written.write_bytes(before)
        raise
    return {"model": str(target), "signature": str(model_sig), "provenance": str(prov),
            "provenance_signature": str(prov_sig), "commitment": commitment}


def verify_model(*, path: PathLike, public_key: PathLike | None = None,
                 certificate_chain: Sequence[PathLike] | None = None, signature: PathLike | None = None,
                 ) -> dict[str, Any]:
    """Check a signed model and its provenance statement; return the statement with both signatures' info.

    Raises:
        EvidenceError: If either bundle fails, they were made by different signers, the statement names other
            bytes, or its commitment is not the one in the model's metadata.
    """
    target = _existing(path, "The signed model")
    model_info = verify_file(path=target, public_key=public_key, certificate_chain=certificate_chain,
                             signature=signature)
    prov = provenance_path(target)
    if not prov.is_file():
        raise EvidenceError(f"{target} is signed but has no provenance statement {prov}; sign it with `wmark sign`.")
    prov_info = verify_file(path=prov, public_key=public_key, certificate_chain=certificate_chain)
    if prov_info.signer != model_info.signer:
        raise EvidenceError(f"The provenance statement {prov} and the model {target} were signed by different signers.")
    statement = json.loads(prov.read_text())
    if statement.get("format") != PROVENANCE_FORMAT:
        raise EvidenceError(f"{prov} is not a wmark provenance statement.")
    if statement.get("model", {}).get("sha256") != path_digests(target):
        raise EvidenceError(f"The provenance statement {prov} names other bytes than {target}.")
    recorded = _model_metadata(target).get("commitment")
    if recorded is not None and recorded != statement.get("commitment"):
        raise EvidenceError(f"The provenance statement {prov} names another key commitment than {target} records.")
    return {"statement": statement, "model_signature": model_info.to_dict(),
            "provenance_signature": prov_info.to_dict()}


def check_key_provenance(*, key: Key, model: PathLike, public_key: PathLike | None = None,
                         certificate_chain: Sequence[PathLike] | None = None, signature: PathLike | None = None,
                         ) -> dict[str, Any]:
    """Verify the owner's signed model and that ``key`` is the one it was released under.

    The commitment in a model signed at release is the only key its owner can claim it with: a key chosen
    later (after seeing a suspect, or the best of many tried against it) has another commitment and is
    refused here. Returns what a report records about it.

    Raises:
        EvidenceError: If the model or its provenance fails to verify, or the key's commitment differs.
    """
    checked = verify_model(path=model, public_key=public_key, certificate_chain=certificate_chain, signature=signature)
    statement = checked["statement"]
    if statement.get("commitment") != key.commitment():
        raise EvidenceError(f"This key's commitment {key.commitment()[:16]}... is not the one {model} was signed "
                            f"with ({str(statement.get('commitment'))[:16]}...): it is not the key of that release.")
    return {"model": str(model), "model_sha256": statement["model"]["sha256"], "commitment": key.commitment(),
            "signed_at": statement.get("signed_at"), "signed_at_is": statement.get("signed_at_is"),
            "signer_kind": checked["model_signature"]["signer_kind"], "signer": checked["model_signature"]["signer"]}
