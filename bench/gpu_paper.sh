#!/usr/bin/env bash
# One GPU session's work, prepared on CPU: checks, then the paper's regime on UCM, time-boxed.
#
#   bash bench/gpu_paper.sh OUTDIR [PACKED] [extra bench/gpu_paper.py options, e.g. --smoke]
#
# PACKED (default packed/ucm_captions_32.npz) comes from
#   .venv/bin/cmg data pack ucm_captions --root ../shared/data/ucm_captions --size 32 \
#       --out packed/ucm_captions_32.npz --trunk-config configs/ucm_captions_paper.yaml
# (images, caption embeddings and frozen-trunk features: the GPU machine needs no model weights or text model),
# and <folder of PACKED>/text_cache from bench/gpu_text_cache.py (BLISS's prompts and dictionary, embedded here;
# used as CMG_CACHE_DIR when present). `make gpu-pack` makes both.
# Writes OUTDIR/env.txt, OUTDIR/checks.log, OUTDIR/results.md|csv, OUTDIR/logs/, OUTDIR/runs/ (--audit: audit/) and
# OUTDIR/runs_slim.tgz (logs, metrics, scores and histories of the runs, without models: a few MB).
# Device call as made on an H200 on 2026-11-27 (ResNet-18, every method, 5 tasks: 242 s of protocol, about
# 6 minutes with the start; the device tool returns at most 8 files, so the folders are dropped there):
#   run(command="bash bench/gpu_paper.sh $OUT packed/ucm_captions_32.npz --backbones resnet18 --budget-s 330;
#       rm -rf $OUT/runs $OUT/logs $OUT/checks", carry=["packed"], timeout_s=540)
# The audit of the released protocol on the same tasks (`cmg audit`, departure by departure; scoring-only
# departures first, then the retraining ones; results.md holds the tables of each stage that finished):
#   run(command="bash bench/gpu_paper.sh $OUT packed/ucm_captions_32.npz --audit --backbones resnet18
#       --budget-s 400; rm -rf $OUT/audit $OUT/logs $OUT/checks", carry=["packed"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu_paper.sh OUTDIR [PACKED] [options]}
PACKED=${2:-packed/ucm_captions_32.npz}
shift $(( $# >= 2 ? 2 : 1 ))
PY=${PYTHON:-python3}  # the GPU machine has python3 only
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
mkdir -p "$OUT"
TEXT_CACHE="$(dirname "$PACKED")/text_cache"
if [ -f "$TEXT_CACHE/text_embeddings.sqlite" ] && [ -z "${CMG_CACHE_DIR:-}" ]; then
  export CMG_CACHE_DIR="$TEXT_CACHE"
fi
DEVICE=cuda
case " $* " in *" --smoke "*) DEVICE=cpu ;; esac
{
  date; nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# (a) checks of the end-to-end path on the device (under a minute); the CPU smoke checks two methods, tiny (the
# protocol below trains every method)
SMOKE_CHECKS=()
[ "$DEVICE" = cpu ] && SMOKE_CHECKS=(--set model.backbone=cnn --set model.width=4 --set e2.epochs=1
                                     --set "train.methods=[ssd, cmg[supcon]]")
timeout 120 "$PY" bench/gpu_checks.py --packed "$PACKED" --device "$DEVICE" --out "$OUT/checks" "${SMOKE_CHECKS[@]}" \
  2>&1 | tee "$OUT/checks.log" | grep -E "^(PASS|FAIL)|passed"
# (b)-(d) the 5-task protocol, every method, both readings; stops cleanly at the budget
"$PY" bench/gpu_paper.py --packed "$PACKED" --out "$OUT" "$@"
status=$?
# the runs (or the audit's) without their models, small enough to bring back from a lent machine
( cd "$OUT" && folders=$(ls -d runs audit 2>/dev/null || true) && [ -n "$folders" ] && tar czf runs_slim.tgz \
    --exclude=checkpoints --exclude=models --exclude=embeddings --exclude='*.npz' --exclude='*.pt' $folders logs )
exit $status
