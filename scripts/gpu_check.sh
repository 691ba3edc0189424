#!/usr/bin/env bash
# The one prepared GPU check (issue 30, item 4), for a lent H100/H200 (device tool) or any CUDA box.
#
#   bash scripts/gpu_check.sh --fetch-wheels   # here, once, with the package registry: what the GPU
#                                              # machine lacks (pydantic, torch-pruning, onnxslim) into .whl/
#   device run: command "bash scripts/gpu_check.sh", carry [".whl"], timeout_s 540
#   bash scripts/gpu_check.sh --dry-run        # on a CPU machine: the same steps on the CPU, short
#
# Steps, each logged to $OUT/<step>.log and summed up in $OUT/steps.txt (a failed step does not stop
# the others; the script exits 1 if any failed):
#   doctor     cascadec doctor --json (driver, torch, onnxruntime, TensorRT as installed)
#   gpu-tests  the tests marked gpu (tests/gpu) that can run there
#   compress   the demo recipe (fmnist_quick) on synthetic 1x28x28 data with --device cuda,
#              train.amp bf16 and train.channels_last (no Fashion-MNIST there), quantize off
#   profile    the run's ONNX on onnxruntime, and its PyTorch networks on torch-cuda with CUDA graphs
#   kd-speed   bench/kd_loop_speed.py: cascadec's training loop against a plain PyTorch KD loop of the
#              same shrunk student (bf16, channels_last) -> $OUT/gpu-kd-speed.md
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
MODE=${1:-run}
WHEELS=(pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  torch-pruning==1.6.1 onnxslim==0.1.98)

if [ "$MODE" = "--fetch-wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${WHEELS[@]}"
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "could not install the carried wheels" | tee "$OUT/steps.txt"; exit 2; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CASCADEC_NO_PROGRESS=1
export CASCADEC_CACHE=/tmp/cascadec-gpu-check-cache
RUN=/tmp/cascadec-gpu-check-run
rm -rf "$RUN"

if [ "$MODE" = "--dry-run" ]; then
  DEVICE=cpu TORCH_BACKEND=torch STEPS=20 SIZE=512 EPOCHS=1 EXTRA=()
else
  DEVICE=cuda TORCH_BACKEND=torch-cuda STEPS=200 SIZE=20000 EPOCHS=2 EXTRA=(--cuda-graph)
fi

failed=0
step() {
  local name=$1 start rc
  shift
  start=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && failed=1
  echo "$name: exit $rc, $(($(date +%s) - start)) s" | tee -a "$OUT/steps.txt"
}

: > "$OUT/steps.txt"
{ date -u; nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"; } \
  > "$OUT/device.txt" 2>&1
step doctor python3 -m cascadec doctor --json
step gpu-tests python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu
step compress python3 -m cascadec compress cifar_resnet8 --recipe fmnist_quick --device "$DEVICE" --out "$RUN" \
  --set data.name=synthetic --set "data.options={in_channels: 1, train_size: $SIZE, val_size: 1024}" \
  --set data.image_size=28 --set train.amp=bf16 --set train.channels_last=true \
  --set "train.student_epochs=$EPOCHS" --set quantize.precision=none --set profile.duration_s=0.5
step profile-onnx python3 -m cascadec profile "$RUN" --backend onnxruntime
step profile-torch python3 -m cascadec profile "$RUN" --backend "$TORCH_BACKEND" "${EXTRA[@]}"
step kd-speed python3 bench/kd_loop_speed.py "$RUN" --device "$DEVICE" --steps "$STEPS" --amp bf16 --channels-last \
  --out "$OUT/gpu-kd-speed.md"
cp "$RUN/report.md" "$OUT/run-report.md" 2> /dev/null
exit $failed
