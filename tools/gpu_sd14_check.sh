#!/usr/bin/env bash
# The CUB + SD v1.4 parameters on a GPU, with SD v1.4-shaped random weights (no hub here):
# peak memory of every step (benchmarks/gpu_memory_sd14.py), the five notebooks run unchanged
# through papermill with params/cub_sd14.yaml (long steps shortened), and step 1's speed.
# Usage: bash tools/gpu_sd14_check.sh OUTDIR
set -u
OUTD=$1; mkdir -p "$OUTD"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m fgbg.miniworld cub /tmp/cubmini --n-train 8 --n-test 4
timeout 150 python3 benchmarks/gpu_memory_sd14.py --base-dir /tmp/cubmini/CUB_200_2011 --out-dir /tmp/memrun \
    --json "$OUTD/memory.json" 2>&1 | tail -25
python3 -c "import torch; from fgbg.models import random_pipeline; random_pipeline('sd14').to(torch.float16).save_pretrained('/tmp/sd14-random')"
t0=$(date +%s)
timeout 270 python3 -m fgbg.course run -f params/cub_sd14.yaml -p model /tmp/sd14-random \
    -p base_dir /tmp/cubmini/CUB_200_2011 -p out_dir /tmp/cubrun -p finetune_steps 20 -p seg_iterations 200 -p dprime_size 4 2>&1 | tail -30
echo "notebooks: $(( $(date +%s) - t0 )) s"
tar czf "$OUTD/cub_notebooks.tgz" -C /tmp/cubrun notebooks metrics.json 2>/dev/null
timeout 100 python3 benchmarks/bench_step1.py --model sd14 --device cuda --dtype bf16 --images 4 2>&1 | tail -5
