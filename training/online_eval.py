"""Online kNN while pretraining (`simmim pretrain --eval-every N`).

A fixed labelled subset of the training split, drawn once by seed: a bank and disjoint queries,
embedded without augmentation through the recorded preprocessing. Each evaluation scores the
queries by weighted kNN against the bank (the protocol of `simmim evaluate`), for the configured
embedding, for the same features PCA-whitened (fitted on the bank), and, for a ViT, for the
tokens after every block with mean and the configured pooling. It takes seconds, so it can run
every epoch (lightly's online kNN is the anchor).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .evaluate import knn_top1
from .projection import fit_projection

WHITEN_DIM = 256


class OnlineKNN:
    """source: an image source with labels; spec: the run's evaluation preprocessing."""

    def __init__(
        self,
        source,
        spec,
        bank: int = 10_000,
        queries: int = 2_000,
        seed: int = 0,
        batch_size: int = 512,
    ):
        from simmim_core.preprocess import preprocess

        labels = getattr(source, "labels", None)
        if labels is None or len(np.unique(labels)) < 2:
            raise ValueError(
                "online kNN needs labelled data: fashion-mnist, or a folder with "
                "one subfolder per class"
            )
        n = len(source)
        if n < bank + queries:  # small data: 5 bank images per query
            bank, queries = n - n // 6, n // 6
        order = np.random.default_rng([seed, 5]).permutation(n)
        self.bank_idx, self.query_idx = order[:bank], order[bank : bank + queries]
        self.labels = np.asarray(labels)
        self.source, self.spec, self.batch_size = source, spec, batch_size
        self._preprocess = preprocess

    def _features(self, model, idx: np.ndarray, device) -> dict[str, np.ndarray]:
        """{name: float32 [len(idx), D]} for every feature variant, in one pass per batch."""
        out: dict[str, list] = {}
        cfg = model.cfg
        for start in range(0, len(idx), self.batch_size):
            batch = idx[start : start + self.batch_size]
            pixels = torch.from_numpy(
                self._preprocess([self.source.encoded(int(i)) for i in batch], self.spec)
            ).to(device)
            for name, value in self._variants(model, cfg, pixels):
                out.setdefault(name, []).append(value.float().cpu().numpy())
        return {k: np.concatenate(v) for k, v in out.items()}

    @staticmethod
    def _variants(model, cfg, pixels):
        """(name, [B, D]) pairs; 'embedding' is what model.embed gives."""
        if cfg.family != "vit":
            yield "embedding", model.embed(pixels)
            return
        enc = model.encoder
        pools = dict.fromkeys([cfg.pooling, "mean"])
        chosen = cfg.feature_layer or enc.depth
        for b, x in enumerate(enc.iter_blocks(enc.embed_tokens(pixels)), 1):
            fmap, prefix = enc.to_map(enc.vit.norm(x) if cfg.feature_norm else x)
            for pooling in pools:
                z = model.pool(fmap, prefix, pooling)
                if b == chosen and pooling == cfg.pooling:
                    yield "embedding", z
                yield f"block{b}/{pooling}", z

    @torch.no_grad()
    def __call__(self, model, device) -> dict:
        """{'knn_top1': configured embedding, 'knn_top1_whitened': the same PCA-whitened to
        min(256, D) dimensions, 'knn_by_feature': {variant: top-1}, 'eval_seconds'}."""
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            bank = self._features(model, self.bank_idx, device)
            queries = self._features(model, self.query_idx, device)
        finally:
            model.train(was_training)
        yb, yq = self.labels[self.bank_idx], self.labels[self.query_idx]
        scores = {name: knn_top1(bank[name], yb, queries[name], yq) for name in bank}
        dim = min(WHITEN_DIM, bank["embedding"].shape[1], len(self.bank_idx))
        whiten = fit_projection(bank["embedding"], "pca-whiten", dim)
        return {
            "knn_top1": scores.pop("embedding"),
            "knn_top1_whitened": knn_top1(
                whiten(bank["embedding"]), yb, whiten(queries["embedding"]), yq
            ),
            "whitened_dim": dim,
            "knn_by_feature": scores,
            "eval_bank": len(self.bank_idx),
            "eval_queries": len(self.query_idx),
            "eval_seconds": round(time.perf_counter() - start, 1),
        }
