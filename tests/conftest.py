"""Shared fixtures: tiny keys and models so unit tests run in seconds."""

from __future__ import annotations

import datetime
import hashlib
import os
import random
import secrets
import types
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from keykit import FIXED_CREATED, seeded_key

import wmark.keys
from wmark.keys import Key

# Under pytest-xdist each worker gets its share of the cores: workers that each ran every core would oversubscribe
# them, and OpenMP's spinning threads then slow the slow tests several times over. Subprocesses (the CLI, the
# gauntlet) read the same share from the environment.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_CORES = max(1, torch.get_num_threads() // _WORKERS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_CORES))
# Module and session fixtures are set up before the per-test fixture below: they get one thread too, whatever ran
# before them, so what they train does not depend on the order of the tests.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files holding slow tests first, each file's tests kept together and in order.

    A parallel run (``-n 2 --dist loadfile``) then starts its longest files at once instead of meeting one at the
    end, when the other worker has nothing left to take.
    """
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(autouse=True)
def _few_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    # Tiny unit-test models run fastest on one thread; the slow end-to-end tests train real CNNs on every core.
    torch.set_num_threads(_CORES if request.node.get_closest_marker("slow") else 1)
    yield
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Seed torch's, NumPy's and Python's global generators from the test's id before any of its fixtures is built.

    A parallel run gives each worker another sequence of files, so a test (or a module fixture) that draws from a
    global generator without seeding it would start from another state each run and could fail now and then.
    """
    digest = hashlib.sha256(item.nodeid.encode()).digest()
    seed = int.from_bytes(digest[:4], "little")
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    _seed_key_secrets(digest)


def _seed_key_secrets(seed: bytes) -> None:
    """Key secrets drawn while a test is set up and run come from a stream seeded by the test's id.

    Many tests train a tiny model and ask it to learn most of a key's triggers, or serve a copy that kept most of
    them; with a fresh secret each run, an unlucky draw fails CI now and then. Each test still draws distinct
    secrets, and the same ones every run; a module fixture's key is drawn in the setup of its file's first test.
    """
    stream = random.Random(seed)
    # Only wmark.keys sees the stream: the secrets module stays random for everyone else (lock and temporary file
    # names in filelock and huggingface_hub, which two test runs on one cache must not share).
    draws = types.SimpleNamespace(**{name: getattr(secrets, name) for name in secrets.__all__})
    draws.token_bytes = lambda n=32: stream.randbytes(n)
    wmark.keys.secrets = draws  # type: ignore[attr-defined]
    # A key's commitment hashes its creation time, and a trigger pass seeds its dropout from the commitment: with
    # the clock's time, a test would train differently from one second to the next.
    wmark.keys._dt = types.SimpleNamespace(datetime=_FixedClock, timezone=datetime.timezone)  # type: ignore[attr-defined]


class _FixedClock:
    """``datetime`` as :mod:`wmark.keys` sees it during a test: ``now`` is the fixed keys' creation time."""

    @staticmethod
    def now(tz: datetime.tzinfo | None = None) -> datetime.datetime:
        return datetime.datetime.fromisoformat(FIXED_CREATED).astimezone(tz)


def pytest_runtest_teardown(item: pytest.Item) -> None:
    wmark.keys.secrets = secrets  # type: ignore[attr-defined]
    wmark.keys._dt = datetime  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    # The HTTP tests talk to servers on 127.0.0.1; a proxy set on the machine running them would carry (and fail)
    # that traffic. The proxy tests set their own.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def digits_key() -> Key:
    """A fixed key for 10-class 1×8×8 models (scikit-learn digits).

    Fixed so that tests whose thresholds depend on how well a tiny model learns the triggers cannot fail on
    an unlucky fresh secret.
    """
    return seeded_key("digits", num_classes=10, input_shape=(1, 8, 8), num_triggers=40)


@pytest.fixture
def fmnist_key() -> Key:
    return seeded_key("fmnist", num_classes=10, input_shape=(1, 28, 28), num_triggers=50)


@pytest.fixture(scope="session")
def digits():
    from wmark.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def marked_digits(digits):
    """(key, marked model, independent model) on digits: a CNN trained with the key's triggers mixed in."""
    from wmark.embed import Watermarker
    from wmark.models import build_model
    from wmark.training import make_loader, train_epochs

    torch.set_num_threads(1)
    key = seeded_key("marked-digits", num_classes=10, input_shape=(1, 8, 8), num_triggers=40)
    models = []
    for seed, schemes in ((0, ("trigger",)), (1, ())):
        model = build_model("fmnist-cnn", num_classes=10, input_shape=(1, 8, 8), seed=seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        loader = make_loader(digits.x_train, digits.y_train, batch_size=64, seed=seed)
        if schemes:
            model, optimizer, loader = Watermarker(key, schemes=schemes, trigger_per_batch=8).attach(
                model=model, optimizer=optimizer, data_loader=loader)
        train_epochs(model, loader, epochs=15, optimizer=optimizer, device=torch.device("cpu"))
        models.append(model)
    return key, models[0], models[1]
