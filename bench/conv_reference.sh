#!/usr/bin/env bash
# A plain SGD step of covnoise against PyTorch for one model, in one session:
# `covnoise bench` (plain and the noise variants that apply) and
# bench/pytorch_reference.py, alternated ROUNDS times so that drift in the
# machine's load reaches both; prints each median and the ratio of the
# medians of the medians.
#
#   bench/conv_reference.sh MODEL BATCHES [COVNOISE_FLAGS...]
#   e.g. bench/conv_reference.sh lenet5 128,1024 --chunk 128
#   BIN=target/release/covnoise PY=bench/.venv/bin/python THREADS=2
#   ROUNDS=2 WARMUP=2 STEPS=10     environment overrides
set -euo pipefail

MODEL=$1
BATCHES=$2
shift 2
BIN=${BIN:-target/release/covnoise}
PY=${PY:-bench/.venv/bin/python}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
WARMUP=${WARMUP:-2}
STEPS=${STEPS:-10}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for r in $(seq "$ROUNDS"); do
  "$BIN" bench --model "$MODEL" --batch-sizes "$BATCHES" --threads "$THREADS" \
    --warmup "$WARMUP" --steps "$STEPS" --json "$work/covnoise-$r.json" "$@" >&2
  "$PY" "$(dirname "$0")/pytorch_reference.py" --model "$MODEL" --batch-sizes "$BATCHES" \
    --threads "$THREADS" --warmup "$WARMUP" --steps "$STEPS" --json "$work/torch-$r.json" >&2
done
"$PY" - "$work" "$ROUNDS" <<'PY'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
cov = [json.load(open(f"{work}/covnoise-{r}.json")) for r in range(1, rounds + 1)]
tor = [json.load(open(f"{work}/torch-{r}.json")) for r in range(1, rounds + 1)]
def medians(docs, key):
    out = {}
    for d in docs:
        for res in d["results"]:
            out.setdefault(key(res), []).append(res["median_ms"])
    return {k: statistics.median(v) for k, v in out.items()}
c = medians(cov, lambda r: (r["batch_size"], r["variant"]))
t = medians(tor, lambda r: r["batch_size"])
print(f"model {cov[0]['model']}, {cov[0]['threads']} threads, chunk {cov[0]['chunk']}, {rounds} rounds")
for (b, v), ms in sorted(c.items()):
    plain = c[(b, "plain")]
    line = f"batch {b:>5}  {v:<22} {ms:>9.2f} ms  x{ms / plain:.3f} plain"
    if v == "plain":
        line += f"   pytorch {t[b]:.2f} ms  covnoise/pytorch {ms / t[b]:.3f}"
    print(line)
PY
