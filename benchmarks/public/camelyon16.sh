#!/usr/bin/env bash
# A CAMELYON16-style slide-level benchmark on a GPU machine: plain vs prompt-tuned features, then ABMIL.
# Needs: slides in $SLIDES (tumour/normal .tif), labels.csv with slide_id,label[,split], and a patch-level
# PathoTune bundle trained on a related tile task (e.g. runs/pcam/bundle from benchmarks/public/pcam.yaml).
set -euo pipefail
SLIDES=${SLIDES:-/data/camelyon16/images}
LABELS=${LABELS:-/data/camelyon16/labels.csv}
BUNDLE=${BUNDLE:-runs/bench/pcam_dinov2s_224px/pcam/pathotune/seed_0/bundle}
OUT=${OUT:-runs/camelyon16}

pathotune slides extract --slides "$SLIDES" --backbone dinov2_vits14 --weights bundled \
  --target-mpp 0.5 --tile-size 224 --batch-size 256 --num-workers 8 --devices 1 --out "$OUT/features_plain"
pathotune slides extract --slides "$SLIDES" --bundle "$BUNDLE" \
  --target-mpp 0.5 --tile-size 224 --batch-size 256 --num-workers 8 --devices 1 --out "$OUT/features_pathotune"
for feats in plain pathotune; do
  for agg in mean abmil transmil; do
    pathotune slides train --features "$OUT/features_$feats" --labels "$LABELS" --aggregator "$agg" \
      --folds 5 --seed 0 --out "$OUT/mil_${feats}_${agg}"
  done
done
