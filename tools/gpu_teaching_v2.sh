#!/usr/bin/env bash
# Teaching model v2 in one device call: the world-v2 corpus, then the shipped recipe from
# scratch (its own VAE on the v2 corpus, UNet batch 1,024, lr 1e-3, EMA 0.999, p_omit 0.6),
# exported and packed for the trip back. See docs/teaching_model.md ("A/B" and "World v2").
#
#   bash tools/gpu_teaching_v2.sh OUTDIR            # one H100/H200: about 7-8 minutes
#   DRY=1 bash tools/gpu_teaching_v2.sh /tmp/tv2    # CPU dry run with tiny sizes (~2 min)
#
# Environment (defaults = the shipped recipe):
#   W=/tmp/tv2w  work folder    CORPUS=30000  WORKERS=16  VAE_STEPS=2000  STEPS=2000  BATCH=1024
#   BIRD_SHARE=0.5  share of birds among the corpus's objects (miniworld corpus --bird-share; 1/6: all classes alike)
#   MINUTES=4    UNet budget (--max-minutes: stops cleanly, a rerun resumes)
#   VAE_FROM=PIPELINE  take that pipeline's VAE instead of training one (--vae-from)
#   EVAL=1       score the exported model on the v2 course splits (benchmarks/world_v2_baselines.py's
#                run_world: step-1 AUC, M_pre IoU, bird vs other, M_crop; then ab_world_eval's cue swap)
#   PACK_TO=DIR  copy logs.tgz, the text encoder and the rest of the pipeline there (each < 16 MB)
set -u
OUTD=${1:?usage: bash tools/gpu_teaching_v2.sh OUTDIR}
W=${W:-/tmp/tv2w}
CORPUS=${CORPUS:-30000}; WORKERS=${WORKERS:-16}; VAE_STEPS=${VAE_STEPS:-2000}
STEPS=${STEPS:-2000}; BATCH=${BATCH:-1024}; MINUTES=${MINUTES:-4}; DEV=(); BIRD_SHARE=${BIRD_SHARE:-0.5}
if [ "${DRY:-0}" = 1 ]; then
  CORPUS=64; WORKERS=2; VAE_STEPS=2; STEPS=3; BATCH=8; MINUTES=2; DEV=(--device cpu --threads 1)
fi
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
mkdir -p "$W" "$OUTD"
t0=$(date +%s)
if [ ! -f "$W/corpus/scenes.jsonl" ]; then
  $PY -m fgbg.miniworld corpus "$W/corpus" -n "$CORPUS" --seed 0 --size 64 --world v2 --workers "$WORKERS" \
      --bird-share "$BIRD_SHARE" > "$OUTD/corpus.log" 2>&1 || { tail -30 "$OUTD/corpus.log"; exit 1; }
fi
echo "v2 corpus ($CORPUS scenes) at $(( $(date +%s) - t0 )) s"
VF=(); [ -n "${VAE_FROM:-}" ] && VF=(--vae-from "$VAE_FROM")
CW=(--world v2 --bird-share "$BIRD_SHARE")
# the VAE batch and steps of the shipped recipe; prepare keeps the corpus written above and
# refuses one (left in $W by another call) whose corpus.json says other settings
$PY -m fgbg.teaching_model prepare --work "$W" --corpus-size "$CORPUS" --vae-steps "$VAE_STEPS" "${VF[@]}" "${CW[@]}" \
    "${DEV[@]}" > "$OUTD/prepare.log" 2>&1 || { tail -30 "$OUTD/prepare.log"; exit 1; }
echo "VAE + latents at $(( $(date +%s) - t0 )) s"; grep -i "scaling" "$OUTD/prepare.log"
$PY -m fgbg.teaching_model train --work "$W" --corpus-size "$CORPUS" --vae-steps "$VAE_STEPS" "${VF[@]}" "${CW[@]}" \
    --steps "$STEPS" --batch "$BATCH" --lr 1e-3 --ema 0.999 --p-omit 0.6 --max-minutes "$MINUTES" "${DEV[@]}" \
    --save-to "$W/pipeline" > "$OUTD/train.log" 2>&1 || { tail -30 "$OUTD/train.log"; exit 1; }
grep -h "stopping" "$OUTD/train.log" | tail -c 200; tail -1 "$W/unet_log.jsonl"
echo "UNet done and exported at $(( $(date +%s) - t0 )) s"
cp "$W/unet_log.jsonl" "$W/config.json" "$OUTD/"; cp "$W/vae_log.jsonl" "$OUTD/" 2>/dev/null
if [ "${EVAL:-1}" = 1 ]; then
  $PY - "$W/pipeline" "$OUTD" <<'PY' > "$OUTD/eval.log" 2>&1 || tail -20 "$OUTD/eval.log"
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import torch
from world_v2_baselines import run_world
from fgbg import models, params
P = params.defaults()
dev = "cuda" if torch.cuda.is_available() else "cpu"
pipe = models.load_pipeline(sys.argv[1], dev, "fp32")
res = run_world("v2", Path(sys.argv[2]) / "eval", pipe, P)
t, d = res["test"], res["distractor"]
print(json.dumps({"step1_auc": t["step1_auc"], "m_pre_iou": t["prelim"]["iou"], "m_crop_iou": t["crop"]["iou"],
                  "bird_vs_other": d["bird_vs_distractor_auc"]}))
(Path(sys.argv[2]) / "eval_v2.json").write_text(json.dumps(res, indent=1))
from ab_world_eval import score_cue_swap  # what its "bird" means: the same pictures, typical and swapped cues
cs = score_cue_swap(Path(sys.argv[2]) / "eval" / "data", Path(sys.argv[2]) / "eval", pipe, P)
print(json.dumps({"cue_swap": cs}))
PY
  tail -2 "$OUTD/eval.log"; echo "evaluation done at $(( $(date +%s) - t0 )) s"
fi
if [ -n "${PACK_TO:-}" ]; then
  mkdir -p "$PACK_TO"
  tar czf "$PACK_TO/logs.tgz" -C "$OUTD" --exclude=eval/v2/data .
  cp "$W/pipeline/text_encoder/model.safetensors" "$PACK_TO/v2_te.safetensors"
  tar czf "$PACK_TO/v2_rest.tgz" -C "$W" --exclude=pipeline/text_encoder/model.safetensors --exclude=pipeline/tokenizer pipeline
  ls -la "$PACK_TO"
fi
