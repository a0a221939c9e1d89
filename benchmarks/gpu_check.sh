#!/usr/bin/env bash
# The GPU checks of issue 14 as one prepared script for a (leased) CUDA machine. Not a test; CI never runs it.
#
#   bash benchmarks/gpu_check.sh OUT_DIR      # run in the repo root; PYTHON (default python3) must import edgerlhf
#
# In order, each part logged to OUT_DIR/<part>.log, and a part that fails does not stop the next:
#   1. pipeline   notebooks 00 -> 04 on the GPU under the 8 GiB cap (run.vram_budget_gib): the `full` profile on the
#                 embedded model, shortened to fit minutes of device time (GPU_CHECK_SETS below: SFT and reward
#                 training stop after a few optimizer steps, one reward seed, 3 PPO steps per experiment);
#   2. stages     benchmarks/stages.py on that run: each stage's CUDA peak against the planner, SFT and reward
#                 training tokens/s, the PPO step split;
#   3. ppo_step   benchmarks/ppo_step.py at the research plan's PPO step (batch 32 = 16 micro-batches of 2, 4
#                 optimizer steps of 8 per epoch, 64 new tokens, 4 epochs) with the run's bf16 reward model on the CPU;
#   4. gpu_tests  the tests marked `gpu` (the tiny pipeline for real on the CUDA device).
# nvidia-smi is sampled every 2 s into OUT_DIR/gpu_util.csv (utilisation, memory used), and OUT_DIR/run.tar.gz
# holds the run folder (records, executed notebooks and their HTML, figures) and the benchmarks' JSON.
set -u
OUT_DIR=${1:?usage: gpu_check.sh OUT_DIR}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
progress() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$OUT_DIR/progress.txt"; }

nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 2 >"$OUT_DIR/gpu_util.csv" 2>&1 &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT

set -f  # the [42] below is a value, not a glob
SETS=(${GPU_CHECK_SETS:---set model.name=smollm2-135m-instruct --set sft.max_steps=30 --set reward.max_steps=25
      --set reward.seeds=[42] --set ppo.steps=3 --set ppo.n_eval_prompts=64})
set +f
progress "pipeline start: --profile full ${SETS[*]}"
"$PY" -m edgerlhf.run --profile full --no-progress "${SETS[@]}" >"$OUT_DIR/pipeline.log" 2>&1
progress "pipeline rc=$?"
# the run the pipeline just made, from the current-run pointer it writes (edgerlhf.core.records.current_run)
RUN=$("$PY" -c 'from edgerlhf.core.records import current_run; print(current_run("results") or "")' \
  2>"$OUT_DIR/current_run.log")

progress "stages start ($RUN)"
"$PY" benchmarks/stages.py --run-dir "$RUN" >"$OUT_DIR/stages.log" 2>&1
progress "stages rc=$?"

progress "ppo_step start"
"$PY" benchmarks/ppo_step.py --policy models/sft/model/merged --reward models/rm/bf16 --reward-device cpu \
  --prompts data/prefs/train_prefs.jsonl --batch 32 --micro-batch 2 --accumulation 4 --ppo-epochs 4 \
  --max-new-tokens 64 --steps 2 --tag=-gpu >"$OUT_DIR/ppo_step.log" 2>&1
progress "ppo_step rc=$?"

progress "gpu_tests start"
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests >"$OUT_DIR/gpu_tests.log" 2>&1
progress "gpu_tests rc=$?"

tar -czf "$OUT_DIR/run.tar.gz" --exclude='*.safetensors' --exclude='*.pt' "$RUN" results/benchmarks \
  2>>"$OUT_DIR/progress.txt"
progress "done"
