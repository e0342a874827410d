#!/usr/bin/env bash
# Fashion-MNIST ablation of the similarity term (issue: SimMIM core). Equal epochs per variant,
# vit-tiny-fmnist preset; kNN (k=20) + linear probe on the test split; raw pixels beside them.
# Usage: bash benchmarks/fmnist_ablation.sh [EPOCHS] [OUT]   (about 30 min per epoch on 2 cores)
set -euo pipefail
EPOCHS=${1:-1}
OUT=${2:-runs/ablation}
mkdir -p "$OUT"
simmim evaluate --pixels --no-progress --out "$OUT/pixels.json" >/dev/null
for sim in none cosine perceptual contrastive; do
  if [ ! -f "$OUT/$sim/eval.json" ]; then
    rm -rf "$OUT/$sim"
    simmim pretrain --preset vit-tiny-fmnist --data fashion-mnist --epochs "$EPOCHS" \
      --sim-loss "$sim" --out "$OUT/$sim" --no-progress
    simmim evaluate --checkpoint "$OUT/$sim" --no-progress --out "$OUT/$sim/eval.json" >/dev/null
  fi
done
python - "$OUT" "$EPOCHS" <<'PY'
import json, sys, pathlib
out, epochs = pathlib.Path(sys.argv[1]), sys.argv[2]
rows = ["| features | kNN top-1 (k=20) | linear probe top-1 | train seconds |", "|---|---|---|---|"]
px = json.loads((out / "pixels.json").read_text())
rows.append(f"| raw pixels (32 px) | {px['knn_top1']:.1%} | - | - |")
for sim in ["none", "cosine", "perceptual", "contrastive"]:
    e = json.loads((out / sim / "eval.json").read_text())
    done = [json.loads(l) for l in (out / sim / "metrics.jsonl").read_text().splitlines() if '"done"' in l]
    name = "plain SimMIM" if sim == "none" else f"SimMIM + {sim} (lambda 1)"
    rows.append(f"| {name}, {epochs} ep | {e['knn_top1']:.1%} | {e['linear_probe_top1']:.1%} | {done[-1]['seconds']:.0f} |")
table = "\n".join(rows)
(out / "table.md").write_text(table + "\n")
print(table)
PY
