#!/usr/bin/env bash
# Train the autoencoder, CALM and the AR baseline on wiki-train on one GPU, at equal training
# FLOPs, evaluate BrierLM with the true and a shuffled context, and write int4 packages and a
# results JSON to OUTDIR:
#
#     bash benchmarks/gpu_train.sh OUTDIR
#
# Made for a single-GPU machine with PyTorch and CUDA installed and no internet, about 10 minutes
# of run time, whose results come back only as a few files of at most 16 MB: OUTDIR receives
# gpu_train.json (settings, run summaries, throughput and MFU, BrierLM), gpu_train.log, and one
# tar file per int4 package (calm-int4.tar, ar-int4.tar). calm-edge's Python dependencies must be
# importable (carry them as wheels where pip cannot reach an index); the checkout is installed
# without them (`pip install --no-deps --no-build-isolation -e .`) when `calm_edge` is not.
#
# The budget: the `small` shapes, bf16 autocast, fused AdamW, batches of 128 windows of 512
# tokens; AR_STEPS optimizer steps of the AR model (default 6,300: about 34 PFLOP, 100 times
# the 0.34 PFLOP of the CPU-trained `small` models) and the CALM steps of equal FLOPs
# (calm_edge/flops.py). Override with the environment: AR_STEPS, BATCH, AE_STEPS, COMPILE=true.
#
# CALM_EDGE_GPU_TRAIN_SIZE=tiny runs the same steps at the tiny preset on a slice of the data
# (a CPU check of this script, tests/test_gpu_train.py). DATA: the shared data folder.
set -euo pipefail

OUT=${1:?usage: bash benchmarks/gpu_train.sh OUTDIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=${DATA:-$REPO/../shared/data}
PYTHON=${PYTHON:-python3}
SIZE=${CALM_EDGE_GPU_TRAIN_SIZE:-gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d)}  # the runs and fp32 packages: large, not brought back
exec > >(tee "$OUT/gpu_train.log") 2>&1

if ! "$PYTHON" -c "import calm_edge" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e "$REPO"
fi
calm() { "$PYTHON" -m calm_edge.cli -q "$@"; }
echo "gpu_train: $SIZE, into $OUT, $(date -u +%FT%TZ)"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

if [ "$SIZE" = tiny ]; then
    PRESET=tiny VOCAB=1024 BATCH=${BATCH:-8} SEQ=64 AR_STEPS=${AR_STEPS:-6} AE_STEPS=${AE_STEPS:-6}
    POSITIONS=20 EVERY=3
    mkdir -p "$WORK"
    "$PYTHON" - "$DATA/wiki-train.jsonl.xz" "$WORK/train.jsonl" <<'EOF'
import itertools, lzma, sys
with lzma.open(sys.argv[1], "rt", encoding="utf-8") as source, open(sys.argv[2], "w", encoding="utf-8") as out:
    out.writelines(itertools.islice(source, 150))
EOF
    TRAIN_TEXT=$WORK/train.jsonl
else
    PRESET=small VOCAB=8192 BATCH=${BATCH:-128} SEQ=512 AR_STEPS=${AR_STEPS:-6300} AE_STEPS=${AE_STEPS:-3000}
    POSITIONS=2000 EVERY=500
    TRAIN_TEXT=$DATA/wiki-train.jsonl.xz
fi
COMPILE=${COMPILE:-false}
# CALM steps of the AR steps' training FLOPs (the same batches of windows).
CALM_STEPS=$("$PYTHON" -c "
from calm_edge import flops
from calm_edge.config import preset
c = preset('$PRESET').with_overrides(['tokenizer.vocab_size=$VOCAB', 'train_calm.seq_len=$SEQ', 'train_ar.seq_len=$SEQ'])
print(round($AR_STEPS * flops.ar_training_flops_per_token(c) / flops.calm_training_flops_per_token(c)))")

train_settings() {  # the options every training run shares: SECTION STEPS
    local s=$1
    echo --preset $PRESET --set tokenizer.vocab_size=$VOCAB --set $s.max_steps=$2 --set $s.batch_size=$BATCH \
        --set $s.seq_len=$SEQ --set $s.bf16=true --set $s.compile=$COMPILE --set $s.eval_every=$EVERY \
        --set $s.save_every=$EVERY --set $s.log_every=$(( EVERY / 5 > 0 ? EVERY / 5 : 1 ))
}

began=$(date +%s)
calm tokenizer train --data "$TRAIN_TEXT" --vocab-size $VOCAB --out "$WORK/tok" --force
calm data prepare --data "$TRAIN_TEXT" --tokenizer "$WORK/tok" --out "$WORK/shards" --force
# The autoencoder reads short windows (its context is one chunk): 128 tokens, as the small preset.
calm train autoencoder $(train_settings train_autoencoder $AE_STEPS) --set train_autoencoder.seq_len=128 \
    --data "$WORK/shards" --out "$WORK/ae" --force
calm train calm $(train_settings train_calm $CALM_STEPS) --autoencoder "$WORK/ae" --data "$WORK/shards" \
    --out "$WORK/calm" --force
calm train ar $(train_settings train_ar $AR_STEPS) --data "$WORK/shards" --out "$WORK/ar" --force

for kind in calm ar; do
    calm eval brierlm --checkpoint "$WORK/$kind" --data "$DATA/wikitext103-test-doc.jsonl" --detokenize wikitext \
        --max-positions $POSITIONS --offsets 0,1,2,3 --other-context --out "$WORK/brierlm_$kind.json"
    calm export --$kind "$WORK/$kind" --out "$WORK/$kind-fp32" --force
    calm quantize --package "$WORK/$kind-fp32" --mode int4 --out "$WORK/$kind-int4" --force
    tar -C "$WORK" -cf "$OUT/$kind-int4.tar" "$kind-int4"
done
calm eval autoencoder --checkpoint "$WORK/ae" --data "$DATA/wikitext103-test-doc.jsonl" --detokenize wikitext \
    --max-tokens $(( POSITIONS * 100 )) --out "$WORK/ae_eval.json"

"$PYTHON" - "$WORK" "$OUT/gpu_train.json" "$SIZE" "$(( $(date +%s) - began ))" <<'EOF'
"""Gather the runs' summaries, throughput and evaluations into one results file."""
import json, statistics, sys
from pathlib import Path

import torch

from calm_edge.fileio import write_json_atomic
from calm_edge.training.metrics import MetricsLog

work, out, size, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])


def run(name):
    records = MetricsLog(work / name).records()
    train = [r for r in records if r["split"] == "train"][1:]  # the first interval holds warm-up (compilation)
    summary = json.loads((work / name / "run_summary.json").read_text()) if (work / name / "run_summary.json").exists() else {}
    speed = {"tokens_per_second_median": statistics.median(r["tokens_per_second"] for r in train) if train else None}
    if train and "mfu" in train[0]:
        speed["mfu_median"] = statistics.median(r["mfu"] for r in train)
    return {"summary": summary, **speed, "last_valid": [r for r in records if r["split"] == "valid"][-1:]}


brierlm = {kind: json.loads((work / f"brierlm_{kind}.json").read_text()) for kind in ("calm", "ar")}
write_json_atomic(out, {
    "benchmark": "gpu_train", "size": size, "seconds": seconds,
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
    "command": "bash benchmarks/gpu_train.sh OUTDIR",
    "runs": {name: run(name) for name in ("ae", "calm", "ar")},
    "autoencoder_eval": json.loads((work / "ae_eval.json").read_text()),
    "brierlm": {kind: {"brier_1": r["brier_1"], "brierlm": r["brierlm"], "brier_1_stderr": r.get("brier_1_stderr"),
                       "other_context": r.get("other_context"), "by_offset": r["by_offset"]}
                for kind, r in brierlm.items()},
})
print("->", out)
EOF
echo "gpu_train: done in $(( $(date +%s) - began )) s"
