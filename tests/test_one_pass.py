"""The marked API runs the model once per request, and the featurizer and server are safe to use concurrently."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

from wmark.errors import UsageError
from wmark.keys import generate_key
from wmark.models import penultimate_featurizer
from wmark.schemes.querylog import TieBreakLog
from wmark.schemes.tiebreak import TieBreakAPI, build_tiebreak_rule
from wmark.suspects import LocalSuspect

C, SHAPE = 5, (1, 8, 8)


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 16),
                         nn.ReLU(), nn.Linear(16, C)).eval()


class Counted(nn.Module):
    """Counts its forward passes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(600, *SHAPE)).astype(np.float32)


def test_the_marked_api_answers_from_one_forward_pass_exactly_as_from_two(tmp_path, x):
    key = generate_key(owner="o", num_classes=C, input_shape=SHAPE)
    model = Counted(small_cnn(0))
    feat = penultimate_featurizer(model)
    rule = build_tiebreak_rule(key=key, x=x, featurizer=feat, feature_space="served-penultimate", components=8)
    backend = LocalSuspect(model, input_shape=SHAPE)
    with TieBreakLog(tmp_path / "one.sqlite", key=key) as log1, TieBreakLog(tmp_path / "two.sqlite", key=key) as log2:
        one = TieBreakAPI(key=key, backend=backend, rule=rule, log=log1)
        two_rule = build_tiebreak_rule(key=key, x=x, featurizer=lambda v: feat(v), feature_space="served-penultimate",
                                       components=8)
        two = TieBreakAPI(key=key, backend=backend, rule=two_rule, log=log2)
        model.calls = 0
        a = one.query(x[:64])
        assert model.calls == 1
        b = two.query(x[:64])
        assert model.calls == 3  # the backend, then the featurizer
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6, atol=1e-9)
        assert (a.labels != backend.query(x[:64]).labels).any()  # the shift does change close calls
        np.testing.assert_array_equal(log1.inputs("anonymous"), log2.inputs("anonymous"))


def test_the_featurizer_reads_each_threads_own_pass_while_others_run(x):
    model = small_cnn(1)
    feat = penultimate_featurizer(model, batch_size=16)
    alone = [feat(x[i * 50:(i + 1) * 50]) for i in range(12)]
    start = threading.Barrier(6)

    def work(i: int) -> np.ndarray:
        start.wait() if i < 6 else None
        if i % 3 == 0:  # plain inference on the same model at the same time must not leak into features
            with torch.no_grad():
                model(torch.from_numpy(x[:32]))
        return feat(x[i * 50:(i + 1) * 50])

    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(work, range(12)))
    for got, want in zip(together, alone):
        np.testing.assert_array_equal(got, want)


def test_refusals():
    class TwiceHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.head(x))

    with pytest.raises(UsageError, match="ran 2 times in one forward pass"):
        penultimate_featurizer(TwiceHead())(np.zeros((3, 4), np.float32))
    with pytest.raises(UsageError, match="no nn.Linear layer"):
        penultimate_featurizer(nn.ReLU())
    model = small_cnn(2)
    feat = penultimate_featurizer(model)
    feat.close()
    with pytest.raises(UsageError, match="was closed; make a new one"):
        feat(np.zeros((2, *SHAPE), np.float32))
    with pytest.raises(UsageError, match="reads another model"):
        LocalSuspect(small_cnn(3), input_shape=SHAPE).query_with_features(np.zeros((2, *SHAPE), np.float32),
                                                                         penultimate_featurizer(model))


def test_the_marked_server_answers_concurrent_clients_as_it_answers_one(tmp_path, x):
    from wmark.serve import build_app, serve_in_background
    from wmark.suspects.http import open_http_suspect

    key = generate_key(owner="o", num_classes=C, input_shape=SHAPE)
    model = small_cnn(4)
    backend = LocalSuspect(model, input_shape=SHAPE)
    rule = build_tiebreak_rule(key=key, x=x, featurizer=penultimate_featurizer(model), feature_space="p", components=8)
    tokens = {f"c{i}": f"token-{i}" for i in range(4)}
    with TieBreakLog(tmp_path / "log.sqlite", key=key) as log:
        api = TieBreakAPI(key=key, backend=backend, rule=rule, log=log, expose_scores=False)
        want = api.query(x).labels
        app = build_app(model=model, name="m", num_classes=C, input_shape=SHAPE, answerer=api, clients=tokens)
        with serve_in_background(app) as server:
            def client(i: int) -> np.ndarray:
                remote = open_http_suspect(url=f"{server.url}/v2/models/m", protocol="v2", num_classes=C,
                                           input_shape=SHAPE, token=tokens[f"c{i % 4}"])
                try:
                    return np.concatenate([remote.query(x[j:j + 10]).labels for j in range(i * 50, i * 50 + 50, 10)])
                finally:
                    remote.close()

            with ThreadPoolExecutor(8) as pool:
                got = np.concatenate(list(pool.map(client, range(12))))
        np.testing.assert_array_equal(got, want)
        assert sum(v["queries"] for c, v in log.clients().items() if c != "anonymous") == 600


def test_the_query_log_fsyncs_each_request_only_when_asked(tmp_path):
    from click.testing import CliRunner

    from wmark.cli import main

    key = generate_key(owner="o", num_classes=C, input_shape=SHAPE)
    for durability, level in (("process", 1), ("fsync", 2)):  # SQLite's NORMAL and FULL
        with TieBreakLog(tmp_path / f"{durability}.sqlite", key=key, durability=durability) as log:
            assert log._db.execute("PRAGMA synchronous").fetchone()[0] == level
    with pytest.raises(UsageError, match="durability 'always'; use process or fsync"):
        TieBreakLog(tmp_path / "x.sqlite", key=key, durability="always")
    res = CliRunner().invoke(main, ["serve", "--arch", "fmnist-mlp", "--weights", str(tmp_path / "w.safetensors"),
                                    "--name", "m", "--mark", "tiebreak", "--log-sync", "fsync"])
    assert res.exit_code == 2 and "--log-sync does not apply without --log" in res.output
