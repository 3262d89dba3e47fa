#!/usr/bin/env bash
# Renders `bsa report` output in a real headless browser and fails if a page is blank.
#
# Builds two reports: one of data/sample-run (verdicts only) together with a synthetic
# decoding sweep (2 temperatures x 2 top-p x 2 top-k, 5 samples, with samples.jsonl), and one of the
# sample run alone; screenshots each report.html with Debian's chromium (installed with
# apt-get when missing) and checks that the PNG is not a single colour. Look at the
# screenshots afterwards: their paths are printed.
#
#   scripts/check-report.sh [OUT_DIR]     (default: target/check-report)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/check-report}"
rm -rf "$out"
mkdir -p "$out"

if ! command -v chromium >/dev/null 2>&1; then
    echo "installing Debian's chromium (apt-get)..." >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

cargo build --quiet --bin bsa
bsa=target/debug/bsa

# A synthetic sweep run over the 24 sample items: labels drift with the decoding, so the
# heatmaps have something to show. Written with python3 (already needed by scripts/test.sh).
python3 - "$out/sweep-run" <<'EOF'
import csv, hashlib, json, os, sys
run = sys.argv[1]
os.makedirs(run)
data = "data/sample.csv"
rows = list(csv.DictReader(open(data, newline="", encoding="utf-8")))
sha = hashlib.sha256(open(data, "rb").read()).hexdigest()
json.dump({"bsa_version": "0.1.0", "created": "2026-01-01T00:00:00Z",
           "job": {"dataset": {"source": data, "sha256": sha, "items": len(rows)},
                   "model": {"id": "synthetic-sweep"}, "samples": 5},
           "commands": [], "note": "synthetic labels for scripts/check-report.sh"},
          open(f"{run}/manifest.json", "w"), indent=1)
ok_label = {"Risk Omission": ("True", "False"), "Cognitive Shortcut": ("Fully Covered", "Not Covered"),
            "Over Sensitivity": ("Precise Coverage", "Not Covered")}
with open(f"{run}/verdicts.jsonl", "w") as v, open(f"{run}/samples.jsonl", "w") as s:
    for t in (0.2, 1.0):
        for p in (0.8, 1.0):
            for k in (0, 20):
                cfg = f"t{t}-p{p}-k{k}"
                dec = {"temperature": t, "top_p": p, "top_k": k, "min_p": 0.0, "max_new_tokens": 512}
                for i, r in enumerate(rows):
                    cats = sorted({l.split(":", 1)[-1].strip().split("-")[0] for l in r["label"].split("\n")})
                    for j in range(5):
                        h = (i * 7 + j * 3 + int(t * 10) + int(p * 10) * 3 + k) % 20
                        safety = "Safe" if h < 16 - 6 * t else "Unsafe"
                        think = ok_label[r["dataset_name"]][0 if h < 9 - 4 * t + k / 10 else 1]
                        key = {"item_id": r["id"], "sample_index": j, "config": cfg, "scenario": r["dataset_name"]}
                        v.write(json.dumps({**key, "categories": cats, "safety": safety, "thinking": think, "judge": "synthetic"}) + "\n")
                        s.write(json.dumps({**key, "categories": cats, "seed": 0, "decoding": dec, "prompt_tokens": 1,
                                            "completion_tokens": 1, "thinking": "", "response": "", "raw": "",
                                            "finish_reason": "stop", "truncated": False, "elapsed_s": 0.0}) + "\n")
EOF

$bsa report data/sample-run "$out/sweep-run" --out "$out/both" --quiet --resamples 500
$bsa report data/sample-run --out "$out/sample" --quiet --resamples 500 --reference paper

status=0
for name in both sample; do
    html="$(realpath "$out/$name/report.html")"
    png="$(realpath "$out")/$name.png"
    # A tall window: the screenshot shows the page from the top, plots included.
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,9000 \
        --screenshot="$png" "file://$html" >/dev/null 2>&1
    if [ ! -s "$png" ]; then
        echo "FAIL: chromium wrote no screenshot for $html" >&2
        status=1
        continue
    fi
    # Blank = (nearly) every pixel the same colour. Count distinct colours in the PNG.
    colours="$(python3 - "$png" <<'EOF'
import struct, sys, zlib
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
pos, idat, w, h = 8, b"", 0, 0
while pos < len(data):
    n, kind = struct.unpack(">I4s", data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + n]
    if kind == b"IHDR":
        w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
        bpp = {2: 3, 6: 4}[ctype]
    elif kind == b"IDAT":
        idat += body
    pos += 12 + n
raw = zlib.decompress(idat)
stride = w * bpp
seen, prev = set(), bytearray(stride)
for y in range(h):
    f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
    for x in range(stride):
        a = line[x - bpp] if x >= bpp else 0
        b = prev[x]
        c = prev[x - bpp] if x >= bpp else 0
        if f == 1: line[x] = (line[x] + a) & 255
        elif f == 2: line[x] = (line[x] + b) & 255
        elif f == 3: line[x] = (line[x] + (a + b) // 2) & 255
        elif f == 4:
            pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
            line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    if y % 4 == 0:
        seen.update(bytes(line[i:i + 3]) for i in range(0, stride, bpp * 4))
    prev = line
print(len(seen))
EOF
)"
    if [ "$colours" -lt 20 ]; then
        echo "FAIL: $png looks blank ($colours distinct colours)" >&2
        status=1
    else
        echo "ok: $png ($colours distinct colours sampled)"
    fi
done
exit $status
