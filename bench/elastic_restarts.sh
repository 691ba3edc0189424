#!/bin/bash
# Elastic restarts (issue 30, goal 2): N runs of a 2-rank compress under torchrun --max-restarts 3;
# in each, a random rank is SIGKILLed a random 0-6 s after the first joint checkpoint appears
# (checkpoint writes included). Each run's student is compared byte for byte with REFERENCE, an
# uninterrupted 2-rank run of the same recipe. One line per run in WORK/results.txt.
#
#   bash bench/elastic_restarts.sh RECIPE.yaml REFERENCE_RUN_DIR WORK_DIR [N=10]
#
# Run on 2026-12-07 as /tmp/el10/loop.sh, the same script with RECIPE=/tmp/el/tiny.yaml,
# REFERENCE=/tmp/el/run2, WORK=/tmp/el10 (results: bench/results/elastic-restarts.md).
RECIPE=$1 REFERENCE=$2 WORK=$3 N=${4:-10}
mkdir -p "$WORK" && cd "$WORK" || exit 2
for i in $(seq 1 "$N"); do
  rm -rf "run$i"
  rank=$((RANDOM % 2)); delay=$(python3 -c "import random; print(round(random.uniform(0, 6), 2))")
  (
    for _ in $(seq 1 1200); do [ -f "run$i/checkpoints/joint.safetensors" ] && break; sleep 0.05; done
    sleep "$delay"
    killed=none
    for p in $(pgrep -f "recipe $RECIPE --out $WORK/run$i"); do
      if tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -q "^RANK=$rank$"; then kill -9 "$p" && killed=$p; break; fi
    done
    echo "$killed" > "kill$i.txt"
  ) &
  start=$(date +%s)
  CASCADEC_CACHE="$WORK/cache" OMP_NUM_THREADS=1 CASCADEC_NO_PROGRESS=1 timeout 600 python -m torch.distributed.run \
    --standalone --nproc-per-node 2 --max-restarts 3 -m cascadec compress cifar_resnet8 --recipe "$RECIPE" \
    --out "$WORK/run$i" > "out$i.log" 2> "err$i.log"
  rc=$?
  wait
  same=$(cmp -s "run$i/student.safetensors" "$REFERENCE/student.safetensors" && echo identical || echo DIFFERENT)
  resumed=$(python3 -c "import json; m=json.load(open('run$i/manifest.json')); print(len(m.get('resumed', [])), m['status'])" 2>/dev/null)
  echo "run $i: rank $rank killed $(cat "kill$i.txt") after ${delay}s; rc=$rc; resumed/status=$resumed; student $same; $(($(date +%s) - start)) s" | tee -a results.txt
done
