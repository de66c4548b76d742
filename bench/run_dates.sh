#!/usr/bin/env bash
# The built-in `dates` seq2seq task end to end (configs/dates.toml): train, exact match on the held-out dates, the
# report with its attention heat map, a few translations.
#
#   bench/run_dates.sh [WORK_DIR] [extra `ndtrain train` arguments ...]
#     WORK_DIR  where the run goes (WORK_DIR/run; default runs/dates-work)
#   e.g. bench/run_dates.sh /tmp/dates --steps 20      # a smoke run
#
# Environment: NDTRAIN (default: .venv/bin/ndtrain, else ndtrain on PATH).
set -euo pipefail
WORK=${1:-runs/dates-work}
shift $(( $# >= 1 ? 1 : 0 ))
HERE=$(cd "$(dirname "$0")/.." && pwd)
ND=${NDTRAIN:-$([ -x "$HERE/.venv/bin/ndtrain" ] && echo "$HERE/.venv/bin/ndtrain" || echo ndtrain)}
RUN=$WORK/run
mkdir -p "$WORK"
t() { local s=$SECONDS; "$@"; echo "[wall] $(( SECONDS - s )) s: ${*:1:4} ..." >&2; }

t "$ND" train --task dates --out "$RUN" --overwrite "$@"  # a re-run replaces WORK/run
t "$ND" eval --run "$RUN" --json | tee "$WORK/eval.json"
t "$ND" report --run "$RUN"
echo "--- report: $RUN/report.html; plots:"
ls "$RUN"/plots/
echo "--- greedy translations:"
printf '%s\n' "3 March 2021" "Wed, Mar 3 2021" "03/03/21" "SEPTEMBER 14 1987" "Saturday, 1 January 2000" \
  "29-Feb-2024" "7 jul 69" > "$WORK/inputs.txt"
"$ND" generate --run "$RUN" --input "$WORK/inputs.txt" | paste "$WORK/inputs.txt" -
