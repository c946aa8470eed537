#!/usr/bin/env bash
# The demo at this stage: fabricate a patch BadNet on Fashion-MNIST, measure it, make its
# GoodNet (NNoculation pre-deployment, round 0), and measure that on the same triggers.
set -euo pipefail
out=${DEMO_DIR:-var/demo}
rm -rf "$out"
mkdir -p "$out"
echo "== 1. fabricating a patch BadNet (target class 0, 10% poisoned) on the 60k training images"
trainer fabricate --attack patch --target 0 --epochs 3 --out "$out/badnet"
echo "== 2. the BadNet on the held-out test split, with the triggers it records"
trainer evaluate --model "$out/badnet" --data fashion-mnist:heldout
echo "== 3. pre-deployment: the GoodNet from 1,000 clean validation images (round 0)"
trainer prepare --model "$out/badnet" --valid fashion-mnist:valid --store "$out/store"
echo "== 4. the GoodNet on the same held-out images and triggers"
trainer evaluate --model "$out/store/rounds/0/goodnet" --data fashion-mnist:heldout --attack-from "$out/badnet"
