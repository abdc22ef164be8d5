#!/usr/bin/env bash
# One prepared GPU check, under 8 minutes on one GPU: the CUDA-marked tests (bf16-mixed, a
# channels_last teacher, every method's hot path under torch.cuda.set_sync_debug_mode("error"),
# 2-GPU DDP where two GPUs exist), the quickstart recipe on CUDA for 2 epochs, the quickstart under
# ModelParallelStrategy (FSDP2, NCCL) on one GPU writing a sharded checkpoint folder, and every speed
# suite with small step counts (absolute times and ratios). Without CUDA it prints
# "no CUDA: skipped" and exits 0.
#   bash scripts/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA: skipped (scripts/gpu_check.sh needs a CUDA device; nothing was run)"
  exit 0
fi

status=0
start=$(date +%s)
deadline=$(( start + 450 ))  # the whole check stays under 8 minutes
section() { echo; echo "== $1 ($(( $(date +%s) - start )) s elapsed)"; }
budget() {  # seconds for the next command: at most $1, never past the deadline
  local left=$(( deadline - $(date +%s) ))
  (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"
}
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(), '| count:', torch.cuda.device_count(), '| torch', torch.__version__)"

section "CUDA-marked tests"
timeout "$(budget 200)" "$PY" -m pytest -m cuda tests/test_cuda.py tests/test_hot_path.py -q -p no:cacheprovider -rs || status=1

section "quickstart on CUDA (2 epochs)"
run_dir=$(mktemp -d)
timeout "$(budget 90)" "$PY" -m lightning_logits.cli fit --config recipes/quickstart.yaml --trainer.accelerator gpu \
  --trainer.max_epochs 2 --trainer.logger.init_args.save_dir "$run_dir" \
  --trainer.default_root_dir "$run_dir" 2>&1 | tail -n 15 || status=1
rm -rf "$run_dir"

section "ModelParallelStrategy (FSDP2) on 1 GPU: quickstart, 1 epoch, sharded (NCCL), then the sharded tests' worker"
run_dir=$(mktemp -d)
timeout "$(budget 90)" "$PY" -m lightning_logits.cli fit --config recipes/quickstart.yaml --trainer.accelerator gpu \
  --trainer.devices 1 --trainer.strategy lightning.pytorch.strategies.ModelParallelStrategy \
  --trainer.strategy.data_parallel_size 1 --trainer.strategy.tensor_parallel_size 1 \
  --trainer.max_epochs 1 --trainer.logger.init_args.save_dir "$run_dir" \
  --trainer.default_root_dir "$run_dir" 2>&1 | tail -n 8 || status=1
ls -d "$run_dir"/quickstart/version_*/checkpoints/last.ckpt/ 2>/dev/null && echo "sharded checkpoint folder written" || status=1
rm -rf "$run_dir"

section "speed suites (each at most 60 s; 20 steps x 2 rounds after 5 warm-up steps; median step, ratio to baseline)"
for suite in $("$PY" -c "from benchmarks.harness import available_suites; print(' '.join(available_suites()))"); do
  timeout "$(budget 60)" "$PY" -m benchmarks.speed --suite "$suite" --steps 20 --warmup 5 --rounds 2 --accelerator gpu \
    --out "$(mktemp -d)" || { echo "suite $suite failed or timed out"; status=1; }
done

section "done: exit status $status"
exit "$status"
