#!/usr/bin/env bash
# The embedded default model (service/default_model/), made from nothing but Fashion-MNIST:
#   1. pretrain SimMIM with the contrastive term for 16 epochs: the ablation's contrastive arm
#      (benchmarks.fmnist_ablation resumes or reuses it: it is the same command). Its weights are
#      kept in git, without the optimizer state and the training-only projection head (3.2 MB),
#      in benchmarks/results/fmnist_pretrained_contrastive/ with the run's config.json,
#      metrics.jsonl and loss curve: while they are there, this step is skipped (delete that
#      folder to pretrain again);
#   2. fine-tune it on the training labels for 60 epochs (simmim finetune, grid4 pooling);
#   3. export its features, PCA-whitened to 256-d (fitted on the training split), with an int8
#      encoder, scored on the test split. Whitening, not plain PCA: the 12-epoch fine-tuning's
#      online kNN (training images only) read higher whitened at each of its last 6 epochs;
#   4. measure it as a client meets it: served, through /embed (benchmarks.fmnist_served), against
#      the 2048-d model of commit b8b3a85 (the speed reference of issue 13), beside the raw-pixel
#      baselines under the same projection (PCA-whitening to 256-d, also the best one for
#      pixels) and under PCA to 256-d, and the fine-tuned run's grid4 2048-d features in process.
# Every step resumes or is skipped when its output exists. About 2.6 h of 2 CPU cores for steps
# 2-4 (an Intel Xeon with AVX-512 and AMX; the fine-tuning computes in bf16), 85 minutes more
# for step 1.
#
#   nice bash benchmarks/fmnist_default_model.sh [RUNS]    (RUNS default: runs)
set -euo pipefail
runs=${1:-runs}
out=service/default_model
py=${PYTHON:-python}

pretrained=benchmarks/results/fmnist_pretrained_contrastive
if [ ! -f "$pretrained/checkpoint.pt" ]; then
  pretrain=$runs/ablation/contrastive
  if ! grep -q '"done"' "$pretrain/metrics.jsonl" 2>/dev/null; then
    resume=(); [ -f "$pretrain/checkpoint.pt" ] && resume=(--resume)
    $py -m simmim_cli pretrain --preset vit-tiny-fmnist --data fashion-mnist --out "$pretrain" \
      --epochs 16 --warmup-epochs 1 --sim-loss contrastive --sim-lambda 1 --eval-every 1 --workers 1 \
      --no-progress "${resume[@]}"
  fi
  mkdir -p "$pretrained"
  cp "$pretrain"/{config.json,metrics.jsonl,loss_curve.png} "$pretrained"/
  $py -c 'import sys, torch
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
model = {k: v for k, v in ckpt["model"].items() if not k.startswith("proj.")}
torch.save({**ckpt, "model": model, "optimizer": {}}, sys.argv[2])' "$pretrain/checkpoint.pt" "$pretrained/checkpoint.pt"
fi

finetune=$runs/fmnist_finetune_contrastive60
if ! grep -q '"done"' "$finetune/metrics.jsonl" 2>/dev/null; then
  resume=(); [ -f "$finetune/checkpoint.pt" ] && resume=(--resume)
  $py -m simmim_cli finetune "$pretrained" --data fashion-mnist --out "$finetune" \
    --pooling grid4 --epochs 60 --batch-size 256 --base-lr 2e-3 --warmup-epochs 2 \
    --layer-decay 0.85 --drop-path 0.05 --crop-scale 0.8 1 --eval-every 4 --amp bf16 --workers 1 \
    --no-progress "${resume[@]}"
fi

# the 2048-d model of commit b8b3a85: the speed baseline of step 4
previous=$runs/previous_default_model
if [ ! -d "$previous" ]; then
  mkdir -p "$previous"
  git archive b8b3a85 service/default_model | tar -x -C "$previous" --strip-components=2
fi

rm -rf "$out"  # in git: `git checkout -- service/default_model` brings it back
$py -m simmim_cli export "$finetune" --out "$out" --int8 --eval-data fashion-mnist \
  --project pca-whiten:256 --name simmim-vit-tiny-fmnist --no-progress

mkdir -p benchmarks/results/fmnist_served
cp "$finetune/loss_curve.png" benchmarks/results/fmnist_served/finetune_curve.png
cp "$finetune/recon_finetuned.png" benchmarks/results/fmnist_served/recon_finetuned.png
cp "$finetune/metrics.jsonl" benchmarks/results/fmnist_served/finetune_metrics.jsonl
# the features before the projection (grid4, 2048-d) and the classifier's top-1
$py -m simmim_cli evaluate --checkpoint "$finetune" --data fashion-mnist --no-progress \
  --out benchmarks/results/fmnist_served/finetune_eval_grid4.json
$py -m benchmarks.fmnist_served --model-dir "$out" --int8 --baseline-model-dir "$previous" \
  --out benchmarks/results/fmnist_served

for project in pca:256 pca-whiten:256; do
  $py -m simmim_cli evaluate --pixels --data fashion-mnist --project "$project" --no-progress \
    --out "benchmarks/results/fmnist_served/pixels_${project/:/_}.json"
done
