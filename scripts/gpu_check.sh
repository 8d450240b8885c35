#!/usr/bin/env bash
# One short GPU session (at most ~10 minutes): every real-size figure, as files in OUT_DIR.
#
#   bash scripts/gpu_check.sh OUT_DIR             # a fresh one-GPU machine, this repo checked out, PyPI reachable
#   bash scripts/gpu_check.sh OUT_DIR --dry-run   # the same stages and entry points on CPU with the tiny model
#
# Stages, in order of what matters most; each has its own timeout, and a failed or
# timed-out stage is recorded (OUT_DIR/<stage>.rc) while the next one still runs. A
# stage that would start with less than 20 s of the budget left is skipped.
#   setup          a venv (.venv-gpu): python3's torch if it sees CUDA, else torch from PyPI
#                  (its Linux wheel is the CUDA build); the package, bitsandbytes, NVML
#   telemetry      NVML sampled every second for the whole session (nvml.jsonl) and a real
#                  worker's heartbeats (heartbeat.json; fails unless every GPU field is filled)
#   build-1.3b     DeepSeek-Coder 1.3B, real config, random weights (built on the GPU)
#   bench-1.3b     tokens/s, max_memory_reserved, NVML used, MFU, planner estimate: 1.3B LoRA
#   build-6.7b     the same for 6.7B (13.5 GB of disk)
#   bench-6.7b-qlora   6.7B QLoRA under set_per_process_memory_fraction(16 GiB), sequence 2048
#   rl-1.3b        the GRPO preset (configs/deepseek-coder-1.3b-grpo-16gb.yaml) held to 16 GiB:
#                  generation and update tokens/s, peak GPU memory, planner estimate, SIGKILL
#                  and resume with every step's reward and loss compared
#   resume-1.3b    10 steps, SIGKILL after a checkpoint, resume: bit-exact or the deviation,
#                  checkpoint size and device-to-host (blocked) seconds, PeftModel + merged load
#   planner        estimated vs measured max_memory_reserved of the planner's picks (16 GiB cap)
#   zero3-offload  deepspeed installed, 6.7B bf16 LoRA with ZeRO-3 offload, capped at 16 GiB
#
# Environment: GPU_CHECK_BUDGET_S (default 570), GPU_CHECK_STAGES (space-separated subset),
# GPU_CHECK_LIMIT_<STAGE> (seconds; stage name upper-cased, '-' and '.' as '_'),
# GPU_CHECK_MIN_STAGE_S (default 20), GPU_CHECK_WORK (scratch for run dirs), TORCH_SPEC
# (default torch==2.13.0), UFF_PORT_PYTHON (use this interpreter; no venv is made),
# GPU_CHECK_WHEELS (a folder of wheels installed with --no-index instead of reaching PyPI:
# a machine with no network; the package itself is then used from this checkout).
# Files: <stage>.log, <stage>.rc, <stage>.json (figures), nvml.jsonl, heartbeat.json,
# summary.json (every stage's rc, seconds and figures), gpu_check.log.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR [--dry-run]}
DRY=0
[[ "${2:-}" == "--dry-run" ]] && DRY=1
cd "$(dirname "$0")/.."
ROOT=$PWD
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-570}
STAGES=${GPU_CHECK_STAGES:-"setup telemetry build-1.3b bench-1.3b rl-1.3b build-6.7b bench-6.7b-qlora resume-1.3b planner zero3-offload"}
# Large files (models, run directories) stay out of OUT_DIR: it travels back.
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}
WHEELS=${GPU_CHECK_WHEELS:-}
SITE=${TMPDIR:-/tmp}/gpu-check-site
export PYTHONPATH=$ROOT${WHEELS:+:$SITE} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export UFF_PORT_CACHE=${UFF_PORT_CACHE:-$ROOT/.cache/uff-port}
PY=${UFF_PORT_PYTHON:-}
[[ -n "$PY" ]] || { [[ $DRY == 1 ]] && PY=$(command -v python3); }
[[ -z "$PY" && -x .venv-gpu/bin/python ]] && PY=$ROOT/.venv-gpu/bin/python

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_check.log" >&2; }

# stage NAME DEFAULT_LIMIT CMD...: run with its own timeout, rc in NAME.rc, output in NAME.log.
stage() {
  local name=$1 limit=$2; shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  local var="GPU_CHECK_LIMIT_$(echo "$name" | tr 'a-z.-' 'A-Z__')"
  limit=${!var:-$limit}
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  if (( limit < ${GPU_CHECK_MIN_STAGE_S:-20} )); then
    log "$name: skipped, ${left}s of the budget left"
    echo skipped > "$OUT/$name.rc"
    return 0
  fi
  log "$name: start (limit ${limit}s)"
  export STAGE=$name
  local t0=$(date +%s)
  # A child bash runs the stage (functions and variables exported below), so timeout can kill it.
  timeout -k 10 "$limit" bash -c '"$@"' _ "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$rc" > "$OUT/$name.rc"
  echo "$(( $(date +%s) - t0 ))" > "$OUT/$name.seconds"
  log "$name: rc=$rc in $(( $(date +%s) - t0 ))s$([[ $rc == 124 || $rc == 137 ]] && echo ' (timed out)')"
}

setup() {
  if [[ $DRY == 1 ]]; then
    "$PY" -c "import torch, transformers, peft, bitsandbytes; print('dry run: torch', torch.__version__)"
    return
  fi
  if [[ -z "$PY" ]]; then
    local cuda_torch=0 venv_args=()
    python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && cuda_torch=1
    (( cuda_torch )) && venv_args=(--system-site-packages)   # keep the machine's CUDA torch
    if python3 -m venv "${venv_args[@]}" .venv-gpu; then
      PY=$ROOT/.venv-gpu/bin/python
    else  # no ensurepip (python3-venv missing): the machine's interpreter itself
      PY=$(command -v python3)
      export PIP_BREAK_SYSTEM_PACKAGES=1
    fi
    (( cuda_torch )) || "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" || return 1
  fi
  echo "$PY" > "$OUT/python.path"   # the parent reads which interpreter the stages use
  if [[ -n "$WHEELS" ]]; then  # no network: what the machine lacks was carried in as wheels
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || return 1
  else
    "$PY" -m pip install -q -e ".[train]" "bitsandbytes>=0.50" "nvidia-ml-py>=12.0" psutil || return 1
  fi
  "$PY" -c "import pydantic, transformers, peft, msgpack, psutil; print('transformers', transformers.__version__, 'peft', peft.__version__)" || return 1
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
}

# The two GPU-bound entry points, or their CPU smoke on the tiny model.
bench() {  # bench CASE SEQ_LEN
  local extra=(--seq-len "$2" --json-out "$OUT/$STAGE.json" --no-baseline)
  [[ $DRY == 1 ]] && extra+=(--smoke)
  "$PY" scripts/bench_gpu_training.py --only "$1" "${extra[@]}"
}

build() {  # build SIZE: the weights on a GPU; on a dry run only the meta-device counts
  "$PY" scripts/build_real_arch.py "$1" --meta > "$OUT/build-$1.json" || return 1
  [[ $DRY == 1 ]] && return 0
  "$PY" scripts/build_real_arch.py "$1" --device cuda
}

resume() {
  local args=(--out "$WORK/resume-1.3b")
  if [[ $DRY == 1 ]]; then
    args+=(--model builtin:tiny-llama --device cpu --steps 6 --ckpt-every 3 --seq-len 64)
  else
    args+=(--device cuda --seq-len 2048 --micro-batch 4 --grad-accum 2 --steps 10 --ckpt-every 5)
  fi
  "$PY" scripts/real_size_check.py "${args[@]}"
  local rc=$?
  cp "$WORK/resume-1.3b/result.json" "$OUT/resume-1.3b.json" 2>/dev/null
  for run in uninterrupted killed; do
    cp "$WORK/resume-1.3b/$run/events.jsonl" "$OUT/resume-1.3b-$run.events.jsonl" 2>/dev/null
  done
  return $rc
}

rl() {  # the GRPO preset as on a 16 GB card; the dry run: rl-tiny on CPU
  local args=(--out "$WORK/rl-1.3b" --steps 4 --ckpt-every 2)
  if [[ $DRY == 1 ]]; then
    args+=(--preset configs/rl-tiny.yaml --model builtin:tiny-llama --device cpu --seq-len 64)
  else
    args+=(--preset configs/deepseek-coder-1.3b-grpo-16gb.yaml --device cuda --cap-gib 16 --seq-len 2048
           --micro-batch 8 --tolerance 1e9)  # CUDA sampling may differ: the deviation is the figure
  fi
  "$PY" scripts/real_size_check.py "${args[@]}"
  local rc=$?
  cp "$WORK/rl-1.3b/result.json" "$OUT/rl-1.3b.json" 2>/dev/null
  cp "$WORK/rl-1.3b/uninterrupted/events.jsonl" "$OUT/rl-1.3b-uninterrupted.events.jsonl" 2>/dev/null
  return $rc
}

planner() {
  "$PY" scripts/bench_planner_gpu.py --seq-len 2048 --out "$OUT/planner.md" --json-out "$OUT/planner.json"
}

zero3() {
  if [[ $DRY == 0 ]]; then
    "$PY" -c "import deepspeed" 2>/dev/null || "$PY" -m pip install -q "deepspeed>=0.16" || return 1
  fi
  bench 6.7b-zero3-offload 2048
}

summary() {
  "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
stages = {}
for rc in sorted(out.glob("*.rc")):
    name = rc.stem
    sec = out / f"{name}.seconds"
    fig = out / f"{name}.json"
    try:
        figures = json.loads(fig.read_text()) if fig.exists() else None
    except ValueError:
        figures = "unreadable"
    stages[name] = {"rc": rc.read_text().strip(), "seconds": sec.read_text().strip() if sec.exists() else None,
                    "figures": figures}
(out / "summary.json").write_text(json.dumps(stages, indent=2) + "\n")
print(json.dumps({k: v["rc"] for k, v in stages.items()}))
EOF
}

export -f log setup bench build resume rl planner zero3
export OUT DRY ROOT WORK START PY WHEELS SITE

log "gpu_check: out=$OUT work=$WORK budget=${BUDGET}s dry_run=$DRY stages: $STAGES"
stage setup 240 setup
if [[ -z "$PY" && -s "$OUT/python.path" ]]; then PY=$(cat "$OUT/python.path"); fi
if [[ -z "$PY" ]]; then PY=$ROOT/.venv-gpu/bin/python; fi
export PY
SAMPLER=""
if [[ " $STAGES " == *" telemetry "* ]]; then
  "$PY" scripts/gpu_telemetry.py sample "$OUT/nvml.jsonl" --interval 1 2>> "$OUT/gpu_check.log" &
  SAMPLER=$!
  trap '[[ -n "$SAMPLER" ]] && kill "$SAMPLER" 2>/dev/null' EXIT
  if [[ $DRY == 1 ]]; then
    stage telemetry 30 "$PY" scripts/gpu_telemetry.py heartbeat "$OUT/heartbeat.json"
  else
    stage telemetry 30 "$PY" scripts/gpu_telemetry.py heartbeat "$OUT/heartbeat.json" --require-gpu
  fi
fi
stage build-1.3b 120 build 1.3b
stage bench-1.3b 150 bench 1.3b-lora 2048
stage rl-1.3b 240 rl
stage build-6.7b 180 build 6.7b
stage bench-6.7b-qlora 180 bench 6.7b-qlora 2048
stage resume-1.3b 200 resume
stage planner 150 planner
stage zero3-offload 240 zero3
if [[ -n "$SAMPLER" ]]; then kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; SAMPLER=""; fi
summary | tee -a "$OUT/gpu_check.log"
log "gpu_check: done"
