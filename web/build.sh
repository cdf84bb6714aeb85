#!/usr/bin/env bash
# Build the browser demo into web/dist/ (serve it with any static file
# server, e.g. `python3 -m http.server -d web/dist 8080`): the trainer
# compiled to wasm (web/src/lib.rs), its JS bindings, and the page.
# Installs the wasm32 target and the wasm-bindgen CLI matching Cargo.lock
# when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v rustup >/dev/null; then
    rustup target add wasm32-unknown-unknown >/dev/null 2>&1
fi
version=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
if ! wasm-bindgen --version 2>/dev/null | grep -qx "wasm-bindgen $version"; then
    echo "== installing wasm-bindgen-cli $version (must match Cargo.lock)"
    cargo install wasm-bindgen-cli --version "$version"
fi

echo "== building the wasm module"
cargo build -p difftrain-web --target wasm32-unknown-unknown --release

echo "== writing web/dist"
rm -rf web/dist
mkdir -p web/dist
wasm-bindgen --target web --no-typescript --out-dir web/dist/pkg \
    target/wasm32-unknown-unknown/release/difftrain_web.wasm
cp web/index.html web/app.js web/style.css web/dist/
echo "web/dist is ready: python3 -m http.server -d web/dist 8080, then open http://localhost:8080"
