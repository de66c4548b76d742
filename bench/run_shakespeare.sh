#!/usr/bin/env bash
# tinyshakespeare character LM end to end through the CLI, nanoGPT's small CPU configuration (configs/shakespeare.toml):
# split (first 90% of the characters train, last 10% validate, as nanoGPT's prepare.py), char import, train, eval,
# a sample.
#
#   bench/run_shakespeare.sh INPUT_TXT [WORK_DIR] [extra `ndtrain train` arguments ...]
#     INPUT_TXT  tinyshakespeare's input.txt (e.g. ../shared/data/tinyshakespeare/input.txt)
#     WORK_DIR   where the data (WORK_DIR/data/{train,val}) and the run (WORK_DIR/run) go (default runs/shakespeare-work)
#   e.g. bench/run_shakespeare.sh ../shared/data/tinyshakespeare/input.txt /tmp/shk --steps 20   # a smoke run
#
# Environment: NDTRAIN (default: .venv/bin/ndtrain, else ndtrain on PATH), PYTHON (for the split; default the venv's).
set -euo pipefail
INPUT=${1:?usage: bench/run_shakespeare.sh INPUT_TXT [WORK_DIR] [train args...]}
WORK=${2:-runs/shakespeare-work}
shift $(( $# >= 2 ? 2 : 1 ))
HERE=$(cd "$(dirname "$0")/.." && pwd)
ND=${NDTRAIN:-$([ -x "$HERE/.venv/bin/ndtrain" ] && echo "$HERE/.venv/bin/ndtrain" || echo ndtrain)}
PY=${PYTHON:-$([ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3)}
DATA=$WORK/data
RUN=$WORK/run
[ -f "$INPUT" ] || { echo "run_shakespeare.sh: $INPUT not found" >&2; exit 2; }
mkdir -p "$DATA"
t() { local s=$SECONDS; "$@"; echo "[wall] $(( SECONDS - s )) s: ${*:1:4} ..." >&2; }

if [ ! -f "$DATA/val/manifest.json" ]; then
  # nanoGPT: the vocabulary is every character of the whole file; train = first 90%, val = last 10% (by characters)
  "$PY" - "$INPUT" "$DATA" <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8").read()
n = int(0.9 * len(text))
for name, part in (("train.txt", text[:n]), ("val.txt", text[n:])):
    with open(f"{sys.argv[2]}/{name}", "w", encoding="utf-8") as f:
        f.write(part)
print(f"split {len(text):,} characters: {n:,} train, {len(text) - n:,} val")
PY
  t "$ND" data import --text "$INPUT" --tokenizer char --block-size 64 --out "$DATA/vocab"
  for split in train val; do
    t "$ND" data import --text "$DATA/$split.txt" --tokenizer-file "$DATA/vocab/tokenizer.json" --block-size 64 \
        --out "$DATA/$split"
  done
fi
t "$ND" train --config "$HERE/configs/shakespeare.toml" --set data.dir="$DATA" --out "$RUN" --overwrite "$@"  # a re-run replaces WORK/run
t "$ND" eval --run "$RUN" --json | tee "$WORK/eval.json"
echo "--- sample (temperature 0.8, top-k 40, 300 characters, seed 1):"
t "$ND" generate --run "$RUN" --temperature 0.8 --top-k 40 --max-len 300 --seed 1 --raw "ROMEO:" | tee "$WORK/sample.txt"
