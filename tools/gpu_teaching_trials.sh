#!/usr/bin/env bash
# Teaching-model trials on one GPU (run through the device tool; see docs/teaching_model.md).
# One shared corpus + VAE, then several UNet variants trained side by side on the card,
# each exported and evaluated with notebooks 01-02 (papermill), as the course runs them.
# Usage: bash tools/gpu_teaching_trials.sh MINUTES OUTDIR "name:flags" ["name:flags" ...]
set -u
MIN=$1; OUTD=$2; shift 2
W=${W:-/tmp/tt}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
mkdir -p "$W/base" "$OUTD"
t0=$(date +%s)
# VAE_CKPT: reuse a trained VAE (its checkpoint at >= --vae-steps is resumed, not retrained)
[ -n "${VAE_CKPT:-}" ] && cp "$VAE_CKPT" "$W/base/vae_ckpt.pt"
python3 -m fgbg.teaching_model prepare --work "$W/base" --corpus-size "${CORPUS:-30000}" --vae-steps "${VAE_STEPS:-3000}" \
    --vae-batch 64 > "$OUTD/prepare.log" 2>&1 || { tail -30 "$OUTD/prepare.log"; exit 1; }
echo "prepare done in $(( $(date +%s) - t0 )) s"; grep -i "scaling" "$OUTD/prepare.log"
for spec in "$@"; do
  name=${spec%%:*}; flags=${spec#*:}
  mkdir -p "$W/$name"
  for f in corpus tokenizer latents.pt vae_ckpt.pt; do ln -sfn "$W/base/$f" "$W/$name/$f"; done
  # shellcheck disable=SC2086
  python3 -m fgbg.teaching_model train --work "$W/$name" --steps 1000000 --max-minutes "$MIN" $flags \
      --save-to "$W/$name/pipeline" > "$OUTD/train_$name.log" 2>&1 &
done
wait
echo "training done at $(( $(date +%s) - t0 )) s"
[ "${EVAL:-1}" = 1 ] && python3 -m fgbg.miniworld course data/miniworld > /dev/null  # once, before the parallel evaluations
for spec in "$@"; do
  [ "${EVAL:-1}" = 1 ] || break
  name=${spec%%:*}
  grep -h "stopping" "$OUTD/train_$name.log" | tail -c 200; tail -1 "$W/$name/unet_log.jsonl"
  python3 -m fgbg.course run -f params/demo.yaml -p model "$W/$name/pipeline" -p out_dir "$W/runs/$name" \
      -p dtype fp32 --notebooks 01_attention,02_masks > "$OUTD/eval_$name.log" 2>&1 &
done
wait
echo "evaluation done at $(( $(date +%s) - t0 )) s"
for spec in "$@"; do
  name=${spec%%:*}
  cp "$W/runs/$name/metrics.json" "$OUTD/metrics_$name.json" 2>/dev/null || tail -20 "$OUTD/eval_$name.log"
  cp "$W/$name/unet_log.jsonl" "$OUTD/unet_log_$name.jsonl"
done
# Pack for the trip back (the device tool returns at most 8 files of 16 MB): all logs and
# metrics in one archive, and the pipelines of the best two variants (text encoder apart).
if [ -n "${PACK_TO:-}" ]; then
  python3 - "$OUTD" "$W" "$PACK_TO" "$@" <<'PY'
import json, os, sys, tarfile, shutil
from pathlib import Path
outd, w, pack, specs = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
def score(m):
    try:
        return min(m["step1_auc"] / 0.95, m["prelim"]["iou"] / 0.40, m["distractor"]["bird_vs_distractor_auc"] / 0.80)
    except (KeyError, TypeError):
        return -1
rank = []
for s in specs:
    name = s.split(":")[0]
    f = outd / f"metrics_{name}.json"
    m = json.loads(f.read_text()) if f.exists() else {}
    rank.append((score(m), name))
    print(name, round(score(m), 3), {k: m.get(k) for k in ("step1_auc",)}, m.get("prelim", {}).get("iou"),
          m.get("distractor", {}).get("bird_vs_distractor_auc"), m.get("controls"))
with tarfile.open(pack / "logs.tgz", "w:gz") as t:
    t.add(outd, arcname="trials")
for _, name in sorted(rank, reverse=True)[:int(os.environ.get("PACK_N", 2))]:
    p = w / name / "pipeline"
    if not p.exists():
        continue
    shutil.copy(p / "text_encoder" / "model.safetensors", pack / f"{name}_te.safetensors")
    with tarfile.open(pack / f"{name}_rest.tgz", "w:gz") as t:
        for q in p.iterdir():
            if q.name not in ("tokenizer",):
                t.add(q, arcname=f"pipeline/{q.name}",
                      filter=lambda ti: None if ti.name.endswith("text_encoder/model.safetensors") else ti)
PY
fi
