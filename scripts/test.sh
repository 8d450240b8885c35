#!/usr/bin/env bash
# Run every test: the Python suite (pytest) and the Elixir bridge (mix test).
# Installs what is missing first (scripts/bootstrap.sh), so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
VENV=${UFF_PORT_VENV:-.venv}
PY="$(cd "$VENV" && pwd)/bin/python"
export UFF_PORT_PYTHON="$PY"
# Models are built locally; never reach for a hub during tests.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export UFF_PORT_CACHE="${UFF_PORT_CACHE:-$PWD/.cache/uff-port}"
# Two test processes on two cores: one OpenMP thread each (see tests/conftest.py).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

status=0
# Style is part of the suite: ruff (lint) and mypy (types) over the package.
"$PY" -m ruff check uff_port scripts tests || status=$?
"$PY" -m mypy uff_port || status=$?
# Two test processes, a file each at a time (module fixtures stay in one process): most
# tests wait on the subprocesses they drive. UFF_PORT_TEST_WORKERS=0 runs them serially.
WORKERS=${UFF_PORT_TEST_WORKERS:-2}
XDIST=()
[[ "$WORKERS" == "0" ]] || XDIST=(-n "$WORKERS" --dist loadfile)
"$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" --durations=25 "$@" || status=$?
if [[ -d elixir_bridge && -f elixir_bridge/mix.exs ]]; then
  # The whole ExUnit suite, slow tests included: the kill-and-resume, stall and
  # heartbeat-watchdog tests train the tiny model for real (about a minute).
  (cd elixir_bridge && MIX_ENV=test mix test --include slow) || status=$?
  # The week's campaign drill (docs/campaign.md): seven models, the VM killed once,
  # the campaign process three times; about six minutes. A long test: skipped when CI=true
  # (CI's time budget) unless UFF_PORT_LONG=1; UFF_PORT_SKIP_CAMPAIGN=1 skips it anywhere.
  long=1
  [[ "${CI:-}" == "true" && "${UFF_PORT_LONG:-0}" != "1" ]] && long=0
  if [[ "${UFF_PORT_SKIP_CAMPAIGN:-0}" != "1" && "$long" == "1" ]]; then
    (cd elixir_bridge && MIX_ENV=test mix test --only campaign_long test/campaign_test.exs) || status=$?
  fi
fi
exit $status
