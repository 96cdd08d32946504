#!/usr/bin/env bash
# GPU smoke test: embed, serve behind the tie-break mark, verify over HTTP and the extraction workflow, with
# every model on CUDA (wmark puts models on CUDA when one is present; inputs follow the model's device).
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
out=$(mktemp -d)
server=
trap '[ -z "$server" ] || kill "$server" 2>/dev/null || true; rm -rf "$out"' EXIT
data=fashion-mnist@owner
wmark keygen --owner "GPU smoke" --triggers 40 --out "$out/k.key" >/dev/null
wmark train --arch fmnist-mlp --data "$data" --max-samples 4000 --epochs 2 --out "$out/base.safetensors"
wmark embed --key "$out/k.key" --arch fmnist-mlp --weights "$out/base.safetensors" --data "$data" \
  --max-samples 4000 --scheme trigger,weights --epochs 3 --trigger-per-batch 16 --out "$out/marked.safetensors"
wmark verify file --key "$out/k.key" --arch fmnist-mlp --suspect "$out/marked.safetensors"
wmark verify file --whitebox --key "$out/k.key" --reference "$out/marked.safetensors" \
  --anchor "$out/base.safetensors" --suspect "$out/marked.safetensors"
wmark tiebreak build --key "$out/k.key" --arch fmnist-mlp --weights "$out/marked.safetensors" \
  --data "$data" --references none --verify-count 200 --out "$out/rule.safetensors"
printf '{"thief": "smoke-token-1234"}' > "$out/clients.json" && chmod 600 "$out/clients.json"
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
wmark serve --name m --mark tiebreak --key "$out/k.key" --rule "$out/rule.safetensors" \
  --log "$out/api.sqlite" --clients "$out/clients.json" --port "$port" &
server=$!
for _ in $(seq 60); do
  curl -fs "http://127.0.0.1:$port/v2/health/ready" >/dev/null 2>&1 && break
  sleep 1
done
echo -n smoke-token-1234 > "$out/token" && chmod 600 "$out/token"
wmark verify api --key "$out/k.key" --suspect "http://127.0.0.1:$port" --model-name m \
  --token-file "$out/token" --transcript "$out/t.sqlite"
wmark verify extraction --key "$out/k.key" --suspect "$out/marked.safetensors" --arch fmnist-mlp \
  --rule "$out/rule.safetensors" --log "$out/api.sqlite" --client thief --rule-queries 200 --log-queries 40
echo "GPU smoke OK"
