#!/usr/bin/env bash
# Multi30k English->German end to end: BPE import, train (configs/multi30k.toml: 2 MPI workers), BLEU on val, a sample.
#
#   bench/run_multi30k.sh SRC_DIR [WORK_DIR] [extra `ndtrain train` arguments ...]
#     SRC_DIR   holds train.en.gz train.de.gz val.en.gz val.de.gz (e.g. ../shared/data/multi30k)
#     WORK_DIR  where the data (WORK_DIR/data/{train,val}) and the run (WORK_DIR/run) go (default runs/multi30k-work)
#   e.g. bench/run_multi30k.sh ../shared/data/multi30k /tmp/m30k --steps 20    # a quick smoke run
#
# Length-bucketed batches: add `--set data.bucket=true` (~9% padding instead of ~57%, the same global batches on any
# number of workers; slower learning per step in short runs, see docs/real-runs.md); `ndtrain bench realdata
# WORK_DIR/data` times bucketed, random and synthetic batches side by side.
# Environment: NDTRAIN (default: .venv/bin/ndtrain, else ndtrain on PATH), VOCAB (BPE ids, default 4000).
set -euo pipefail
SRC=${1:?usage: bench/run_multi30k.sh SRC_DIR [WORK_DIR] [train args...]}
WORK=${2:-runs/multi30k-work}
shift $(( $# >= 2 ? 2 : 1 ))
HERE=$(cd "$(dirname "$0")/.." && pwd)
ND=${NDTRAIN:-$([ -x "$HERE/.venv/bin/ndtrain" ] && echo "$HERE/.venv/bin/ndtrain" || echo ndtrain)}
VOCAB=${VOCAB:-4000}
DATA=$WORK/data
RUN=$WORK/run
for f in train.en.gz train.de.gz val.en.gz val.de.gz; do
  [ -f "$SRC/$f" ] || { echo "run_multi30k.sh: $SRC/$f not found" >&2; exit 2; }
done
mkdir -p "$WORK"
t() { local s=$SECONDS; "$@"; echo "[wall] $(( SECONDS - s )) s: ${*:1:4} ..." >&2; }

if [ ! -f "$DATA/val/manifest.json" ]; then
  t "$ND" data import --src "$SRC/train.en.gz" --tgt "$SRC/train.de.gz" --tokenizer bpe --vocab-size "$VOCAB" \
      --out "$DATA/train"
  # the validation split reuses the training tokenizer (same ids)
  t "$ND" data import --src "$SRC/val.en.gz" --tgt "$SRC/val.de.gz" --tokenizer-file "$DATA/train/tokenizer.json" \
      --out "$DATA/val"
fi
t "$ND" train --config "$HERE/configs/multi30k.toml" --set data.dir="$DATA" --out "$RUN" "$@"
t "$ND" eval --run "$RUN" --json | tee "$WORK/eval.json"
zcat "$SRC/val.en.gz" | sed -n 1,5p > "$WORK/sample.en"  # sed reads to the end: no SIGPIPE under pipefail
zcat "$SRC/val.de.gz" | sed -n 1,5p > "$WORK/sample.de"
echo "--- greedy translations of the first 5 validation sentences (reference below):"
"$ND" generate --run "$RUN" --input "$WORK/sample.en"
echo "--- references:"
cat "$WORK/sample.de"
