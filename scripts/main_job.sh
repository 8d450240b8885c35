#!/usr/bin/env bash
# The main job: the tiny default model trained through the Elixir bridge.
# A supervisor starts the worker, training prints live progress, the worker is
# killed with SIGKILL midway, the supervisor restarts it, the run resumes from its
# last durable checkpoint and finishes; then an uncrashed reference run is made and
# the summary shows both attempts and whether final step and loss match.
# Installs what is missing first (scripts/bootstrap.sh is idempotent).
#
#   bash scripts/main_job.sh [--inject-crash-at STEP] [other mix uff.train options]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# UFF_PORT_SKIP_BOOTSTRAP=1: the environment is already prepared (CI, a shared venv).
[[ -n "${UFF_PORT_SKIP_BOOTSTRAP:-}" ]] || bash scripts/bootstrap.sh
VENV=${UFF_PORT_VENV:-.venv}
export UFF_PORT_PYTHON="$(cd "$VENV" && pwd)/bin/python"
# Models are built locally; never reach for a hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

CONFIG=configs/tiny.yaml
# Midway, and halfway between two checkpoints, so the resume point is visible.
CRASH_AT=$("$UFF_PORT_PYTHON" -c '
import sys
from uff_port.core.config import load_config
c = load_config(sys.argv[1])
every = c.checkpoint.every_steps or 0
print(max(1, c.training.max_steps // 2 + every // 2))' "$CONFIG")
RUN_DIR="main-job-$(date -u +%Y%m%d-%H%M%S)"

cd elixir_bridge
# No hex packages: compiles offline.
mix compile --no-deps-check >/dev/null
exec mix uff.train --config "$ROOT/$CONFIG" --inject-crash-at "$CRASH_AT" \
  --runs-root "$ROOT/runs" --run-dir "$RUN_DIR" "$@"
