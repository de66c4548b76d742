#!/usr/bin/env bash
# Multi30k English->German end to end: BPE import, train (configs/multi30k.toml: 2 MPI workers), average the last 5
# checkpoints, BLEU on val with beam 5 (ndtrain eval, and sacreBLEU on the raw reference file), a few translations.
#
#   bench/run_multi30k.sh SRC_DIR [WORK_DIR] [extra `ndtrain train` arguments ...]
#     SRC_DIR   holds train.en.gz train.de.gz val.en.gz val.de.gz (e.g. ../shared/data/multi30k)
#     WORK_DIR  where the data (WORK_DIR/data/{train,val}) and the run (WORK_DIR/run) go (default runs/multi30k-work)
#   e.g. bench/run_multi30k.sh ../shared/data/multi30k /tmp/m30k --steps 20    # a quick smoke run
#
# Batches are length-bucketed (the preset's data.bucket = true: ~9% padding instead of ~57%, the same global batches
# on any number of workers); `ndtrain bench realdata WORK_DIR/data` times real vs synthetic batches.
# Environment: NDTRAIN (default: .venv/bin/ndtrain, else ndtrain on PATH), PYTHON (default the venv's), VOCAB (joint
# BPE ids, default 8000), AVG (checkpoints averaged, default 5), BEAM (default 5), LENPEN (default 1.0, fairseq's).
set -euo pipefail
SRC=${1:?usage: bench/run_multi30k.sh SRC_DIR [WORK_DIR] [train args...]}
WORK=${2:-runs/multi30k-work}
shift $(( $# >= 2 ? 2 : 1 ))
HERE=$(cd "$(dirname "$0")/.." && pwd)
ND=${NDTRAIN:-$([ -x "$HERE/.venv/bin/ndtrain" ] && echo "$HERE/.venv/bin/ndtrain" || echo ndtrain)}
PY=${PYTHON:-$([ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3)}
VOCAB=${VOCAB:-8000}
AVG=${AVG:-5}
BEAM=${BEAM:-5}
LENPEN=${LENPEN:-1.0}
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
t "$ND" train --config "$HERE/configs/multi30k.toml" --set data.dir="$DATA" --out "$RUN" --overwrite "$@"  # a re-run replaces WORK/run
# the average of the last AVG checkpoints (fewer if the run kept fewer), evaluated with beam search
N=$(ls "$RUN"/checkpoints/ckpt-*.json | wc -l)
t "$ND" average --run "$RUN" --last $(( N < AVG ? N : AVG ))
t "$ND" eval --run "$RUN" --checkpoint avg --beam "$BEAM" --lenpen "$LENPEN" --lenpen-kind fairseq --json \
    | tee "$WORK/eval.json"
# sacreBLEU (detokenized, case-sensitive, 13a) of the averaged model's beam translations of all validation sentences
zcat "$SRC/val.en.gz" > "$WORK/val.en"
zcat "$SRC/val.de.gz" > "$WORK/val.de"
t "$ND" generate --run "$RUN" --checkpoint avg --beam "$BEAM" --lenpen "$LENPEN" --lenpen-kind fairseq \
    --input "$WORK/val.en" > "$WORK/val.hyp"
"$PY" -m sacrebleu "$WORK/val.de" -i "$WORK/val.hyp" -m bleu -w 2 | tee "$WORK/sacrebleu.json"
echo "--- beam translations of the first 5 validation sentences (then the references):"
paste -d '\n' <(sed -n 1,5p "$WORK/val.en") <(sed -n 1,5p "$WORK/val.hyp") <(sed -n 1,5p "$WORK/val.de")
