#!/usr/bin/env bash
# The demo at this stage: fabricate a patch BadNet on Fashion-MNIST, then measure it.
set -euo pipefail
out=${DEMO_DIR:-var/demo}
mkdir -p "$out"
echo "== fabricating a patch BadNet (target class 0, 10% poisoned) on the 60k training images"
trainer fabricate --attack patch --target 0 --epochs 3 --out "$out/badnet" --overwrite
echo "== evaluating it on the held-out test split, with the triggers it records"
trainer evaluate --model "$out/badnet" --data fashion-mnist:heldout
