#!/usr/bin/env bash
# params/colab_t4.yaml on a GPU made to look like Colab's T4, with SD v1.4-shaped random weights
# (memory does not depend on the weights' values), in ONE call of at most 8 minutes on an H200:
#
#   1. every notebook of the course (fgbg.course.NOTEBOOKS), unchanged, through papermill with
#      params/colab_t4.yaml, each in its own kernel: its wall time and its peak GPU memory;
#   2. step 3's memory options (benchmarks/gpu_memory_sd14.py --finetune-options), with the time
#      left: peak GPU memory and seconds per step of each option at batch 4 and 8, in fp16, or OOM
#      (one line each as it goes; OUTDIR/finetune_options.json is rewritten after each).
#
# Both run with PyTorch's allocator capped at FGBG_GPU_MEMORY_GIB (default 14.5: a T4 has 15.0 GiB,
# and its CUDA context and libraries take about half a GiB outside the allocator). In the notebook
# kernels the cap (and the peak report, FGBG_PEAK_FILE) comes from an IPython start-up file that
# benchmarks/gpu_memory_sd14.py --write-kernel-startup writes and IPYTHONDIR points to.
#
# Usage: bash tools/gpu_colab_check.sh OUTDIR
#   PARTS="notebooks options" (default both)   FGBG_GPU_MEMORY_GIB=14.5   PY=python3
# Needs what tools/gpu_sd14_check.sh needs (torch with CUDA, diffusers, transformers, papermill,
# ipykernel), and peft (LoRA) and bitsandbytes (8-bit AdamW): installed from the wheels in
# ${FGBG_WHEELS:-runs/wheels} when they are missing (a machine without internet: download them
# beforehand with `pip download --no-deps peft bitsandbytes -d runs/wheels` and carry runs/wheels).
# Writes OUTDIR/finetune_options.json, OUTDIR/peak_<notebook>.json, OUTDIR/colab_notebooks.tgz.
set -u
OUTD=${1:?usage: bash tools/gpu_colab_check.sh OUTDIR}
mkdir -p "$OUTD"; OUTD=$(cd "$OUTD" && pwd)
PY=${PY:-python3}
PARTS=${PARTS:-"notebooks options"}
START=$(date +%s)
DEADLINE=$(( START + ${BUDGET_S:-465} ))   # stop in time to report within 8 minutes
left() { echo $(( DEADLINE - $(date +%s) )); }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} TQDM_DISABLE=1 HF_HUB_OFFLINE=1
export FGBG_GPU_MEMORY_GIB=${FGBG_GPU_MEMORY_GIB:-14.5}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
WHEELS=${FGBG_WHEELS:-runs/wheels}
for m in peft bitsandbytes; do
  if ! $PY -c "import $m" 2>/dev/null; then
    if ls "$WHEELS"/$m-*.whl >/dev/null 2>&1; then $PY -m pip install -q --no-deps "$WHEELS"/$m-*.whl
    else echo "$m: not installed and no wheel in $WHEELS: its options are skipped"; fi
  fi
done
LIMIT=$($PY -c "import yaml; print(yaml.safe_load(open('params/colab_t4.yaml'))['limit'])")
$PY -m fgbg.miniworld cub /tmp/colab_cub --n-train "$LIMIT" --n-test "$LIMIT" >/dev/null
CUB=/tmp/colab_cub/CUB_200_2011
[ -f /tmp/sd14-random/model_index.json ] || $PY -c "import torch; from fgbg.models import random_pipeline; \
random_pipeline('sd14').to(torch.float16).save_pretrained('/tmp/sd14-random')"
export IPYTHONDIR=/tmp/fgbg-ipython
$PY benchmarks/gpu_memory_sd14.py --write-kernel-startup "$IPYTHONDIR" >/dev/null
echo "set-up: $(( $(date +%s) - START )) s; cap ${FGBG_GPU_MEMORY_GIB} GiB"

if [[ " $PARTS " == *" notebooks "* ]]; then
  rm -rf /tmp/colabrun
  for nb in $($PY -c "from fgbg.course import NOTEBOOKS; print(*NOTEBOOKS)"); do
    if (( $(left) < 20 )); then echo "$nb: not run (out of time)"; continue; fi
    export FGBG_PEAK_FILE=$OUTD/peak_$nb.json
    rm -f "$FGBG_PEAK_FILE"
    t0=$(date +%s)
    timeout "$(left)" $PY -m fgbg.course run -f params/colab_t4.yaml -p model /tmp/sd14-random \
        -p base_dir "$CUB" -p out_dir /tmp/colabrun --notebooks "$nb" 2>&1 | grep -v "^== \|done in" | tail -4
    echo "$nb: $(( $(date +%s) - t0 )) s, peak $(cat "$FGBG_PEAK_FILE" 2>/dev/null || echo '(no report)')"
  done
  unset FGBG_PEAK_FILE
  tar czf "$OUTD/colab_notebooks.tgz" -C /tmp/colabrun notebooks metrics.json 2>/dev/null
  $PY -c "import json; from fgbg.course import results_table; \
print(results_table(json.load(open('/tmp/colabrun/metrics.json')), table2=True))" 2>/dev/null | tail -12
fi
if [[ " $PARTS " == *" options "* ]] && (( $(left) >= 30 )); then
  echo "== step 3's memory options (fp16, capped at ${FGBG_GPU_MEMORY_GIB} GiB), $(left) s left"
  timeout "$(left)" $PY benchmarks/gpu_memory_sd14.py --finetune-options --model /tmp/sd14-random \
      --params params/colab_t4.yaml --base-dir "$CUB" --out-dir /tmp/ftopts --batches 4 8 \
      --json "$OUTD/finetune_options.json" 2>&1 | grep -v "Warning\|warn(" | tail -25
fi

echo "total: $(( $(date +%s) - START )) s"
