"""Re-checking white-box verdicts: recomputed from the bits read and the revealed key, re-read from the files."""

from __future__ import annotations

import json

import pytest
import torch
from _whitebox_helpers import tiny_key, tiny_model, train
from clikit import run

from wmark import api
from wmark.attacks import permute_state_dict
from wmark.errors import UsageError
from wmark.io import save_model, save_tensors
from wmark.keys import save_key
from wmark.recheck import canonical_sha256, recheck
from wmark.schemes.weights import WeightsEmbedder, payload_bits
from wmark.signing import EvidenceError

CHAIN = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A key file, an unmarked base, the reference marked from it, a permuted copy and an independent model."""
    d = tmp_path_factory.mktemp("recheckwb")
    key = tiny_key(seed=21)
    save_key(key, d / "owner.key")
    base = train(tiny_model(5), steps=40, seed=5)
    save_model(base, d / "base.safetensors")
    marked = tiny_model(0)
    marked.load_state_dict(base.state_dict())
    emb = WeightsEmbedder(key, marked)
    train(marked, steps=60, seed=6, embedder=emb)
    save_model(marked, d / "ref.safetensors", metadata={"weights": emb.metadata(), "commitment": key.commitment()})
    save_tensors(permute_state_dict(marked.state_dict(), chain=CHAIN, seed=1), d / "copy.safetensors")
    save_model(train(tiny_model(77), steps=20, seed=3), d / "indep.safetensors")
    return key, d


def _report(files, tmp_path, suspect: str = "copy", *, anchored: bool = True) -> dict:
    _, d = files
    verdict = api.verify_whitebox(key=d / "owner.key", reference=d / "ref.safetensors",
                                  suspect=d / f"{suspect}.safetensors",
                                  anchor=d / "base.safetensors" if anchored else None)
    return api.write_report(verdict=verdict, key=d / "owner.key", path=tmp_path / "r.html")


def _model_files(d, *, anchored: bool = True, suspect: str = "copy") -> dict:
    return {"suspect": d / f"{suspect}.safetensors", "reference": d / "ref.safetensors",
            **({"anchor": d / "base.safetensors"} if anchored else {})}


def _edit(tmp_path, edit) -> None:
    """Edit the report's white-box test details and recompute its content digest, as a forger would."""
    report = tmp_path / "r.json"
    doc = json.loads(report.read_text())
    edit(doc["verdict"]["tests"][0])
    doc["integrity"].pop("content_sha256")
    doc["integrity"]["content_sha256"] = canonical_sha256(doc)
    report.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _flip_bit(test: dict, position: int = 0) -> None:
    bits = test["details"]["bits_read"]
    test["details"]["bits_read"] = bits[:position] + ("1" if bits[position] == "0" else "0") + bits[position + 1:]


@pytest.mark.parametrize("suspect,anchored,expected", [("copy", True, "detected"), ("copy", False, "detected"),
                                                       ("indep", True, "not_detected")])
def test_a_whitebox_verdict_is_recomputed_from_the_recorded_bits_and_the_revealed_key(files, tmp_path, suspect,
                                                                                      anchored, expected):
    key, d = files
    doc = _report(files, tmp_path, suspect, anchored=anchored)
    details = doc["verdict"]["tests"][0]["details"]
    assert doc["verdict"]["decision"] == expected
    assert len(details["bits_read"]) == 64 and set(details["bits_read"]) <= {"0", "1"}
    read = torch.tensor([int(c) for c in details["bits_read"]])
    assert int((read.numpy() == payload_bits(key)).sum()) == doc["verdict"]["tests"][0]["matches"]
    assert (details["files"]["anchor"] is not None) == anchored and details["files"]["reference"]["sha256"]
    assert doc["suspect"]["file"] == details["files"]["suspect"]
    assert key.secret.hex() not in (tmp_path / "r.json").read_text()
    assert doc["recheck"]["tests"]["weights"].startswith("recomputed from the revealed key")
    outcome = recheck(report=tmp_path / "r.json", key=d / "owner.key")
    assert outcome.status == "same" and outcome.exit_code == 0, outcome.message
    assert outcome.tests[0]["rechecked"] and outcome.tests[0]["matches"] == doc["verdict"]["tests"][0]["matches"]
    assert outcome.recomputed == {"decision": expected, "log10_p": doc["verdict"]["log10_p"]}
    code, out = run("recheck", "--report", str(tmp_path / "r.json"), "--key", str(d / "owner.key"))
    assert code == 0 and "64 bits from the bits read that the report r.json records" in out


@pytest.mark.parametrize("edit", [
    lambda t: t.update(matches=t["matches"] + 1),
    lambda t: t.update(log10_p=t["log10_p"] - 3.0),
    lambda t: t["details"].update(candidates=t["details"]["candidates"] + 4),
    lambda t: t["details"].update(decoded_message="ACME"),
    _flip_bit,
], ids=["matches", "log10_p", "candidates", "decoded_message", "bits_read"])
def test_an_edited_count_p_value_or_bits_is_a_different_verdict(files, tmp_path, edit):
    _, d = files
    _report(files, tmp_path, "indep")
    _edit(tmp_path, edit)
    outcome = recheck(report=tmp_path / "r.json", key=d / "owner.key")
    assert outcome.status == "different" and outcome.exit_code == 1
    code, _ = run("recheck", "--report", str(tmp_path / "r.json"), "--key", str(d / "owner.key"))
    assert code == 1


def test_edited_bits_or_a_file_digest_are_tampering(files, tmp_path):
    _, d = files
    _report(files, tmp_path)
    report = tmp_path / "r.json"
    original = report.read_text()
    # not re-digested: the content digest catches it
    at = original.index('"bits_read": "') + len('"bits_read": "')
    report.write_text(original[:at] + ("1" if original[at] == "0" else "0") + original[at + 1:])
    with pytest.raises(EvidenceError, match="does not match its own content digest"):
        recheck(report=report, key=d / "owner.key")
    # re-digested, with a bit the suspect does not read: the files re-read say so
    report.write_text(original)
    _edit(tmp_path, lambda t: _flip_bit(t, 5))
    with pytest.raises(EvidenceError, match=r"the suspect reads 1 of its bits otherwise than the report records: the "
                                            r"record was altered\.$"):
        recheck(report=report, key=d / "owner.key", model_files=_model_files(d))
    # re-digested, the copy's bits consistent with another count: same without the files, tampered with them
    report.write_text(original)
    _edit(tmp_path, lambda t: t["details"].update(candidates=2))
    with pytest.raises(EvidenceError, match="has 1 candidate tensors where the report records 2"):
        recheck(report=report, key=d / "owner.key", model_files=_model_files(d))
    for role in ("suspect", "reference", "anchor"):
        report.write_text(original)
        _edit(tmp_path, lambda t, role=role: t["details"]["files"][role].update(sha256="0" * 64))
        with pytest.raises(EvidenceError, match=rf"The {role} file .* is not the one the report names \(its SHA-256 "
                                                r"differs\)"):
            recheck(report=report, key=d / "owner.key", model_files=_model_files(d))
    report.write_text(original)
    _edit(tmp_path, lambda t: t["details"].update(bits_read=t["details"]["bits_read"][:-1]))
    with pytest.raises(EvidenceError, match="records 63 bits read, but the revealed key's payload has 64"):
        recheck(report=report, key=d / "owner.key")
    code, _ = run("recheck", "--report", str(report), "--key", str(d / "owner.key"))
    assert code == 2
    for wrong in ({"bits_read": ["0"] * 64}, {"form": "binorm", "aligned_to": "reference"}):
        # a form other than a chain's or a graph's stopped the re-check with a KeyError traceback
        report.write_text(original)
        _edit(tmp_path, lambda t, wrong=wrong: t["details"].update(wrong))
        with pytest.raises(EvidenceError, match="with the wrong type: it was edited"):
            recheck(report=report, key=d / "owner.key")


@pytest.mark.parametrize("anchored", [True, False])
def test_given_the_files_recheck_re_reads_the_suspect_and_another_suspect_is_tampering(files, tmp_path, anchored):
    _, d = files
    _report(files, tmp_path, anchored=anchored)
    outcome = recheck(report=tmp_path / "r.json", key=d / "owner.key", model_files=_model_files(d, anchored=anchored))
    assert outcome.status == "same" and "white-box files SHA-256 and the bits re-read from them" in outcome.checks
    args = ["recheck", "--report", str(tmp_path / "r.json"), "--key", str(d / "owner.key"), "--suspect",
            str(d / "copy.safetensors"), "--reference", str(d / "ref.safetensors")]
    code, out = run(*args, *(["--anchor", str(d / "base.safetensors")] if anchored else []))
    assert code == 0 and "re-read" in out
    with pytest.raises(EvidenceError, match=r"The suspect file .*indep\.safetensors is not the one the report names"):
        recheck(report=tmp_path / "r.json", key=d / "owner.key",
                model_files=_model_files(d, anchored=anchored, suspect="indep"))


def test_options_a_whitebox_recheck_cannot_use_are_refused_in_one_sentence(files, tmp_path):
    _, d = files
    _report(files, tmp_path)
    report, key = tmp_path / "r.json", d / "owner.key"
    with pytest.raises(UsageError, match=r"needs both the suspect and the reference file; pass --suspect and "
                                         r"--reference \(and --anchor where the report aligned to one\)\.$"):
        recheck(report=report, key=key, model_files={"suspect": d / "copy.safetensors"})
    with pytest.raises(UsageError, match=r"aligned to an anchor \(the unmarked base model\); pass it with --anchor"):
        recheck(report=report, key=key, model_files=_model_files(d, anchored=False))
    with pytest.raises(UsageError, match=r"names no transcript .*drop --transcript\.$"):
        recheck(report=report, key=key, transcript=tmp_path / "t.sqlite")
    with pytest.raises(UsageError, match=r"has no tie-break test, so its rule and served model files do not apply"):
        recheck(report=report, key=key, owner_files={"rule": d / "ref.safetensors"})
    code, _ = run("recheck", "--report", str(report), "--key", str(key), "--reference", str(d / "ref.safetensors"))
    assert code == 2
    _report(files, tmp_path, anchored=False)
    with pytest.raises(UsageError, match=r"was aligned to the reference, not to an anchor, so an anchor does not "
                                         r"apply; drop --anchor\.$"):
        recheck(report=report, key=key, model_files=_model_files(d))
    # a report without the bits read (as an older wmark wrote it) is not confirmed, and its files cannot be compared
    _edit(tmp_path, lambda t: t["details"].pop("bits_read"))
    outcome = recheck(report=report, key=key)
    assert outcome.status == "partial" and "does not record the bits read" in outcome.tests[0]["note"]
    with pytest.raises(UsageError, match=r"records no bits read from the suspect \(an older wmark\)"):
        recheck(report=report, key=key, model_files=_model_files(d, anchored=False))


def test_model_files_on_a_black_box_report_are_refused(tmp_path):
    from sigkit import memorised_mlp, save_marked

    from wmark.keys import default_schemes, generate_key

    key = generate_key(owner="O", input_shape=(1, 8, 8), num_triggers=20, schemes=default_schemes(10))
    save_key(key, tmp_path / "k.key")
    save_marked(memorised_mlp(key), key, tmp_path / "copy.safetensors")
    verdict = api.verify(key=tmp_path / "k.key", arch="fmnist-mlp", suspect=tmp_path / "copy.safetensors")
    api.write_report(verdict=verdict, key=tmp_path / "k.key", path=tmp_path / "r.html")
    with pytest.raises(UsageError, match=r"has no white-box test, so model files do not apply; drop --suspect, "
                                         r"--reference and --anchor\.$"):
        recheck(report=tmp_path / "r.json", key=tmp_path / "k.key",
                model_files={"suspect": tmp_path / "copy.safetensors", "reference": tmp_path / "copy.safetensors"})
    code, _ = run("recheck", "--report", str(tmp_path / "r.json"), "--key", str(tmp_path / "k.key"), "--suspect",
                  str(tmp_path / "copy.safetensors"))
    assert code == 2
