"""`simmim evaluate`: weighted kNN and a linear probe on frozen embeddings, and the JSON report."""

from __future__ import annotations

import json

import numpy as np
import pytest

import simmim_cli
from training.evaluate import knn_top1, linear_probe_top1, split_labeled


def test_knn_top1_on_a_toy_case_with_a_known_answer():
    # class 0 points along x, class 1 along y; the third query lies along x but is labeled 1
    bank = np.array([[1, 0], [2, 0.1], [3, -0.1], [0, 1], [0.1, 2], [-0.1, 3]], np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1])
    queries = np.array([[5, 0.2], [0.2, 5], [4, 0]], np.float32)
    assert knn_top1(bank, labels, queries, np.array([0, 1, 1]), k=3) == pytest.approx(2 / 3)


def test_knn_uses_cosine_similarity_not_distance():
    # the query is far from the class-0 point in distance but has the same direction
    bank = np.array([[100, 0], [0.5, 0.6]], np.float32)
    queries = np.array([[1, 0.05]], np.float32)
    assert knn_top1(bank, np.array([0, 1]), queries, np.array([0]), k=1) == 1.0


def test_knn_votes_are_weighted_by_exp_similarity_over_temperature():
    # one class-0 neighbour at cosine 1, two class-1 neighbours at cosine 0.6
    bank = np.array([[1, 0], [0.6, 0.8], [0.6, -0.8]], np.float32)
    labels = np.array([0, 1, 1])
    query, truth = np.array([[1, 0]], np.float32), np.array([0])
    # T = 0.07: exp(1/T) outweighs 2 exp(0.6/T), the nearest neighbour wins
    assert knn_top1(bank, labels, query, truth, k=3, temperature=0.07) == 1.0
    # T large: every vote weighs about 1, the majority (class 1) wins
    assert knn_top1(bank, labels, query, truth, k=3, temperature=100.0) == 0.0


def test_knn_with_k_above_the_bank_size_uses_the_whole_bank():
    bank = np.eye(3, dtype=np.float32)
    assert knn_top1(bank, np.array([0, 1, 2]), bank, np.array([0, 1, 2]), k=20) == 1.0


def test_knn_scores_queries_in_chunks_like_all_at_once():
    rng = np.random.default_rng(0)
    bank, queries = (
        rng.normal(size=(50, 8)).astype(np.float32),
        rng.normal(size=(37, 8)).astype(np.float32),
    )
    labels, truth = rng.integers(0, 4, 50), rng.integers(0, 4, 37)
    assert knn_top1(bank, labels, queries, truth, k=5, chunk=4) == knn_top1(
        bank, labels, queries, truth, k=5, chunk=1000
    )


def blobs(n: int, seed: int):
    """Three Gaussian blobs in 10-d, well separated along the first three axes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 10)).astype(np.float32)
    x[np.arange(n), labels] += 6.0
    return x, labels


def test_linear_probe_learns_a_linearly_separable_toy_case():
    train, train_labels = blobs(600, 0)
    test, test_labels = blobs(300, 1)
    # 100 epochs of 3 batches: the probe's budget is counted in epochs, and this set is tiny
    assert linear_probe_top1(train, train_labels, test, test_labels, epochs=100) >= 0.95


def test_linear_probe_is_at_chance_on_random_labels():
    train, _ = blobs(600, 0)
    test, _ = blobs(300, 1)
    rng = np.random.default_rng(2)
    acc = linear_probe_top1(train, rng.integers(0, 3, 600), test, rng.integers(0, 3, 300), epochs=5)
    assert acc < 0.5


def test_synthetic_data_spec_keeps_its_size_for_both_splits():
    bank, queries = split_labeled("synthetic:48", None)
    assert len(bank) == len(queries) == 48
    assert not np.array_equal(bank.images, queries.images)  # different seeds per split


def test_simmim_evaluate_checkpoint_writes_a_json_report(tiny_run_dir, tmp_path, capsys):
    report_path = tmp_path / "eval.json"
    assert (
        simmim_cli.main(
            [
                "evaluate",
                "--checkpoint",
                str(tiny_run_dir),
                "--data",
                "synthetic:60",
                "--k",
                "5",
                "--probe-epochs",
                "3",
                "--no-progress",
                "--out",
                str(report_path),
            ]
        )
        == 0
    )
    report = json.loads(report_path.read_text())
    assert json.loads(capsys.readouterr().out) == report  # also printed
    assert report["checkpoint"] == str(tiny_run_dir)
    assert report["train_images"] == report["test_images"] == 60
    assert report["k"] == 5 and report["probe_epochs"] == 3
    assert report["embedding_dim"] == 128 * 4 * 4  # vit-tiny-fmnist: D=128, grid4
    for key in ("knn_top1", "linear_probe_top1"):
        assert 0.0 <= report[key] <= 1.0


def test_simmim_evaluate_pixels_baseline_without_a_probe(tmp_path, capsys):
    assert (
        simmim_cli.main(
            [
                "evaluate",
                "--pixels",
                "--image-size",
                "16",
                "--data",
                "synthetic:30",
                "--probe-epochs",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["pixels"] is True and report["embedding_dim"] == 16 * 16
    assert "linear_probe_top1" not in report


def test_simmim_evaluate_a_folder_needs_test_data(tmp_path, capsys):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("L", (8, 8), 40 if cls == "a" else 200).save(tmp_path / cls / "0.png")
    assert simmim_cli.main(["evaluate", "--pixels", "--data", str(tmp_path), "--no-progress"]) == 2
    assert "--test-data" in capsys.readouterr().err
