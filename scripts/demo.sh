#!/usr/bin/env bash
# make demo: the whole loop on one machine, on the embedded defaults (SQLite, local Ray).
#   1. fabricate a patch BadNet on Fashion-MNIST (the attacker's model)
#   2. pre-deployment: its GoodNet (round 0)
#   3. serve both as the gateway, stream an attack over HTTP, let the watcher repair and
#      hot-swap, print CA/ASR before and after, and keep serving until Ctrl-C.
# Arguments go to `gateway demo` (make demo DEMO_ARGS=--no-wait exits after the table).
set -euo pipefail
out=${DEMO_DIR:-var/demo}
rm -rf "$out"
mkdir -p "$out"
echo "== 1. fabricating a patch BadNet (target class 0, 10% poisoned) on the 60k training images"
trainer fabricate --attack patch --target 0 --epochs 3 --out "$out/badnet"
echo "== 2. pre-deployment: the GoodNet from 1,000 clean validation images (round 0)"
trainer prepare --model "$out/badnet" --valid fashion-mnist:valid --store "$out/store"
echo "== 3. the gateway under attack: quarantine, repair round 1, hot swap"
exec gateway demo --badnet "$out/badnet" --store "$out/store" "$@"
