#!/usr/bin/env bash
# Data-parallel scaling of `covnoise train --distributed mpi`: step time at
# B_L = 4096 (784-512-512-10 MLP, full Fashion-MNIST) on 1 and 2 MPI
# processes with one thread each, the time spent in all-reduces per step, and
# the speed-up, for plain large batch and diagonal-Fisher noise (exact and
# micro-batch estimators).
#
#   bench/mpi_scaling.sh [BIN]      BIN defaults to target/release/covnoise,
#                                   built with --features mpi
#   EPOCHS=2 REPEATS=3 NPS="1 2" DATA=DIR    environment overrides
#
# Step time = training seconds per epoch (evaluation excluded) / steps per
# epoch, from summary.json; the fastest of REPEATS runs is shown (the machine
# may be shared). The all-reduce time is rank 0's wall time inside
# MPI_Allreduce per step, waiting for the other rank included.
set -euo pipefail

BIN=${1:-target/release/covnoise}
DATA=${DATA:-${COVNOISE_DATA:-/usr/share/datasets/fashion-mnist}}
EPOCHS=${EPOCHS:-2}
REPEATS=${REPEATS:-3}
NPS=${NPS:-"1 2"}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

configs=(
  "none|--noise none"
  "diag exact|--noise diag --estimator exact --small-batch 128"
  "diag microbatch (M=2)|--noise diag --estimator microbatch --micro-batches 2 --small-batch 128"
)

# A JSON number field of summary.json.
field() { sed -n "s/^ *\"$1\": \([-0-9.eE+]*\),\?$/\1/p" "$2"; }

printf '%-22s %3s %12s %16s %14s %9s\n' noise K "step (ms)" "all-reduce (ms)" "MB/step/proc" speed-up
for config in "${configs[@]}"; do
  name=${config%%|*}
  flags=${config#*|}
  base=""
  for np in $NPS; do
    run="$work/run-$np"
    step_ms="" comm_ms="" mb=""
    for _ in $(seq "$REPEATS"); do
      # shellcheck disable=SC2086  # $flags is a list of flags
      line=$(mpirun -np "$np" --bind-to core "$BIN" train --distributed mpi --threads 1 \
        --data "$DATA" --batch-size 4096 --epochs "$EPOCHS" --warmup-epochs 0 --lr 0.2 \
        --quiet --overwrite --out "$run" $flags)
      spe=$(field seconds_per_epoch "$run/summary.json")
      steps=$(field steps "$run/summary.json")
      ms=$(awk -v s="$spe" -v n="$steps" -v e="$EPOCHS" 'BEGIN { printf "%.1f", 1e3 * s * e / n }')
      if [ -z "$step_ms" ] || awk -v a="$ms" -v b="$step_ms" 'BEGIN { exit !(a < b) }'; then
        step_ms=$ms
        comm_ms=$(sed -n 's/.*all-reduces, \([0-9.]*\) ms\/step.*/\1/p' <<<"$line")
        mb=$(sed -n 's/.*ms\/step, \([0-9.]*\) MB\/step.*/\1/p' <<<"$line")
      fi
    done
    base=${base:-$step_ms}
    speedup=$(awk -v b="$base" -v s="$step_ms" 'BEGIN { printf "%.2fx", b / s }')
    printf '%-22s %3s %12s %16s %14s %9s\n' "$name" "$np" "$step_ms" "$comm_ms" "$mb" "$speedup"
  done
done

# The all-reduce alone: a batch of 8 (4 examples per process) makes the
# compute negligible, so the time per step is close to the transfer of the
# packed buffer between the processes.
echo
printf '%-22s %3s %16s %14s\n' "transfer only (B=8)" K "all-reduce (ms)" "MB/step/proc"
for config in "none|--noise none" "diag exact|--noise diag --estimator exact --small-batch 2"; do
  # shellcheck disable=SC2086
  line=$(mpirun -np 2 --bind-to core "$BIN" train --distributed mpi --threads 1 --data "$DATA" \
    --batch-size 8 --train-limit 1600 --test-limit 100 --epochs 1 --warmup-epochs 0 --lr 0.01 \
    --quiet ${config#*|})
  printf '%-22s %3s %16s %14s\n' "${config%%|*}" 2 \
    "$(sed -n 's/.*all-reduces, \([0-9.]*\) ms\/step.*/\1/p' <<<"$line")" \
    "$(sed -n 's/.*ms\/step, \([0-9.]*\) MB\/step.*/\1/p' <<<"$line")"
done
