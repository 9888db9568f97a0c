#!/usr/bin/env bash
# The whole GPU check in one call of the device tool (an H200: torch 2.11, transformers 5.17, peft there),
# under 8 minutes: sftkit vs TRL, full and LoRA, Qwen2.5-0.5B- and Llama-3.2-1B-shaped models in bf16,
# the packed-vs-unpacked loss check and the loss-alone memory table (bench/gpu/driver.py).
#
#   device run: command "bash bench/gpu/run.sh", carry [".whl"], timeout_s 540
#
# What that machine lacks travels as wheels in .whl/ (ignored by git; made here once, see bench/README.md):
#   trl 1.16.0, accelerate 1.16.0, datasets 5.2.0, dill, multiprocess, liger-kernel, cut-cross-entropy,
#   and sftkit's own missing dependencies (pydantic, pydantic-core, annotated-types, typing-inspection,
#   datasketch). sftkit itself runs from src/ (PYTHONPATH), not installed.
# Outside the device tool: OUT=/some/dir bash bench/gpu/run.sh [--dry-run] (driver.py's options pass through).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/sftkit-gpu-out}
mkdir -p "$OUT"
case " $* " in *" --dry-run "*) dry_run=1 ;; *) dry_run=0 ;; esac  # a dry run uses the venv it is given, not the wheels
if [ "$dry_run" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "run.sh: the wheels in .whl/ did not install" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
fi
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -n "${CUDA_VISIBLE_DEVICES+x}" ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PYTHON" -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
set -o pipefail
"$PYTHON" bench/gpu/driver.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
