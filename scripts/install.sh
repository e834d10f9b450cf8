#!/usr/bin/env bash
# Create .venv and install the pinned TorchRec stack for this machine, then rectrain itself.
#   CPU : torch 2.13.0 (CPU) + fbgemm-gpu-cpu 1.8.0 + torchrec 1.8.0 (--no-deps)
#   CUDA: torch 2.13.0       + fbgemm-gpu 1.8.0     + torchrec 1.8.0 (--no-deps)
# torchrec goes in with --no-deps because its metadata requires the CUDA fbgemm-gpu, which
# would overwrite fbgemm-gpu-cpu and break imports; its real needs are listed below.
# Re-running is cheap: a stamp records what was installed. RECTRAIN_DEVICE=cpu|cuda forces a stack.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

device=${RECTRAIN_DEVICE:-}
if [[ -z $device ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=cuda; else device=cpu; fi
fi
case $device in
  cpu) fbgemm="fbgemm-gpu-cpu==1.8.0" ;;
  cuda) fbgemm="fbgemm-gpu==1.8.0" ;;
  *) echo "install.sh: RECTRAIN_DEVICE must be cpu or cuda, got '$device'" >&2; exit 2 ;;
esac

stamp="$VENV/.rectrain-stack"
want="$device $(cat scripts/install.sh pyproject.toml | sha256sum | cut -c1-16)"
if [[ -f $stamp && $(cat "$stamp") == "$want" ]] && "$VENV/bin/python" -c "import torchrec, fbgemm_gpu, trainer" 2>/dev/null; then
  exit 0
fi

[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==2.13.0" "$fbgemm" \
  numpy pyarrow tensorboard pytest tensordict torchmetrics tqdm pyre-extensions iopath "faiss-cpu==1.15.1"
"${pip[@]}" --no-deps "torchrec==1.8.0"
"${pip[@]}" --no-deps -e .
# Exactly one fbgemm distribution, and the stack imports.
n=$("$VENV/bin/python" -m pip list 2>/dev/null | grep -ciE '^fbgemm[-_]gpu' || true)
if [[ $n != 1 ]]; then echo "install.sh: expected one fbgemm distribution, found $n" >&2; exit 1; fi
"$VENV/bin/python" -c "import torch, fbgemm_gpu, torchrec, faiss, trainer; print('rectrain stack ok: torch', torch.__version__, '| torchrec', torchrec.__version__, '| device $device')"
echo "$want" > "$stamp"
