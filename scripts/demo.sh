#!/usr/bin/env bash
# The quick start's main job: the whole pipeline on the bundled demo set, on one machine:
#   demo data -> STAG descriptions (local Ray + vLLM CPU build + SmolLM2-135M-Instruct)
#   -> DP-VLPA pretraining (GCL + QCL) -> fine-tuning with the DP-VLPA adaptation head and with
#   the CPRFL head -> evaluation of both exports -> the group-mAP table and the plots.
# Run by `make demo` (after `make setup`). DEMO_SIZE=tiny runs the same steps on a few hundred
# images and a few steps each (CI's smoke test); DEMO_RUNS / DEMO_DATA / DEMO_SHARDS move the
# outputs. Each step resumes or skips what an earlier run finished.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=.venvs/train/bin
GEN=.venvs/gen/bin
SIZE=${DEMO_SIZE:-full}
suffix=$([[ $SIZE == tiny ]] && echo _tiny || true)
DATA=${DEMO_DATA:-data/demo$suffix}
SHARDS=${DEMO_SHARDS:-shards/demo_stag$suffix}
RUNS=${DEMO_RUNS:-runs/demo$suffix}

data_args=() stag_args=() train_args=()
if [[ $SIZE == tiny ]]; then
    data_args=(num_train=240 num_test=120 max_frequency=120 min_frequency=3 test_min_frequency=6)
    stag_args=(batch_size=8)
    train_args=(max_steps=4 checkpoint.every_steps=2 data.eval_limit=0 log_every_steps=1)
elif [[ $SIZE != full ]]; then
    echo "demo: DEMO_SIZE must be full or tiny, got '$SIZE'" >&2
    exit 2
fi

step() {  # step NAME COMMAND...: run, time, and name the step that failed
    local name=$1 start=$SECONDS
    shift
    echo
    echo "=== $name"
    if ! "$@"; then
        echo "demo: step '$name' failed (command: $*)" >&2
        exit 1
    fi
    timings+=("$(printf '%-34s %5d s' "$name" $((SECONDS - start)))")
}
timings=()
# accelerate launch gives each process 1 OpenMP thread unless told: use the cores on CPU
launch=("$TRAIN/accelerate" launch --config_file configs/accelerate/single.yaml
    --num_cpu_threads_per_process "$(nproc)")

step "demo data" "$TRAIN/ltdist" data demo --out "$DATA" "${data_args[@]}"
step "STAG descriptions (Ray + vLLM)" "$GEN/python" -m ltdist.stag_gen \
    --config configs/stag/demo.yaml "data.out=$SHARDS" "data.classes=$DATA/classes.txt" \
    "data.manifests.train=$DATA/train.jsonl" "data.manifests.test=$DATA/test.jsonl" \
    "${stag_args[@]}"
step "DP-VLPA pretraining" "${launch[@]}" launchers/pretrain.py \
    --config configs/pretrain/demo.yaml "data.location=$SHARDS" "output_dir=$RUNS/pretrain" \
    "${train_args[@]}"
for head in dpvlpa cprfl; do
    step "fine-tuning, $head head" "${launch[@]}" launchers/finetune.py \
        --config "configs/finetune/demo_$head.yaml" "data.location=$SHARDS" \
        "model.init_from=$RUNS/pretrain/export" "output_dir=$RUNS/$head" "${train_args[@]}"
done
for head in dpvlpa cprfl; do
    step "evaluation, $head export" "$TRAIN/python" launchers/evaluate.py \
        --export "$RUNS/$head/export" --data "$SHARDS" --split test --out "$RUNS/$head/eval-test"
done

echo
echo "=== group mAP on the demo test split (%)"
"$TRAIN/ltdist" compare \
    "zero-shot after pretraining=$RUNS/pretrain" \
    "DP-VLPA adaptation head=$RUNS/dpvlpa/eval-test" \
    "CPRFL head on the pretrained Q-Former=$RUNS/cprfl/eval-test" \
    --plot "$RUNS/per_class_ap.png"
echo
echo "STAG report:        $SHARDS/stag_report.json"
echo "reports:            $RUNS/{pretrain/report,dpvlpa/eval-test,cprfl/eval-test}/report.txt"
echo "per-class AP plots: $RUNS/per_class_ap.png (the three side by side),"
echo "                    $RUNS/{dpvlpa,cprfl}/eval-test/ap_vs_frequency.png"
echo "training curves:    $RUNS/{pretrain,dpvlpa,cprfl}/curves.png"
echo
printf '%s\n' "${timings[@]}"
