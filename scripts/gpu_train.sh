#!/usr/bin/env bash
# Train the shipped lung model on one GPU, from the repo root, without Ray (the GPU box has none).
#
#   OUT=/some/dir bash scripts/gpu_train.sh          # packed data: .gpu/covid_qu_ex.npz (jobs/pack_pairs.py)
#
# Writes to $OUT: lung_unet.pt (best val Dice so far, rewritten atomically at every improvement, so a
# killed run still leaves usable weights; ~3.9 MB), train.log (environment + one line per epoch) and
# eval.json (scripts/eval_lung_model.py: Val per class and the packed external sets, on the GPU).
# Full checkpoints (~23 MB, over the 16 MB a device run can return) go to $CKPT, default /tmp/lung_ckpt.
# Knobs (environment): MINUTES (training budget incl. data loading, default 6.5), PYTHON (python3),
# DATA, BATCH (64), LR (2e-3), BASE_WIDTH (16), INPUT_SIZE (256), EXTRA (more jobs/train.py flags),
# EVAL_EXTRA (more eval_lung_model.py flags). The next lung-model run (docs/MODEL_CARD.md), about 7.5
# device minutes: first whether torch.compile speeds the training step (benchmarks/bench_train_step.py), then
#   MINUTES=6 EXTRA="--boundary-weight 2" OUT=$OUT bash scripts/gpu_train.sh
set -euo pipefail
: "${OUT:?set OUT to the output folder}"
PYTHON="${PYTHON:-python3}"
DATA="${DATA:-.gpu/covid_qu_ex.npz}"
MINUTES="${MINUTES:-6.5}"
CKPT="${CKPT:-/tmp/lung_ckpt}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
LOG="$OUT/train.log"
{
  echo "# $(date -u +%FT%TZ) $(hostname) $(nproc) cores"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PYTHON" -c "import sys, torch, cv2, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cv2', cv2.__version__, 'numpy', numpy.__version__)"
  ls -l "$DATA"
} 2>&1 | tee "$LOG"
# shellcheck disable=SC2086
"$PYTHON" jobs/train.py --backend local --data "$DATA" --minutes "$MINUTES" --epochs 100000 \
  --batch-size "${BATCH:-64}" --lr "${LR:-2e-3}" --base-width "${BASE_WIDTH:-16}" --input-size "${INPUT_SIZE:-256}" \
  --out "$OUT/lung_unet.pt" --checkpoint-dir "$CKPT" --checkpoint-every 25 ${EXTRA:-} 2>&1 | tee -a "$LOG"
# Scored at once, per COVID-QU-Ex class and on the packed external sets (those under .gpu/ that exist):
# $OUT/eval.json, to set beside the shipped model's (docs/MODEL_CARD.md) before `jobs/evaluate.py` here.
EXTERNAL=$(ls .gpu/jsrt.npz .gpu/shenzhen.npz 2>/dev/null || true)
# shellcheck disable=SC2086
"$PYTHON" scripts/eval_lung_model.py --model "$OUT/lung_unet.pt" --val "$DATA" ${EXTERNAL:+--external $EXTERNAL} \
  --groups 'COVID-19=^covid_' 'Non-COVID=^non_covid' 'Normal=^normal' ${EVAL_EXTRA:-} > "$OUT/eval.json" 2>>"$LOG" \
  && grep -E '^ "|dice_mean' "$OUT/eval.json" | head -20 | tee -a "$LOG"
ls -l "$OUT" | tee -a "$LOG"
