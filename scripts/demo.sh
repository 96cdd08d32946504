#!/usr/bin/env bash
# The whole story on real Fashion-MNIST in a few minutes on 2 CPU cores:
# keygen -> train -> embed -> a thief steals and fine-tunes -> verify the stolen copy and an independent model.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash scripts/install.sh | tail -n 1)
export PATH="$bin:$PATH"
out=${WMARK_DEMO_DIR:-demo-out}
mkdir -p "$out"
export WMARK_PROGRESS=1
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. The owner makes a secret key and publishes its commitment"
wmark keygen --owner "ACME Corp" --out "$out/acme.key" --force

step "2. The owner trains a model on its half of Fashion-MNIST"
wmark train --arch fmnist-cnn --data fashion-mnist@owner --epochs 2 --out "$out/base.safetensors"

step "3. ... and fine-tunes it with the key's trigger-set watermark before release"
wmark embed --key "$out/acme.key" --arch fmnist-cnn --weights "$out/base.safetensors" \
  --data fashion-mnist@owner --epochs 4 --out "$out/marked.safetensors"
wmark inspect "$out/marked.safetensors"

step "4. A thief copies the checkpoint and fine-tunes it on 10k images of their own (5 epochs)"
wmark attack finetune --arch fmnist-cnn --weights "$out/marked.safetensors" --data fashion-mnist@attacker \
  --max-samples 10000 --epochs 5 --out "$out/stolen.safetensors"

step "5. Someone else trains an independent model on their own data"
wmark train --arch fmnist-cnn --data fashion-mnist@attacker --epochs 2 --seed 7 --out "$out/independent.safetensors"

step "6. The owner verifies the stolen copy (labels only, sequential test, alpha = 1e-6)"
set +e
wmark verify file --key "$out/acme.key" --arch fmnist-cnn --suspect "$out/stolen.safetensors"
stolen=$?
step "7. ... and the independent model: it must not be accused"
wmark verify file --key "$out/acme.key" --arch fmnist-cnn --suspect "$out/independent.safetensors"
independent=$?
set -e
echo
if [ "$stolen" = 0 ] && [ "$independent" = 1 ]; then
  echo "Demo OK: the stolen copy is detected, the independent model is not. Files are in $out/."
else
  echo "Demo FAILED: stolen exit $stolen (want 0), independent exit $independent (want 1)." >&2
  exit 1
fi
