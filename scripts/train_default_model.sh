#!/usr/bin/env bash
# Reproduce the bundled default model FusionINN/Resources/Models/fusioninn_default.pt from the
# 35 real subjects of ../shared/data/brats (docs/models.md is its model card).
#
# Data: every case folder under DATA (default ../shared/data/brats), T1-Gd + FLAIR, all slices with
# brain in both modalities (--labels brain), volume normalization as at inference. Split by
# subject with seed 0 and validation fraction 0.2: 28 training / 7 validation subjects, the
# validation subjects never used for training (written to the run folder's split.json and to the
# model's metadata).
# Phase 1 (crops): 64x64 random crops, batch 8, Adam 1e-3, intensity jitter 0.1, the paper's loss
#   (alpha 0.5, lambda 0.8, k = 3, N(0, I) prior) with the pixel-sample MMD latent loss (beta 0.1)
#   and the max-abs gradient term (gamma = GRADIENT_WEIGHT, default 10), EPOCHS1 epochs (default 14).
# Phase 2 (whole slices): the best phase-1 epoch fine-tuned on whole 240x240 slices (so that the
#   image border and the background are trained as inference sees them) with replicate border
#   padding, batch 4, Adam 3e-4, MAX_SLICES2 evenly spaced training slices per epoch (default 500),
#   EPOCHS2 epochs (default 2).
# Phase 3 (flat background): phase 2's model fine-tuned with the background rule
#   (--clear-background: the fused image is flat where both sources are background and the sampled
#   decomposition puts each source's background there, so the flow stops coding the sources in a
#   halo around the brain), no intensity jitter (the rule reads the sources' own background),
#   otherwise as phase 2, EPOCHS3 epochs (default 12).
# Phase 4 (edges): phase 3's model fine-tuned as phase 3 with the gradient term raised to
#   GRADIENT_WEIGHT4 (default 30), EPOCHS4 epochs (default 6): it removes the fine diagonal texture
#   phase 3 left in the brain (checkerboard ratio 1.14 -> 0.98) at a small cost in the sampled
#   decomposition (docs/models.md).
# Phase 5 (local weights): phase 4's model fine-tuned as phase 4 with Piella's variance-weighted
#   local SSIM term (--piella-weight PIELLA_WEIGHT5, default 2) and alpha ALPHA5 (default 0.4, more
#   weight on the decomposition), EPOCHS5 epochs (default 4): full-image Q_P above the mean's and the
#   sampled decomposition back above phase 3's level on average (docs/models.md).
# The epoch with the lowest validation loss of each phase is kept. CPU, seed 0 (the bundled model: phases 1
# and 5 with one thread beside a second run, phases 2 and 3 with OMP_NUM_THREADS=2).
# Times on the shared 2-core machine are in docs/models.md.
#
# Usage: scripts/train_default_model.sh [DATA [OUTPUT.pt]]
#        (environment: RUN_ROOT (default: a temporary folder), EPOCHS1 ... EPOCHS5, MAX_SLICES2,
#         GRADIENT_WEIGHT, GRADIENT_WEIGHT4, PIELLA_WEIGHT5, ALPHA5, PYTHON; an interrupted phase continues
#         with RESUME=1 and the same RUN_ROOT)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/brats}"
OUTPUT="${2:-FusionINN/Resources/Models/fusioninn_default.pt}"
EPOCHS1="${EPOCHS1:-14}"
EPOCHS2="${EPOCHS2:-2}"
EPOCHS3="${EPOCHS3:-12}"
EPOCHS4="${EPOCHS4:-6}"
GRADIENT_WEIGHT4="${GRADIENT_WEIGHT4:-30}"
EPOCHS5="${EPOCHS5:-4}"
PIELLA_WEIGHT5="${PIELLA_WEIGHT5:-2}"
ALPHA5="${ALPHA5:-0.4}"
MAX_SLICES2="${MAX_SLICES2:-500}"
GRADIENT_WEIGHT="${GRADIENT_WEIGHT:-10}"
PYTHON="${PYTHON:-python}"
RUN_ROOT="${RUN_ROOT:-$(mktemp -d)}"
export PYTHONPATH="$PWD/FusionINN${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

common=(--labels brain --val-fraction 0.2 --max-val-slices 48 --seed 0 --device cpu --intensity-jitter 0.1
        --gradient-weight "$GRADIENT_WEIGHT" --cache-dir "$RUN_ROOT/cache")
resume1=() resume2=() resume3=() resume4=() resume5=()
if [ "${RESUME:-0}" = 1 ]; then
  [ -f "$RUN_ROOT/phase1/run/last.pt" ] && resume1=(--resume "$RUN_ROOT/phase1/run/last.pt")
  [ -f "$RUN_ROOT/phase2/run/last.pt" ] && resume2=(--resume "$RUN_ROOT/phase2/run/last.pt")
  [ -f "$RUN_ROOT/phase3/run/last.pt" ] && resume3=(--resume "$RUN_ROOT/phase3/run/last.pt")
  [ -f "$RUN_ROOT/phase4/run/last.pt" ] && resume4=(--resume "$RUN_ROOT/phase4/run/last.pt")
  [ -f "$RUN_ROOT/phase5/run/last.pt" ] && resume5=(--resume "$RUN_ROOT/phase5/run/last.pt")
fi

start=$(date +%s)
if [ ! -f "$RUN_ROOT/phase1/model.pt" ]; then
  "$PYTHON" -m FusionINNLib.cli train "$DATA" --output "$RUN_ROOT/phase1/model.pt" --run-dir "$RUN_ROOT/phase1/run" \
      "${common[@]}" --epochs "$EPOCHS1" --batch-size 8 --lr 1e-3 --crop-size 64 "${resume1[@]}"
fi
phase1=$(( $(date +%s) - start ))
whole=(--batch-size 4 --lr 3e-4 --max-train-slices "$MAX_SLICES2" --padding-mode replicate)
if [ ! -f "$RUN_ROOT/phase2/model.pt" ]; then
  "$PYTHON" -m FusionINNLib.cli train "$DATA" --output "$RUN_ROOT/phase2/model.pt" --run-dir "$RUN_ROOT/phase2/run" \
      "${common[@]}" "${whole[@]}" --epochs "$EPOCHS2" --init-model "$RUN_ROOT/phase1/model.pt" "${resume2[@]}"
fi
flat=(--intensity-jitter 0 --clear-background)
if [ ! -f "$RUN_ROOT/phase3/model.pt" ]; then
  "$PYTHON" -m FusionINNLib.cli train "$DATA" --output "$RUN_ROOT/phase3/model.pt" --run-dir "$RUN_ROOT/phase3/run" \
      "${common[@]}" "${whole[@]}" "${flat[@]}" --epochs "$EPOCHS3" --init-model "$RUN_ROOT/phase2/model.pt" "${resume3[@]}"
fi
if [ ! -f "$RUN_ROOT/phase4/model.pt" ]; then
  "$PYTHON" -m FusionINNLib.cli train "$DATA" --output "$RUN_ROOT/phase4/model.pt" --run-dir "$RUN_ROOT/phase4/run" \
      "${common[@]}" "${whole[@]}" "${flat[@]}" --gradient-weight "$GRADIENT_WEIGHT4" --epochs "$EPOCHS4" \
      --init-model "$RUN_ROOT/phase3/model.pt" "${resume4[@]}"
fi
"$PYTHON" -m FusionINNLib.cli train "$DATA" --output "$RUN_ROOT/phase5/model.pt" --run-dir "$RUN_ROOT/phase5/run" \
    "${common[@]}" "${whole[@]}" "${flat[@]}" --gradient-weight "$GRADIENT_WEIGHT4" --piella-weight "$PIELLA_WEIGHT5" \
    --alpha "$ALPHA5" --epochs "$EPOCHS5" --init-model "$RUN_ROOT/phase4/model.pt" "${resume5[@]}"
seconds=$(( $(date +%s) - start ))

"$PYTHON" scripts/finalize_default_model.py "$RUN_ROOT/phase5/model.pt" "$OUTPUT" \
    --recipe "scripts/train_default_model.sh (EPOCHS1=$EPOCHS1 EPOCHS2=$EPOCHS2 EPOCHS3=$EPOCHS3 EPOCHS4=$EPOCHS4 EPOCHS5=$EPOCHS5 MAX_SLICES2=$MAX_SLICES2 GRADIENT_WEIGHT=$GRADIENT_WEIGHT GRADIENT_WEIGHT4=$GRADIENT_WEIGHT4 PIELLA_WEIGHT5=$PIELLA_WEIGHT5 ALPHA5=$ALPHA5)" \
    --seconds "$seconds" --phase1-seconds "$phase1"
