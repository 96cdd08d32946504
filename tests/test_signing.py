"""Signing with OpenSSF model-signing: files, models with provenance, certificates, and forged keys refused."""

from __future__ import annotations

import json

import pytest
from clikit import run
from keykit import seeded_key
from sigkit import certificate_chain, memorised_mlp, save_marked, signing_pair

from wmark.errors import UsageError
from wmark.keys import save_key
from wmark.signing import (
    EvidenceError,
    check_key_provenance,
    describe_signature,
    provenance_path,
    sign_file,
    sign_model,
    signature_path,
    verify_file,
    verify_model,
)

SHAPE = (1, 8, 8)


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def pair(tmp_path):
    return signing_pair(tmp_path)


@pytest.fixture
def released(tmp_path, pair):
    """A model marked with a key, signed at release with its provenance statement."""
    key = seeded_key("release", input_shape=SHAPE, num_triggers=20)
    model = save_marked(memorised_mlp(key, steps=5), key, tmp_path / "marked.safetensors")
    sign_model(path=model, private_key=pair[0])
    return key, model


def test_a_signed_file_verifies_and_any_flipped_byte_fails(tmp_path, pair):
    target = tmp_path / "report.json"
    target.write_text(json.dumps({"verdict": "detected", "log10_p": -7.25}))
    sig = sign_file(path=target, private_key=pair[0])
    assert sig == signature_path(target) and sig.is_file()
    info = verify_file(path=target, public_key=pair[1])
    assert info.verified and info.signer_kind == "key" and info.signer.startswith("sha256:")
    assert describe_signature(path=target)["signer"] == info.signer
    original = target.read_bytes()
    for offset in range(len(original)):
        _flip(target, offset)
        with pytest.raises(EvidenceError, match="altered after signing"):
            verify_file(path=target, public_key=pair[1])
        target.write_bytes(original)
    bundle = sig.read_bytes()
    for offset in (len(bundle) // 2, len(bundle) - 40):
        _flip(sig, offset)
        with pytest.raises(EvidenceError, match="signature"):
            verify_file(path=target, public_key=pair[1])
        sig.write_bytes(bundle)


@pytest.mark.parametrize("field,value", [("verificationMaterial", []), ("verificationMaterial", None),
                                         ("publicKey", "x"), ("payload", [5]), ("payload", {"subject": 5}),
                                         ("payload", {"subject": [{"digest": 5}]})])
def test_a_bundle_edited_to_the_wrong_json_types_is_called_altered(tmp_path, pair, field, value):
    # these crashed inspect and verify-signature with "unexpected AttributeError" (exit 3)
    import base64

    target = tmp_path / "report.json"
    target.write_text("{}")
    sig = sign_file(path=target, private_key=pair[0])
    doc = json.loads(sig.read_text())
    if field == "payload":
        doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(value).encode()).decode()
    elif field == "publicKey":
        doc["verificationMaterial"]["publicKey"] = value
    else:
        doc[field] = value
    sig.write_text(json.dumps(doc))
    with pytest.raises(EvidenceError, match="not a readable Sigstore bundle: it was altered"):
        describe_signature(path=target)
    with pytest.raises(EvidenceError, match="not a readable Sigstore bundle: it was altered"):
        verify_file(path=target, public_key=pair[1])
    code, _ = run("inspect", str(target))
    assert code == 2


@pytest.mark.parametrize("predicate", [[5], {"resources": [5]}, {"serialization": {"method": "files",
                                                                                      "hash_type": "md5"}}])
def test_a_bundle_predicate_edited_to_the_wrong_json_types_is_called_altered(tmp_path, pair, predicate):
    import base64

    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    sig = sign_file(path=target, private_key=pair[0])
    doc = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(dict(statement, predicate=predicate)).encode()).decode()
    sig.write_text(json.dumps(doc))
    with pytest.raises(EvidenceError, match="not a readable Sigstore bundle: it was altered"):
        verify_file(path=target, public_key=pair[1])


def test_unsigned_and_other_signer_are_refused(tmp_path, pair):
    target = tmp_path / "t.sqlite"
    target.write_bytes(b"rows")
    with pytest.raises(EvidenceError, match="is not signed"):
        verify_file(path=target, public_key=pair[1])
    sign_file(path=target, private_key=pair[0])
    _, other = signing_pair(tmp_path, "intruder")
    with pytest.raises(EvidenceError, match="another key"):
        verify_file(path=target, public_key=other)


def test_certificate_signing_names_the_subject(tmp_path):
    leaf_key, leaf_cert, ca = certificate_chain(tmp_path)
    target = tmp_path / "m.bin"
    target.write_bytes(b"\x00" * 100)
    sign_file(path=target, private_key=leaf_key, certificate=leaf_cert, chain=[ca])
    info = verify_file(path=target, certificate_chain=[ca])
    assert info.signer_kind == "certificate" and "ACME Corp" in info.signer
    _flip(target, 7)
    with pytest.raises(EvidenceError, match="altered after signing"):
        verify_file(path=target, certificate_chain=[ca])


def test_signed_model_binds_its_commitment_and_a_different_key_is_refused(tmp_path, pair, released):
    key, model = released
    doc = check_key_provenance(key=key, model=model, public_key=pair[1])
    assert doc["commitment"] == key.commitment() and doc["signed_at"]
    statement = json.loads(provenance_path(model).read_text())
    assert statement["commitment"] == key.commitment() and "secret" not in json.dumps(statement)
    # An accuser's key chosen later (however well it fits a suspect) is not the committed one.
    forged = seeded_key("chosen-after-seeing-the-suspect", input_shape=SHAPE, num_triggers=20)
    with pytest.raises(EvidenceError, match="not the one .* was signed with"):
        check_key_provenance(key=forged, model=model, public_key=pair[1])


@pytest.mark.parametrize("which", ["model", "metadata", "provenance", "bundle"])
def test_one_flipped_byte_of_a_signed_release_fails(pair, released, which):
    _, model = released
    if which == "model":
        _flip(model, -3)  # a weight's byte
    elif which == "metadata":
        _flip(model, 12)  # inside the safetensors JSON header, where the commitment sits
    elif which == "provenance":
        _flip(provenance_path(model), 40)
    else:
        _flip(signature_path(model), 200)
    with pytest.raises(EvidenceError):
        verify_model(path=model, public_key=pair[1])


def test_cli_sign_verify_inspect(tmp_path, pair, released):
    key, model = released
    key_file = tmp_path / "k.key"
    save_key(key, key_file)
    code, out = run("verify-signature", str(model), "--public-key", str(pair[1]), "--key", str(key_file))
    assert code == 0 and key.commitment() in out
    code, out = run("inspect", str(model))
    doc = json.loads(out)
    assert doc["commitment"] == key.commitment() and doc["signature"]["signer_kind"] == "key"
    code, out = run("inspect", str(model), "--signer-key", str(pair[1]))
    assert code == 0 and json.loads(out)["signature"]["verified"] is True
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    code, out = run("inspect", str(plain))
    assert "unsigned" in json.loads(out)["signature"]
    # a model under another name used to show no metadata at all, as if it were unmarked
    renamed = tmp_path / "model.st"
    renamed.write_bytes(model.read_bytes())
    code, out = run("inspect", str(renamed))
    assert code == 0 and json.loads(out)["commitment"] == key.commitment()
    _flip(model, -3)
    code, _ = run("verify-signature", str(model), "--public-key", str(pair[1]))
    assert code == 2


def test_cli_signing_key_and_sign_any_file(tmp_path):
    code, out = run("signing-key", "--private-key", str(tmp_path / "a.pem"), "--public-key", str(tmp_path / "a.pub"))
    assert code == 0 and "fingerprint" in out
    assert oct((tmp_path / "a.pem").stat().st_mode & 0o777) == "0o600"
    target = tmp_path / "r.json"
    target.write_text("{}")
    code, _ = run("sign", str(target), "--private-key", str(tmp_path / "a.pem"))
    assert code == 0 and not provenance_path(target).exists()
    code, out = run("verify-signature", str(target), "--public-key", str(tmp_path / "a.pub"))
    assert code == 0 and out.startswith("valid")


def test_cli_verify_checks_the_signed_release_before_trusting_the_key(tmp_path, pair, released):
    key, model = released
    key_file = tmp_path / "k.key"
    save_key(key, key_file)
    base = ["verify", "file", "--key", str(key_file), "--arch", "fmnist-mlp", "--suspect", str(model)]
    code, _ = run(*base, "--signer-key", str(pair[1]), "--signed-model", str(model), "--report", str(tmp_path / "r.html"))
    assert code in (0, 1)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["provenance"]["commitment"] == key.commitment() and doc["provenance"]["signer"].startswith("sha256:")
    assert "Signed release checked" in (tmp_path / "r.html").read_text()
    other = seeded_key("picked later", input_shape=SHAPE, num_triggers=20)
    save_key(other, tmp_path / "other.key")
    code, _ = run("verify", "file", "--key", str(tmp_path / "other.key"), "--arch", "fmnist-mlp", "--suspect", str(model),
                  "--signer-key", str(pair[1]), "--signed-model", str(model))
    assert code == 2
    unsigned = save_marked(memorised_mlp(key, steps=1), key, tmp_path / "unsigned.safetensors")
    code, _ = run("verify", "file", "--key", str(key_file), "--whitebox", "--reference", str(unsigned), "--suspect",
                  str(model), "--signer-key", str(pair[1]))
    assert code == 2
    code, _ = run(*base, "--signed-model", str(model))
    assert code == 2


def test_a_model_directory_is_signed_as_a_whole_and_bound_to_a_key(tmp_path, pair):
    key = seeded_key("directory", input_shape=SHAPE, num_triggers=20)
    model = tmp_path / "hf-model"
    model.mkdir()
    (model / "config.json").write_text('{"num_labels": 10}')
    (model / "model.safetensors").write_bytes(b"\x00" * 64)  # not readable safetensors: signed, no wmark metadata
    info = sign_model(path=model, private_key=pair[0], key=key)
    assert info["commitment"] == key.commitment()
    assert check_key_provenance(key=key, model=model, public_key=pair[1])["model_sha256"].keys() == {
        "config.json", "model.safetensors"}
    (model / "extra.bin").write_bytes(b"smuggled")
    with pytest.raises(EvidenceError, match="altered after signing"):
        verify_model(path=model, public_key=pair[1])
    (model / "extra.bin").unlink()
    _flip(model / "config.json", 3)
    with pytest.raises(EvidenceError, match="altered after signing"):
        verify_model(path=model, public_key=pair[1])


@pytest.mark.parametrize("added", [".gitattributes", ".gitignore", ".git/config", ".github/x.yml"])
def test_a_git_file_added_to_a_signed_directory_is_detected(tmp_path, pair, added):
    """model-signing leaves .git* files out of a directory's signature by default: one added (or changed) after
    signing passed verify_file."""
    model = tmp_path / "hf-model"
    model.mkdir()
    (model / "config.json").write_text('{"num_labels": 10}')
    (model / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    sign_file(path=model, private_key=pair[0])
    assert verify_file(path=model, public_key=pair[1]).verified
    (model / added).parent.mkdir(exist_ok=True)
    (model / added).write_text("smuggled")
    with pytest.raises(EvidenceError, match="altered after signing"):
        verify_file(path=model, public_key=pair[1])


def test_a_file_a_bundle_does_not_sign_is_named(tmp_path, pair):
    """A bundle made with the library's defaults (.git* left out) does not vouch for a .gitattributes beside it."""
    import model_signing

    model = tmp_path / "hf-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / ".gitattributes").write_text("x")
    config = model_signing.signing.Config()
    config.use_elliptic_key_signer(private_key=pair[0])
    config.sign(model, signature_path(model))
    with pytest.raises(EvidenceError, match=r"holds \.gitattributes, which .* does not sign"):
        verify_file(path=model, public_key=pair[1])


def test_bundles_verify_with_the_model_signing_command_line(tmp_path, pair, released):
    import subprocess
    import sys

    _, model = released
    proc = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(model), "--signature",
                           str(signature_path(model)), "--public_key", str(pair[1])],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_owner_files_a_verification_relies_on_must_be_signed_under_the_key_too(tmp_path, pair, released):
    from wmark.cli_evidence import check_release

    key, model = released
    key_file = tmp_path / "k.key"
    save_key(key, key_file)
    rule = tmp_path / "rule.safetensors"
    rule.write_bytes(b"a tie-break rule built at release")
    with pytest.raises(EvidenceError, match="is not signed"):
        check_release(key=str(key_file), signer_key=str(pair[1]), signed_model=str(model), reference=None,
                      reference_signature=None, owner_files=(str(rule), None))
    sign_model(path=rule, private_key=pair[0], key=key)
    doc = check_release(key=str(key_file), signer_key=str(pair[1]), signed_model=str(model), reference=None,
                        reference_signature=None, owner_files=(str(rule), str(model)))
    assert [f["model"] for f in doc["owner_files"]] == [str(rule)]
    later = seeded_key("rule built later", input_shape=SHAPE, num_triggers=20)
    sign_model(path=rule, private_key=pair[0], key=later)
    with pytest.raises(EvidenceError, match="not the key of that release"):
        check_release(key=str(key_file), signer_key=str(pair[1]), signed_model=str(model), reference=None,
                      reference_signature=None, owner_files=(str(rule),))


def _sign_cli(*args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from wmark.cli import main

    result = CliRunner().invoke(main, ["sign", *args], catch_exceptions=False)
    return result.exit_code, result.stderr


@pytest.mark.parametrize("which", ["model", "provenance", "file"])
def test_sign_refuses_to_write_a_bundle_over_a_key_file_and_writes_nothing(tmp_path, pair, which):
    key = seeded_key("a key where the bundle goes", input_shape=SHAPE, num_triggers=20)
    if which == "file":
        target = tmp_path / "report.json"
        target.write_text("{}")
        sig = signature_path(target)
    else:
        target = save_marked(memorised_mlp(key, steps=1), key, tmp_path / "m.safetensors")
        # the provenance statement's bundle is the last file sign_model writes: it must be checked with the first
        sig = signature_path(target if which == "model" else provenance_path(target))
    save_key(key, sig)
    secret, before = sig.read_bytes(), sorted(p.name for p in tmp_path.iterdir())
    code, err = _sign_cli(str(target), "--private-key", str(pair[0]))
    assert code == 2 and err == (f"error: {sig} is a wmark key file; writing there would destroy its secret, so "
                                 "choose another path.\n")
    assert sig.read_bytes() == secret and sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(UsageError, match=r"is a wmark key file; writing there would destroy its secret"):
        (sign_file(path=target, private_key=pair[0]) if which == "file"
         else sign_model(path=target, private_key=pair[0]))
    assert sig.read_bytes() == secret and sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_bundle_path_in_a_missing_directory_is_refused_before_signing(tmp_path, pair, monkeypatch):
    import model_signing.signing

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("signing began before the bundle's path was checked")

    target = tmp_path / "report.json"
    target.write_text("{}")
    monkeypatch.setattr(model_signing.signing, "Config", must_not_run)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UsageError, match=rf"^Directory {tmp_path / 'missing'} does not exist; create it first\.$"):
        sign_file(path=target, private_key=pair[0], signature=tmp_path / "missing" / "report.json.sig")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_sign_in_a_read_only_directory_exits_2_and_writes_nothing(tmp_path, pair, monkeypatch):
    import errno
    import tempfile

    key = seeded_key("read-only release", input_shape=SHAPE, num_triggers=20)
    model = save_marked(memorised_mlp(key, steps=1), key, tmp_path / "m.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())

    def refuse(*_args, **_kwargs):  # a read-only directory as a non-root user sees it (the tests may run as root)
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/.x.tmp")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, err = _sign_cli(str(model), "--private-key", str(pair[0]))
    assert code == 2 and err == (f"error: Cannot write {signature_path(model)}: permission denied; choose a writable "
                                 "directory.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_private_key_the_signer_cannot_use_leaves_no_statement_or_bundle(tmp_path, pair):
    key = seeded_key("unusable signing key", input_shape=SHAPE, num_triggers=20)
    model = save_marked(memorised_mlp(key, steps=1), key, tmp_path / "m.safetensors")
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = _sign_cli(str(model), "--private-key", str(bad))
    assert code == 2 and err.startswith(f"error: Could not sign {model} with {bad} (")
    assert err.endswith("; use an unencrypted P-256/384/521 EC key (and its certificate).\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(("kind", "why"), [("rsa", "not an elliptic-curve key"), ("ed25519", "not an elliptic-curve key"),
                                          ("encrypted", "Password was not given but private key is encrypted")])
def test_a_private_key_of_another_kind_or_encrypted_is_refused_in_one_sentence(tmp_path, kind, why):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    made = {"rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ed25519": ed25519.Ed25519PrivateKey.generate,
            "encrypted": lambda: ec.generate_private_key(ec.SECP256R1())}[kind]()
    encryption = (serialization.BestAvailableEncryption(b"pass") if kind == "encrypted"
                  else serialization.NoEncryption())
    bad = tmp_path / f"{kind}.pem"
    bad.write_bytes(made.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    key = seeded_key("a key of another kind", input_shape=SHAPE, num_triggers=20)
    model = save_marked(memorised_mlp(key, steps=1), key, tmp_path / "m.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = _sign_cli(str(model), "--private-key", str(bad))
    assert code == 2 and err == (f"error: Could not sign {model} with {bad} ({why}); use an unencrypted P-256/384/521 "
                                 "EC key (and its certificate).\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("fails", ["statement", "statement's bundle"])
@pytest.mark.parametrize("earlier", [False, True])
def test_a_failure_after_the_model_is_signed_leaves_the_files_as_they_were(tmp_path, pair, monkeypatch, fails,
                                                                          earlier):
    from wmark import signing
    from wmark.errors import RuntimeFailure

    key = seeded_key("half a release", input_shape=SHAPE, num_triggers=20)
    model = save_marked(memorised_mlp(key, steps=1), key, tmp_path / "m.safetensors")
    if earlier:  # an earlier release of the same file, which a failed re-signing must leave whole
        sign_model(path=model, private_key=pair[0])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    real_write, real_sign = signing.atomic_write, signing.sign_file

    def write(path, **kwargs):
        if path == provenance_path(model) and fails == "statement":
            raise RuntimeFailure(f"Cannot write {path}: No space left on device")
        return real_write(path, **kwargs)

    def sign(*, path, **kwargs):
        if path == provenance_path(model) and fails == "statement's bundle":
            raise KeyboardInterrupt
        return real_sign(path=path, **kwargs)

    monkeypatch.setattr(signing, "atomic_write", write)
    monkeypatch.setattr(signing, "sign_file", sign)
    with pytest.raises((RuntimeFailure, KeyboardInterrupt)):
        sign_model(path=model, private_key=pair[0])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    if earlier:
        assert verify_model(path=model, public_key=pair[1])["statement"]["commitment"] == key.commitment()


@pytest.mark.parametrize("kind", ["rsa", "ed25519", "garbage"])
def test_verify_signature_refuses_a_public_key_it_cannot_read_in_one_sentence(tmp_path, pair, kind):
    from click.testing import CliRunner
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    from wmark.cli import main

    target = tmp_path / "r.json"
    target.write_text("{}")
    sign_file(path=target, private_key=pair[0])
    public = tmp_path / f"{kind}.pub"
    if kind == "garbage":
        public.write_text("not a key\n")
    else:
        private = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa"
                   else ed25519.Ed25519PrivateKey.generate())
        public.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    result = CliRunner().invoke(main, ["verify-signature", str(target), "--public-key", str(public)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: Could not read {public} as an elliptic-curve public key (")
    assert result.stderr.endswith("; use the P-256/384/521 EC public key (PEM) that matches the signing key.\n")


def test_a_directory_holding_a_symbolic_link_is_refused_naming_the_link(tmp_path, pair):
    """The library's own refusal came out as advice to use another key."""
    model = tmp_path / "hf-model"
    model.mkdir()
    (model / "config.json").write_text('{"num_labels": 10}')
    (tmp_path / "outside.bin").write_bytes(b"x")
    (model / "weights.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(UsageError, match=r"^.*hf-model holds a symbolic link \(weights\.bin\), which a signature "
                                         r"cannot vouch for; replace it with the file it points to"):
        sign_file(path=model, private_key=pair[0])
    assert not signature_path(model).exists()
