#!/usr/bin/env bash
# Run `fastif influence` from cron: one run at a time, results published only when complete.
#
# Example crontab line (every night at 03:17; cron has a minimal PATH, so name the binary):
#
#   17 3 * * *  FASTIF_OUTPUTS=/data/fastif FASTIF_BIN=/opt/fastif-venv/bin/fastif /opt/fastif/scripts/cron_influence.sh experiment=demo >> /data/fastif/cron.log 2>&1
#
# Arguments are passed to `fastif influence` (Hydra overrides). Every run gets its own folder
# under $FASTIF_OUTPUTS/influence/<experiment>/; the `latest` link there switches atomically, and
# only when a run completes, so a reader of latest/ never sees a half-written result. If the
# previous run is still going, this one is skipped (exit 0) instead of piling up.
set -euo pipefail

: "${FASTIF_OUTPUTS:?set FASTIF_OUTPUTS to the folder that collects the run folders}"
FASTIF_BIN="${FASTIF_BIN:-fastif}"

mkdir -p "$FASTIF_OUTPUTS"
exec 9>"$FASTIF_OUTPUTS/.cron_influence.lock"
if ! flock --nonblock 9; then
    echo "$(date -Iseconds) cron_influence: the previous run is still active; skipping this one" >&2
    exit 0
fi

echo "$(date -Iseconds) cron_influence: fastif influence $*" >&2
"$FASTIF_BIN" influence "$@"
