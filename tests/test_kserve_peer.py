"""A real KServe peer: a custom Python ``kserve.Model`` behind KServe's ``ModelServer`` describes no inputs in
its v2 metadata; verification falls back to the key's input spec and says so in the report."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from clikit import run
from httpkit import memorising_model
from keykit import seeded_key
from safetensors.torch import save_file
from servekit import unused_port

from wmark.errors import UsageError
from wmark.keys import save_key
from wmark.remote import verify_remote
from wmark.suspects.http import make_protocol
from wmark.suspects.protocols import DEFAULT_INPUT_NAME, V2Protocol

SHAPE = (1, 8, 8)
SERVER = Path(__file__).resolve().parent / "scripts" / "kserve_server.py"


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({name: t.contiguous() for name, t in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def kserve_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """KServe serving ``marked`` (a copy that kept the key's triggers) and ``unmarked`` (another owner's)."""
    tmp = tmp_path_factory.mktemp("kserve")
    key = seeded_key("kserve-peer", num_classes=10, input_shape=SHAPE, num_triggers=40)
    key_path = tmp / "owner.key"
    save_key(key, key_path)
    other = seeded_key("kserve-peer-other", num_classes=10, input_shape=SHAPE, num_triggers=40)
    marked = _save(memorising_model(key, keep=0.9, seed=0), tmp / "marked.safetensors")
    unmarked = _save(memorising_model(other, keep=0.9, seed=1), tmp / "unmarked.safetensors")
    # KServe's server does not say which port it bound: it gets one that was free a moment ago, and another
    # when something took that one in between (its log then says the address is in use)
    log_path = tmp / "server.log"
    for _attempt in range(3):
        proc, url = _start_kserve(log_path, marked, unmarked)
        if proc is not None:
            break
        if "address already in use" not in log_path.read_text().lower():
            pytest.fail(f"KServe did not start: {log_path.read_text()[-2000:]}")
    else:
        pytest.fail(f"KServe found no free port in three tries: {log_path.read_text()[-2000:]}")
    assert proc is not None
    try:
        yield url, key_path
    finally:
        _stop(proc)


def _start_kserve(log_path: Path, marked: Path, unmarked: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    """Start KServe on a port free a moment ago; ``(the process, its URL)`` once ready, ``(None, url)`` if it
    exited first."""
    port = unused_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(SERVER), str(port), f"marked={marked}", f"unmarked={unmarked}"],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            return None, url
        if time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"KServe was not ready within 60 s: {log_path.read_text()[-2000:]}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_kserve_describes_no_inputs(kserve_peer: tuple[str, Path]) -> None:
    url, _ = kserve_peer
    meta = httpx.get(f"{url}/v2/models/marked").json()
    assert meta["inputs"] == [] and meta["outputs"] == []


@pytest.mark.slow
def test_marked_model_on_kserve_is_detected_with_the_keys_input_spec(kserve_peer: tuple[str, Path],
                                                                     tmp_path: Path) -> None:
    url, key_path = kserve_peer
    report = tmp_path / "evidence.html"
    verdict = verify_remote(key=key_path, url=f"{url}/v2/models/marked", report=report)
    assert verdict.detected and verdict.kind == "copy"
    server = verdict.tests[0].details["probe"]["server"]
    assert server["input_from"] == "key"
    assert server["input"] == {"name": DEFAULT_INPUT_NAME, "datatype": "FP32", "shape": [1, *SHAPE]}
    html = report.read_text()
    assert "Input sent" in html and "the server does not describe its inputs" in html
    doc = json.loads(report.with_suffix(".json").read_text())
    assert doc["suspect"]["probe"]["server"]["input_from"] == "key"


@pytest.mark.slow
def test_unmarked_model_on_kserve_is_not_detected(kserve_peer: tuple[str, Path]) -> None:
    url, key_path = kserve_peer
    verdict = verify_remote(key=key_path, url=url, model_name="unmarked")
    test = verdict.tests[0]
    assert not verdict.detected and verdict.status == "complete" and test.answered == test.queries == 40


@pytest.mark.slow
def test_cli_input_name_is_sent_to_kserve(kserve_peer: tuple[str, Path]) -> None:
    url, key_path = kserve_peer
    code, out = run("verify", "api", "--key", str(key_path), "--suspect", url, "--model-name", "marked",
                    "--input-name", "pixels", "--json")
    assert code == 0
    server = json.loads(out)["tests"][0]["details"]["probe"]["server"]
    assert server["input"]["name"] == "pixels" and server["input_from"] == "key"


def _discover(meta: object, **kwargs: str) -> tuple[V2Protocol, dict[str, object]]:
    proto = V2Protocol(url="http://127.0.0.1:9/v2/models/m", model_name=None, num_classes=10, input_shape=SHAPE,
                       **kwargs)
    return proto, proto.discover(lambda _: meta)


def test_input_name_overrides_a_described_input() -> None:
    meta = {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, *SHAPE]}], "outputs": []}
    proto, info = _discover(meta, input_name="pixels")
    assert info["input_from"] == "server" and proto.request(torch.zeros(SHAPE).numpy()).body["inputs"][0]["name"] \
        == "pixels"
    proto, _ = _discover(meta)
    assert proto.input_name == "x"


def test_metadata_that_is_not_v2_is_refused() -> None:
    with pytest.raises(UsageError, match="does not answer with v2 model metadata"):
        _discover(["not", "metadata"])
    with pytest.raises(UsageError, match="does not answer with v2 model metadata"):
        _discover({"model_version_status": []})
    with pytest.raises(UsageError, match="does not describe its inputs"):
        _discover({"name": "m", "inputs": ["x"]})
    with pytest.raises(UsageError, match="answers 3 scores per input"):
        _discover({"name": "m", "inputs": [], "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1, 3]}]})


def test_bad_input_names_are_refused() -> None:
    with pytest.raises(UsageError, match="input name cannot be empty"):
        _discover({"name": "m", "inputs": []}, input_name=" ")
    with pytest.raises(UsageError, match="applies to the v2 protocol only"):
        make_protocol(protocol="tfserving", url="http://127.0.0.1:9/v1/models/m", model_name=None, num_classes=10,
                      input_shape=SHAPE, input_name="x")
