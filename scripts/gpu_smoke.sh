#!/usr/bin/env bash
# GPU smoke test: train and embed on CUDA, serve behind the tie-break mark on CUDA (--device), verify over HTTP and
# the extraction workflow, then the marked API, a local suspect and the function-preserving attacks in process
# with every model on CUDA (inputs follow the model's device). The black-box verifiers and the rule build run their
# models on CUDA too (--device); the owner's served model that ranks a tie-break log stays on the CPU. Then the same
# for a MiniLM text classifier (dict batches on the device): train, embed, verify the file, build the text rule,
# serve it behind the tie-break mark and verify the HF text endpoint.
# Run it where a GPU is lent; WMARK_SMOKE_ALLOW_CPU=1 runs the same steps on the CPU (for checking the script).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VIRTUAL_ENV:-}" ] || [ -x .venv/bin/python ]; then
  bin=${VIRTUAL_ENV:-$PWD/.venv}/bin
else
  bin=$(bash scripts/install.sh | tail -n 1)
fi
export PATH="$bin:$PATH"
python - <<'PY'
import os, sys, torch
if not torch.cuda.is_available() and os.environ.get("WMARK_SMOKE_ALLOW_CPU") != "1":
    sys.exit("no CUDA device: run this where a GPU is lent (or set WMARK_SMOKE_ALLOW_CPU=1)")
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PY
dev=$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
out=$(mktemp -d)
server=
copy=
text_server=
trap 'for pid in $server $copy $text_server; do kill "$pid" 2>/dev/null || true; done; rm -rf "$out"' EXIT
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_ready() {
  for _ in $(seq 120); do
    curl -fs "http://127.0.0.1:$1/v2/health/ready" >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "server on port $1 never became ready" >&2
  return 1
}
data=fashion-mnist@owner
wmark keygen --owner "GPU smoke" --triggers 40 --out "$out/k.key" >/dev/null
wmark train --arch fmnist-mlp --data "$data" --max-samples 4000 --epochs 2 --out "$out/base.safetensors"
wmark embed --key "$out/k.key" --arch fmnist-mlp --weights "$out/base.safetensors" --data "$data" \
  --max-samples 4000 --scheme trigger,weights --epochs 3 --trigger-per-batch 16 --out "$out/marked.safetensors"
wmark verify file --key "$out/k.key" --arch fmnist-mlp --suspect "$out/marked.safetensors" --device "$dev"
wmark verify file --whitebox --key "$out/k.key" --reference "$out/marked.safetensors" \
  --anchor "$out/base.safetensors" --suspect "$out/marked.safetensors"
wmark tiebreak build --key "$out/k.key" --arch fmnist-mlp --weights "$out/marked.safetensors" \
  --data "$data" --references fmnist-mlp --reference-repeats 1 --verify-count 200 --device "$dev" \
  --out "$out/rule.safetensors"
printf '{"thief": "smoke-token-1234"}' > "$out/clients.json" && chmod 600 "$out/clients.json"
port=$(free_port)
wmark serve --name m --mark tiebreak --key "$out/k.key" --rule "$out/rule.safetensors" \
  --log "$out/api.sqlite" --clients "$out/clients.json" --port "$port" --device "$dev" &
server=$!
copy_port=$(free_port)
wmark serve --name c --arch fmnist-mlp --weights "$out/marked.safetensors" --port "$copy_port" --device "$dev" &
copy=$!
wait_ready "$port"
wait_ready "$copy_port"
echo -n smoke-token-1234 > "$out/token" && chmod 600 "$out/token"
# the owner's marked API answers the key's own triggers unshifted: detected there too
wmark verify api --key "$out/k.key" --suspect "http://127.0.0.1:$port" --model-name m \
  --token-file "$out/token" --transcript "$out/t.sqlite"
# a copy of the marked file served plainly, as a thief would: detected
wmark verify api --key "$out/k.key" --suspect "http://127.0.0.1:$copy_port" --model-name c \
  --transcript "$out/copy.sqlite"
# the thief queries the marked API with its own images, so its near-ties are in the log whatever the key's triggers
python - "http://127.0.0.1:$port" "$out/token" <<'PY'
import sys
from wmark.data import load_dataset
from wmark.suspects.http import open_http_suspect
x = load_dataset("fashion-mnist@attacker").x_train[:300].numpy()
with open(sys.argv[2]) as f:
    token = f.read()
api = open_http_suspect(url=sys.argv[1], protocol="v2", model_name="m", num_classes=10, input_shape=(1, 28, 28),
                        token=token)
try:
    assert len(api.query(x).labels) == 300
finally:
    api.close()
PY
wmark verify extraction --key "$out/k.key" --suspect "$out/marked.safetensors" --arch fmnist-mlp --device "$dev" \
  --rule "$out/rule.safetensors" --log "$out/api.sqlite" --client thief --rule-queries 200 --log-queries 40
python - "$out" "$dev" <<'PY'
import sys
import numpy as np
import torch
from wmark.attacks import permute_state_dict
from wmark.attacks.neurons import layer_names
from wmark.keys import load_key
from wmark.marks import open_served
from wmark.models import PenultimateFeaturizer, load_model
from wmark.suspects.local import LocalSuspect
out, dev = sys.argv[1], torch.device(sys.argv[2])
served = open_served(key=load_key(f"{out}/k.key"), mark="tiebreak", rule=f"{out}/rule.safetensors")
served.model.to(dev)
x = np.random.default_rng(0).random((16, *served.input_shape), dtype=np.float32)
labels = served.answerer.for_client("smoke").query(x).labels
assert labels.shape == (16,) and (labels >= 0).all(), labels
model, _ = load_model("fmnist-mlp", f"{out}/marked.safetensors")
suspect = LocalSuspect(model, input_shape=served.input_shape, device=dev)
answers, feats = suspect.query_with_features(x, PenultimateFeaturizer(model))
assert answers.labels.shape == (16,) and feats.shape[0] == 16 and np.isfinite(feats).all()
attacked = permute_state_dict(model.state_dict(), chain=layer_names(model), seed=0)
assert {t.device.type for t in attacked.values()} == {dev.type}
print("in-process tie-break API, local suspect and attacks on", dev)
PY
export HF_HUB_OFFLINE=1
text=fortunes@owner
wmark keygen --owner "GPU smoke text" --classes 8 --modality text --tokenizer all-MiniLM-L6-v2 --max-length 64 \
  --triggers 40 --out "$out/t.key" >/dev/null
wmark train --arch minilm-classifier --data "$text" --max-samples 600 --epochs 1 --out "$out/tbase.safetensors"
wmark embed --key "$out/t.key" --arch minilm-classifier --weights "$out/tbase.safetensors" --data "$text" \
  --max-samples 600 --epochs 2 --scheme trigger --out "$out/tmarked.safetensors"
wmark verify file --key "$out/t.key" --arch minilm-classifier --suspect "$out/tmarked.safetensors" --device "$dev"
wmark tiebreak build --key "$out/t.key" --arch minilm-classifier --weights "$out/tmarked.safetensors" \
  --data "$text" --max-samples 600 --references none --verify-count 100 --device "$dev" --out "$out/trule.safetensors"
text_port=$(free_port)
wmark serve --name t --mark tiebreak --key "$out/t.key" --rule "$out/trule.safetensors" --log "$out/tapi.sqlite" \
  --port "$text_port" --device "$dev" &
text_server=$!
wait_ready "$text_port"
wmark verify api --key "$out/t.key" --suspect "http://127.0.0.1:$text_port/hf/models/t" --protocol json \
  --template hf --transcript "$out/tt.sqlite"
echo "GPU smoke OK"
