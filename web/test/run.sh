#!/usr/bin/env bash
# The browser test: build the site (web/build.sh), train the tiny test
# configuration natively on lavapipe for reference, then let headless
# Chromium train the same configuration on WebGPU and check the page
# (web/test/browser.mjs). Screenshots land in web/test/screenshots/.
# Needs Chromium (/usr/lib/chromium/chromium, or CHROMIUM=...) and Node 18+.
set -euo pipefail
cd "$(dirname "$0")/../.."

# A tiny run: 16x16 images (4x4 latents), batch 4, 24 steps at a constant
# learning rate; 2 sampling steps and one image per prompt. SwiftShader runs
# about 1.5 steps/s of it.
SETS=(
    train.train_batch_size=4 data.resolution=16 train.max_train_steps=24
    train.lr_warmup_steps=0 train.lr_scheduler=constant
    sample.num_inference_steps=2 sample.num_validation_images=1
)

bash web/build.sh
echo "== the native reference run (lavapipe)"
cargo build --bin difftrain
native="$(mktemp -d)/native"
args=()
for s in "${SETS[@]}"; do args+=(--set "$s"); done
target/debug/difftrain train "${args[@]}" --set "train.output_dir=$native"

echo "== the browser test (headless Chromium, WebGPU)"
(cd web/test && npm ci --no-audit --no-fund --loglevel=error)
node web/test/browser.mjs web/dist "$native" web/test/screenshots "${SETS[@]}"
