#!/usr/bin/env bash
# One command for one Hopper GPU, under 8 minutes: `make gpu-check` or
#   scripts/gpu_check.sh [--cpu-dry] [--out DIR] [--keep] [--bench] [--budget SECONDS]
# Each step prints PASS/FAIL/SKIP with its figure; the run ends with one `SUMMARY {json}` line
# (and DIR/summary.json). Exit code 0 when no step failed. The steps are in scripts/gpu_check.py:
# TE / HAVE_TE / vLLM imports; TE-spec vs local-spec vs transformers logits (bf16) on a random
# Qwen3; Stage 1 in bf16, FP8 delayed and FP8 tensorwise on a random 1B Llama cut to 8 layers,
# with checkpoint save and reload; Stage 1 on a Qwen3-MoE (TE grouped GEMM, alltoall, pi_r
# router replay; EP=2 on two GPUs); the cache tool and Stage 2; vLLM rollouts vs the trainer's
# teacher-forced log-probs and vLLM on an mcore-to-hf export; tokens/s and MFU of Stage 1.
# --cpu-dry runs the CPU-runnable parts (imports, local-spec logits in fp32, tiny Stage 1s).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-$root/.venv/bin/python}"
if [[ ! -x "$py" ]]; then
  echo "FAIL setup: $py not found; run make install first (or set PYTHON)" >&2
  exit 1
fi

args=()
budget=480
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-dry) args+=(--cpu-dry); budget=$((budget + 420)); shift ;;  # CPU steps are slower
    --out) args+=(--out "$2"); shift 2 ;;
    --keep) args+=(--keep); shift ;;
    --bench) args+=(--bench); budget=$((budget + 600)); shift ;;
    --budget) budget="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (--cpu-dry, --out DIR, --keep, --bench, --budget SECONDS)" >&2; exit 2 ;;
  esac
done

if [[ " ${args[*]-} " != *" --cpu-dry "* ]]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "FAIL gpu: nvidia-smi sees no GPU (use --cpu-dry on a CPU machine)" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export PYTHONWARNINGS=ignore
cd "$root"
# steps that would start after the budget are reported as SKIP; a hang is killed at budget + 3 min
timeout --signal=TERM --kill-after=30 "$((budget + 180))" "$py" "$here/gpu_check.py" --budget "$budget" "${args[@]}"
