#!/usr/bin/env bash
# Fetch real text corpora from Debian packages into data/corpora (git-ignored) as JSONL.
#
#   data/corpora/zh/{tang300,song100,chinese}.jsonl   from `fortunes-zh`
#   data/corpora/en/<name>.jsonl                       from `fortunes` (+ `fortunes-min`)
#
# Every line is {"text": "..."}; one fortune (entries separated by lines holding `%`) per line,
# ANSI colour escapes stripped. The text is GPL packaging: fetched at run time, never committed.
# Idempotent: a finished run leaves data/corpora/.done and later runs return at once
# (FORCE=1 refetches).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${CORPORA_DIR:-$ROOT/data/corpora}"
PY="${PYTHON:-python3}"

if [[ -f "$OUT/.done" && "${FORCE:-0}" != "1" ]]; then
    echo "fetch-corpora: $OUT is up to date (FORCE=1 to refetch)"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

download() {
    # apt-get download needs package lists; refresh them once if the first try fails.
    local pkg="$1"
    (cd "$WORK" && apt-get download "$pkg") || {
        echo "fetch-corpora: apt-get download $pkg failed; running apt-get update" >&2
        if [[ $(id -u) -eq 0 ]]; then apt-get update; else sudo apt-get update; fi
        (cd "$WORK" && apt-get download "$pkg")
    }
    dpkg -x "$WORK/${pkg}"_*.deb "$WORK/root"
}

download fortunes-zh
download fortunes
download fortunes-min || true   # holds the base `fortunes` file on some releases

mkdir -p "$OUT/zh" "$OUT/en"
"$PY" - "$WORK/root/usr/share/games/fortunes" "$OUT" <<'PYEOF'
import json, os, re, sys

src, out = sys.argv[1], sys.argv[2]
ansi = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

def entries(path):
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8", errors="strict")
    block = []
    for line in text.split("\n"):
        if line.strip() == "%":
            yield "\n".join(block)
            block = []
        else:
            block.append(line)
    yield "\n".join(block)

def convert(path, dest):
    n = 0
    tmp = dest + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for e in entries(path):
            # Escapes can nest ("\x1b[;\x1b[34;1mm"): strip until nothing changes.
            prev = None
            while prev != e:
                prev, e = e, ansi.sub("", e)
            e = e.replace("\x1b", "").strip()
            if e:
                f.write(json.dumps({"text": e}, ensure_ascii=False) + "\n")
                n += 1
    os.replace(tmp, dest)
    print(f"fetch-corpora: {dest}: {n} documents")

for name in ("tang300", "song100", "chinese"):
    convert(os.path.join(src, name), os.path.join(out, "zh", name + ".jsonl"))

skip = {"tang300", "song100", "chinese"}
for name in sorted(os.listdir(src)):
    p = os.path.join(src, name)
    if name in skip or name.endswith((".dat", ".u8")) or os.path.islink(p) or not os.path.isfile(p):
        continue
    try:
        convert(p, os.path.join(out, "en", name + ".jsonl"))
    except UnicodeDecodeError:
        print(f"fetch-corpora: skipping {p}: not UTF-8", file=sys.stderr)
PYEOF
touch "$OUT/.done"
echo "fetch-corpora: done -> $OUT"
