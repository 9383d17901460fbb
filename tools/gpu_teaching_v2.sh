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
#   VARIANTS="v2:"  UNets to train side by side on the card, each "name:extra train flags", sharing
#                the corpus, VAE and latents (e.g. "v2: omit9:--p-omit 0.9 wide:--unet-channels 48,96,192");
#                the first trains in $W, the others in $W-name; at most 3 with PACK_TO
#   EVAL=1       score each exported model on the v2 course splits (benchmarks/world_v2_baselines.py's
#                run_world: step-1 AUC, M_pre IoU, bird vs other, M_crop; then ab_world_eval's cue swap)
#   PACK_TO=DIR  copy logs.tgz and, per variant, its text encoder and the rest of its pipeline there
#                (each < 16 MB: NAME_te.safetensors, NAME_rest.tgz)
set -u
OUTD=${1:?usage: bash tools/gpu_teaching_v2.sh OUTDIR}
W=${W:-/tmp/tv2w}
CORPUS=${CORPUS:-30000}; WORKERS=${WORKERS:-16}; VAE_STEPS=${VAE_STEPS:-2000}
STEPS=${STEPS:-2000}; BATCH=${BATCH:-1024}; MINUTES=${MINUTES:-4}; DEV=(); BIRD_SHARE=${BIRD_SHARE:-0.5}
read -r -a SPECS <<< "${VARIANTS:-v2:}"
if [ -n "${PACK_TO:-}" ] && [ "${#SPECS[@]}" -gt 3 ]; then
  echo "PACK_TO takes at most 3 variants (the device returns 8 files); VARIANTS has ${#SPECS[@]}"; exit 1
fi
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
# the variants side by side; each shares the corpus, tokenizer, VAE and latents of $W
# (VARIANTS splits at spaces: a word without a colon continues the flags of the variant before it)
VDIRS=(); VNAMES=()
i=0; PIDS=()
while [ $i -lt ${#SPECS[@]} ]; do
  spec=${SPECS[$i]}; name=${spec%%:*}; i=$((i + 1))
  flags=(); [ -n "${spec#*:}" ] && flags=("${spec#*:}")
  while [ $i -lt ${#SPECS[@]} ] && [[ ${SPECS[$i]} != *:* ]]; do flags+=("${SPECS[$i]}"); i=$((i + 1)); done
  d=$W; [ ${#VNAMES[@]} -gt 0 ] && d=$W-$name
  if [ "$d" != "$W" ]; then
    mkdir -p "$d"
    for f in corpus tokenizer latents.pt vae_ckpt.pt vae_from.json; do [ -e "$W/$f" ] && ln -sfn "$W/$f" "$d/$f"; done
  fi
  VDIRS+=("$d"); VNAMES+=("$name")
  $PY -m fgbg.teaching_model train --work "$d" --corpus-size "$CORPUS" --vae-steps "$VAE_STEPS" "${VF[@]}" "${CW[@]}" \
      --steps "$STEPS" --batch "$BATCH" --lr 1e-3 --ema 0.999 --p-omit 0.6 --max-minutes "$MINUTES" "${DEV[@]}" \
      "${flags[@]}" --save-to "$d/pipeline" > "$OUTD/train_$name.log" 2>&1 &
  PIDS+=($!)
done
fail=0
for k in "${!PIDS[@]}"; do
  wait "${PIDS[$k]}" || { echo "variant ${VNAMES[$k]} failed:"; tail -30 "$OUTD/train_${VNAMES[$k]}.log"; fail=1; }
done
[ $fail = 0 ] || exit 1
for k in "${!VNAMES[@]}"; do
  name=${VNAMES[$k]}; d=${VDIRS[$k]}
  echo "$name:"; grep -h "stopping" "$OUTD/train_$name.log" | tail -c 200; tail -1 "$d/unet_log.jsonl"
  cp "$d/unet_log.jsonl" "$OUTD/unet_log_$name.jsonl"; cp "$d/config.json" "$OUTD/config_$name.json"
done
echo "UNets done and exported at $(( $(date +%s) - t0 )) s"
cp "$W/vae_log.jsonl" "$OUTD/" 2>/dev/null
for k in "${!VNAMES[@]}"; do
  [ "${EVAL:-1}" = 1 ] || break
  name=${VNAMES[$k]}; d=${VDIRS[$k]}; mkdir -p "$OUTD/$name"
  $PY - "$d/pipeline" "$OUTD/$name" <<'PY' > "$OUTD/eval_$name.log" 2>&1 || tail -20 "$OUTD/eval_$name.log"
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
  echo "$name:"; tail -2 "$OUTD/eval_$name.log"; echo "evaluation of $name done at $(( $(date +%s) - t0 )) s"
done
if [ -n "${PACK_TO:-}" ]; then
  mkdir -p "$PACK_TO"
  tar czf "$PACK_TO/logs.tgz" -C "$OUTD" --exclude='*/eval/v2/data' --exclude='*/eval/data' .
  for k in "${!VNAMES[@]}"; do
    name=${VNAMES[$k]}; d=${VDIRS[$k]}
    cp "$d/pipeline/text_encoder/model.safetensors" "$PACK_TO/${name}_te.safetensors"
    tar czf "$PACK_TO/${name}_rest.tgz" -C "$d" --exclude=pipeline/text_encoder/model.safetensors \
        --exclude=pipeline/tokenizer pipeline
  done
  ls -la "$PACK_TO"
fi
