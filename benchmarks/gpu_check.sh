#!/bin/bash
# The GPU check: on one GPU, in under 8 minutes, from the repository root:
#   bash benchmarks/gpu_check.sh
# 1. a few hundred bf16 training steps of the ldm-256 and dalle-mini presets (bench_training.py):
#    samples/s and model FLOP utilisation (FLOP counter over a step / peak of the GPU by name);
# 2. batched generation throughput of both (bench_generation.py, against the per-caption
#    library pipelines, and against the model's own forward passes: generate_model_over_total,
#    generate_forward_share, generate_images_per_s);
# 3. every gray-box signal of ldm-256, the flow family's SD3 architecture at 256 px (sd3-256) and
#    dalle-mini at the model's speed (bench_signals.py, float32 as the signals run):
#    <signal>_model_over_signal (the query network's declared passes per sample, replayed at the
#    same batch, over the signal's time), <signal>_model_over_reused (the same for every model
#    after the first on a batch: its image encodings reused), <signal>_samples_per_s,
#    <signal>_forward_share;
# 4. a tiny experiment (shapes data: autoencoder, encoder, target, 2 shadows) trained, queried
#    and attacked on CUDA, through the experiment runner.
# Every figure is a `RESULT <part>/<name> <value>` line, each part's machine (CPU, kernels,
# threads, GPU) a `MACHINE <part>: ...` line before them; the whole log goes to
# $GPU_CHECK_OUT/gpu_check.log (default: the work folder, printed at the start).
#
# Python: $PYTHON if set, else .venv/bin/python, else a python3 whose torch sees CUDA (a venv
# with its site packages is made for the package), else `make setup TORCH="$TORCH"` (needs a
# package index). No CUDA: one line on stderr, exit status 1.
#
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # smoke mode: tiny presets on the CPU,
#     every part (1 shadow, so no LiRA; 2 sampling steps): 60 s on the 2-core Xeon alone, mostly the
#     start-up of its ~15 Python processes (~5 s each), which a smoke test cannot shrink
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${GPU_CHECK_DEVICE:-cuda}
WORK=${GPU_CHECK_WORK:-$(mktemp -d -t gpu-check-XXXXXX)}
OUT=${GPU_CHECK_OUT:-$WORK}
mkdir -p "$WORK" "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"  # this run only
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled} TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, installed or not

fail() { echo "gpu_check: $*" >&2; exit 1; }

has_torch() { [ -n "$1" ] && command -v "$1" > /dev/null && "$1" -c "import torch" 2> /dev/null; }

find_python() {
    if [ -n "${PYTHON:-}" ]; then
        has_torch "$PYTHON" || fail "PYTHON=$PYTHON cannot import torch"
        echo "$PYTHON"
    elif has_torch .venv/bin/python; then
        echo .venv/bin/python
    elif has_torch python3 && python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        # the machine's CUDA torch, the package installed beside it (no build isolation: offline)
        python3 -m venv --system-site-packages .venv >&2
        .venv/bin/pip install --quiet --no-build-isolation -e . >&2 ||
            fail "pip could not install the package into .venv (its dependencies need a package index)"
        echo .venv/bin/python
    else
        make setup TORCH="${TORCH:-torch}" >&2 || fail "make setup failed (no package index?)"
        echo .venv/bin/python
    fi
}

PY=$(find_python)
if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || fail \
        "no CUDA device for $PY (torch $("$PY" -c 'import torch; print(torch.__version__)')):" \
        "install a CUDA build, e.g. make setup TORCH=\"torch --index-url <CUDA wheel index>\""
fi
"$PY" -c "import lightning_mia, lightning, diffusers, transformers" 2> /dev/null ||
    fail "$PY cannot import lightning_mia and its dependencies: pip install -e . into it"

if [ "$DEVICE" = cuda ]; then
    PRECISION=bf16-mixed ACCEL=gpu PEAK=${GPU_CHECK_PEAK_TFLOPS:-0}
    DIFFUSION=ldm-256 SEQ2SEQ=dalle-mini
    TRAIN=(--steps 150 --rounds 1 --batch-size 16 --num-samples 256)
    GENERATE=(--num-captions 8 --num-images 4 --inference-steps 20 --rounds 2)
    SIGNALS=(--batch 16 --rounds 3 --scan 1,4)
    SIGNAL_RUNS="diffusion:$DIFFUSION flow:sd3-256 seq2seq:$SEQ2SEQ"
    STEPS=300 IMAGES=4 ATTACKS="[all]" SHADOWS=2 INFERENCE_STEPS=10
else  # smoke: every part, tiny; the CPU has no peak in the table, so MFU against 1 TFLOP/s
    PRECISION=32-true ACCEL=cpu PEAK=${GPU_CHECK_PEAK_TFLOPS:-1}
    DIFFUSION=tiny SEQ2SEQ=tiny
    TRAIN=(--steps 2 --rounds 1 --batch-size 4 --num-samples 8)
    GENERATE=(--num-captions 2 --num-images 1 --inference-steps 2 --rounds 1)
    SIGNALS=(--batch 4 --rounds 1 --scan "")
    SIGNAL_RUNS="all:tiny"  # both families in one process: start-up is most of a tiny part
    STEPS=2 IMAGES=1 ATTACKS="[pixel]" SHADOWS=1 INFERENCE_STEPS=2
fi

echo "gpu_check: device $DEVICE, python $PY, work folder $WORK, log $LOG"
start=$SECONDS

part() {  # part <tag> <command...>: run it, log everything, its RESULT lines as <tag>/<name>
    local tag=$1 t0=$SECONDS
    shift
    echo "## $tag: $*" >> "$LOG"
    "$@" >> "$LOG" 2>&1 || fail "$tag failed (exit $?); see $LOG"
    sed -n "/^## $tag: /,\$p" "$LOG" |
        sed -n -e "s|^RESULT \([^ ]*\) |RESULT $tag/\1 |p" -e "s|^MACHINE |MACHINE $tag: |p"
    echo "RESULT $tag/seconds $((SECONDS - t0))"
}

"$PY" - << 'EOF' | tee -a "$LOG"
import sys
sys.path.insert(0, "benchmarks")
from _machine import machine_line
import torch
print(machine_line("cuda" if torch.cuda.is_available() else "cpu"))
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"RESULT device/torch {torch.__version__}")
print(f"RESULT device/cuda_device {name.replace(' ', '_')}")
print(f"RESULT device/cpu_capability {torch.backends.cpu.get_cpu_capability()}")
EOF

for family in diffusion seq2seq; do
    preset=$([ "$family" = diffusion ] && echo "$DIFFUSION" || echo "$SEQ2SEQ")
    part "train-$family-$preset" "$PY" benchmarks/bench_training.py --family "$family" --preset "$preset" \
        --device "$DEVICE" --precision "$PRECISION" --peak-tflops "$PEAK" "${TRAIN[@]}"
done
for family in diffusion seq2seq; do
    preset=$([ "$family" = diffusion ] && echo "$DIFFUSION" || echo "$SEQ2SEQ")
    part "generate-$family-$preset" "$PY" benchmarks/bench_generation.py --family "$family" --preset "$preset" \
        --device "$DEVICE" --precision "$PRECISION" "${GENERATE[@]}"
done

for run in $SIGNAL_RUNS; do
    family=${run%%:*} preset=${run#*:}
    part "signals-$family-$preset" "$PY" benchmarks/bench_signals.py --family "$family" --preset "$preset" \
        --device "$DEVICE" "${SIGNALS[@]}"
done

cat > "$WORK/tiny.yaml" << EOF
experiment: $WORK/exp
family: diffusion
num_shadows: $SHADOWS
stages:
  autoencoder: configs/autoencoder/tiny-kl.yaml
  encoder: configs/encoder/tiny.yaml
  model: configs/diffusion/tiny.yaml
  data_args: [--data.source.init_args.num_samples=600, --data.target_size=32,
              --data.aux_size=256, --data.shadow_size=32, --data.public_size=256,
              --data.member_fraction=0.5]
  trainer_args: [--trainer.accelerator=$ACCEL, --trainer.devices=1, --trainer.max_steps=$STEPS,
                 --trainer.enable_progress_bar=false, --trainer.logger=false]
  model_args: [--model.init_args.num_inference_steps=$INFERENCE_STEPS]
query:
  num_images: $IMAGES
attack:
  attacks: $ATTACKS
devices:
  accelerator: $ACCEL
  devices: 1
EOF
part experiment "$PY" -m lightning_mia.experiment "$WORK/tiny.yaml" --verbose
"$PY" - "$WORK/exp/attack/report.json" << 'EOF' | tee -a "$LOG"
import json, sys
report = json.load(open(sys.argv[1]))
for name, result in {**report["attacks"], **report["baselines"]}.items():
    print(f"RESULT experiment/{name}_auc {result['metrics']['auc']['value']:.3f}")
    if result.get("seconds_per_sample") is not None:  # (none for LiRA: it reuses the queries)
        print(f"RESULT experiment/{name}_seconds_per_sample {result['seconds_per_sample']:.4f}")
EOF
echo "RESULT gpu_check/seconds $((SECONDS - start))"
