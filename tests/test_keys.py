import hashlib
import json
import os
import stat

import numpy as np
import pytest
from keykit import seeded_key
from scipy import stats as sps

from wmark.errors import UsageError
from wmark.keys import Key, generate_key, load_key, save_key


def test_key_file_is_private_and_round_trips(tmp_path, digits_key: Key) -> None:
    path = tmp_path / "owner.key"
    save_key(digits_key, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = load_key(path)
    assert loaded == digits_key
    assert loaded.commitment() == digits_key.commitment()
    assert [p.name for p in tmp_path.iterdir()] == ["owner.key"]


def test_secret_never_in_repr_or_public_params(digits_key: Key) -> None:
    assert digits_key.secret.hex() not in repr(digits_key)
    assert digits_key.secret.hex() not in json.dumps(digits_key.public_params())


def test_commitment_binds_public_params_and_secret(digits_key: Key) -> None:
    base = digits_key.commitment()
    changed = [
        Key(**{**digits_key.__dict__, "owner": "Someone Else"}),
        Key(**{**digits_key.__dict__, "num_classes": 11}),
        Key(**{**digits_key.__dict__, "secret": bytes(32)}),
        Key(**{**digits_key.__dict__, "schemes": {"trigger": {"version": 1, "pattern": "x", "n": 41}}}),
    ]
    assert all(k.commitment() != base for k in changed)


def test_derivations_are_deterministic_and_purpose_separated(digits_key: Key) -> None:
    a = digits_key.uniform("p", 100)
    assert np.array_equal(a, digits_key.uniform("p", 100))
    assert not np.array_equal(a, digits_key.uniform("q", 100))
    assert sorted(digits_key.permutation("perm", 50).tolist()) == list(range(50))
    assert 0 <= digits_key.seed("s") < 2**63


def test_labels_are_uniform() -> None:
    key = seeded_key("keys/labels", num_classes=10, input_shape=(1, 8, 8))
    counts = np.bincount(key.labels("labels", 20000, num_classes=7), minlength=7)
    assert sps.chisquare(counts).pvalue > 1e-4


@pytest.mark.parametrize("classes", [0, 1, -3, 2**32 + 1])
def test_labels_refuse_a_class_count_outside_2_to_2_32(classes: int) -> None:
    # 0 failed with ZeroDivisionError, -3 gave labels in {-2, -1, 0}, and above 2**32 no 32-bit word was under the
    # rejection limit (0), so the loop drew blocks for ever
    key = seeded_key("keys/labels", num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="Labels are drawn over 2 to 2\\*\\*32 classes"):
        key.labels("labels", 5, num_classes=classes)
    assert set(key.labels("labels", 200, num_classes=2).tolist()) == {0, 1}
    assert key.labels("labels", 3, num_classes=2**32).min() >= 0


def test_normal_has_unit_moments(digits_key: Key) -> None:
    z = digits_key.normal("z", 40001)
    assert z.shape == (40001,)
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "not a wmark key"),
        ('{"format": "wmark-key/1", "owner": "x"}', "missing fields"),
    ],
)
def test_bad_key_files_are_refused(tmp_path, content: str, match: str) -> None:
    path = tmp_path / "bad.key"
    path.write_text(content)
    with pytest.raises(UsageError, match=match):
        load_key(path)


def test_tampered_and_truncated_keys_are_refused(tmp_path, digits_key: Key) -> None:
    path = tmp_path / "k.key"
    save_key(digits_key, path)
    doc = json.loads(path.read_text())
    doc["num_classes"] = 5
    path.write_text(json.dumps(doc))
    with pytest.raises(UsageError, match="does not match its own commitment"):
        load_key(path)
    save_key(digits_key, path)
    path.write_text(path.read_text()[:50])
    with pytest.raises(UsageError, match="not valid JSON"):
        load_key(path)
    with pytest.raises(UsageError, match="does not exist"):
        load_key(tmp_path / "missing.key")


def _rewrite(path, **fields) -> None:
    """Edit a saved key's fields and store the commitment of what the file now says, as a careful forger would."""
    doc = json.loads(path.read_text())
    doc.update(fields)
    public = {name: doc[name] for name in ("format", "owner", "num_classes", "input_shape", "schemes", "created")}
    secret_sha256 = hashlib.sha256(b"wmark/secret-hash\x00" + bytes.fromhex(doc["secret"])).hexdigest()
    doc["commitment"] = hashlib.sha256(json.dumps({"public": public, "secret_sha256": secret_sha256}, sort_keys=True,
                                                  separators=(",", ":")).encode()).hexdigest()
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("classes", [1, 0, -3, 10.0, 10.7, "10", True, None])
def test_a_key_file_for_fewer_than_2_or_a_fractional_number_of_classes_is_refused(tmp_path, digits_key: Key,
                                                                                  classes) -> None:
    # 1 and 0 loaded (Key.labels failed later, deep in a verification); 10.7 and "10" loaded as 10 classes
    path = tmp_path / "k.key"
    save_key(digits_key, path)
    _rewrite(path, num_classes=classes)
    with pytest.raises(UsageError, match="a key is for a whole number of at least 2 classes"):
        load_key(path)


@pytest.mark.parametrize(("fields", "match"), [
    ({"input_shape": ["1", "8", "8"]}, "malformed values in input_shape"),
    ({"input_shape": [1.0, 8, 8]}, "malformed values in input_shape"),
    ({"input_shape": [0, 8, 8]}, "malformed values in input_shape"),
    ({"input_shape": []}, "malformed values in input_shape"),
    ({"owner": " "}, "malformed values in owner"),
    ({"schemes": [["trigger", {"version": 1, "pattern": "blocks", "n": 5}]]}, "malformed values in schemes"),
    ({"num_triggers": 5}, r"fields a wmark key does not have \(num_triggers\)"),
])
def test_a_key_file_with_values_of_another_type_or_unknown_fields_is_refused(tmp_path, digits_key: Key, fields,
                                                                             match) -> None:
    # each loaded: "1", 1.0 and a list of pairs were converted (under the original commitment), a zero or empty shape
    # and a blank owner were kept, and an unknown field was ignored as if the edit had done something
    path = tmp_path / "k.key"
    save_key(digits_key, path)
    _rewrite(path, **fields)
    with pytest.raises(UsageError, match=match):
        load_key(path)


def test_generate_key_validates() -> None:
    with pytest.raises(UsageError, match="owner name is empty"):
        generate_key(owner=" ")
    with pytest.raises(UsageError, match="at least 2 classes"):
        generate_key(owner="a", num_classes=1)
    with pytest.raises(UsageError, match="positive sizes"):
        generate_key(owner="a", input_shape=(0, 28))


def test_the_tests_fix_only_the_keys_secrets(request) -> None:
    """conftest draws key secrets from a stream seeded by the test's id, and leaves the secrets module alone."""
    import hashlib
    import random
    import secrets

    stream = random.Random(hashlib.sha256(request.node.nodeid.encode()).digest())
    first, second = (generate_key(owner="o", num_classes=2, input_shape=(4,), num_triggers=1) for _ in range(2))
    assert (first.secret, second.secret) == (stream.randbytes(32), stream.randbytes(32))
    assert secrets.token_bytes.__module__ == "secrets" and secrets.token_bytes(16) != secrets.token_bytes(16)
