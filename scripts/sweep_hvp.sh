#!/usr/bin/env bash
# A Hydra sweep over inverse-HVP settings: one job per combination, each in its own run folder
# under $FASTIF_OUTPUTS/hvp-calibrate/<experiment>/multirun/<timestamp>/<job>/.
#
#   scripts/sweep_hvp.sh                       # the grid below on the demo
#   scripts/sweep_hvp.sh experiment=demo seed=1 # extra overrides are passed on
set -euo pipefail

FASTIF_BIN="${FASTIF_BIN:-fastif}"
"$FASTIF_BIN" hvp-calibrate -m hvp.depth=100,500 hvp.batch_size=1,8 "$@"
