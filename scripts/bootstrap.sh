#!/usr/bin/env bash
# Set up everything uff-port needs on a fresh machine; does nothing that is already done.
#   - a virtualenv in .venv (override with UFF_PORT_VENV)
#   - torch==2.13.0 first (the CPU wheel here; on a GPU box install your CUDA build first),
#     so no later requirement can pull a different torch
#   - the package, editable, with the train, cloud, dev, deepspeed and eval extras
#   - a C++ compiler (DeepSpeed builds its CPU communication op on first use)
#   - Elixir/Erlang from apt for the bridge (skip with UFF_PORT_NO_ELIXIR=1)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${UFF_PORT_VENV:-.venv}
PY="$VENV/bin/python"

if [[ ! -x "$PY" ]]; then
  echo "bootstrap: creating $VENV" >&2
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing torch==2.13.0" >&2
  "$PY" -m pip install -q "torch==2.13.0"
fi
stamp="$VENV/.uff-port-installed"
EXTRAS="train,cloud,dev,deepspeed,eval"
want=$( (cat pyproject.toml; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "bootstrap: installing uff-port[$EXTRAS]" >&2
  "$PY" -m pip install -q -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi

apt_install() {  # apt_install PACKAGE... (as root, or through sudo)
  echo "bootstrap: installing $* with apt" >&2
  local sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

command -v g++ >/dev/null 2>&1 || apt_install g++
if [[ -z "${UFF_PORT_NO_ELIXIR:-}" ]] && ! command -v mix >/dev/null 2>&1; then
  apt_install elixir erlang-dev
fi
