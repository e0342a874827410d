"""The onnxruntime backend on its own: providers, threads, shapes, and model checks."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.backend import (
    OnnxBackend,
    available_cpus,
    parallelism,
    resolve_providers,
    session_options,
)
from simmim_core.model_dir import ENCODER_INT8, ModelDirError, load_model_dir


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return OnnxBackend(load_model_dir(tiny_model_dir), "cpu", threads=1, max_batch_size=3)


def test_cpu_and_auto_providers_resolve_without_a_gpu_and_cuda_says_what_is_missing(monkeypatch):
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: ["CPUExecutionProvider"])
    assert resolve_providers("cpu") == resolve_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        resolve_providers("cuda")
    monkeypatch.setattr(
        "onnxruntime.get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert resolve_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(
    "cpu_max, expected", [("max 100000", None), ("50000 100000", 1), ("150000 100000", 2)]
)
def test_default_threads_respect_a_container_cpu_quota(tmp_path, cpu_max, expected):
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    unlimited = available_cpus(tmp_path / "missing")
    assert available_cpus(tmp_path / "cpu.max") == min(unlimited, expected or unlimited)
    assert session_options(0).intra_op_num_threads == available_cpus()
    assert session_options(3).intra_op_num_threads == 3


@pytest.mark.parametrize(
    "provider, cpus, asked, expected",
    [
        ("cpu", 1, (0, 0, 0), (1, 1, 1)),
        ("cpu", 2, (0, 0, 0), (2, 1, 1)),
        ("cpu", 8, (0, 0, 0), (2, 2, 2)),
        ("cpu", 8, (1, 0, 0), (1, 2, 4)),
        ("cpu", 2, (1, 0, 0), (1, 2, 1)),
        ("cpu", 6, (1, 3, 0), (1, 3, 2)),
        ("cpu", 2, (1, 4, 0), (1, 4, 1)),
        ("cpu", 8, (1, 1, 3), (1, 1, 3)),
        ("cpu", 8, (4, 0, 0), (4, 2, 1)),
        ("cuda", 8, (0, 0, 0), (1, 1, 8)),
    ],
)
def test_processes_workers_and_threads_default_to_two_sharing_the_cpus_and_one_on_cuda(
    monkeypatch, provider, cpus, asked, expected
):
    monkeypatch.setattr("service.backend.available_cpus", lambda: cpus)
    assert parallelism(provider, *asked) == expected


def test_concurrent_calls_on_the_shared_session_each_get_their_own_results(backend, tiny_model_dir):
    card = load_model_dir(tiny_model_dir).card
    c, s = card["in_chans"], card["image_size"]
    batches = [
        np.random.default_rng(i).standard_normal((i % 3 + 1, c, s, s)).astype(np.float32)
        for i in range(12)
    ]
    alone = [backend.embed(b) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(backend.embed, batches))
    for a, t in zip(alone, together):
        np.testing.assert_array_equal(a, t)


def test_embed_and_reconstruct_shapes_at_any_batch_size(backend, tiny_model_dir):
    card = load_model_dir(tiny_model_dir).card
    c, s, p = card["in_chans"], card["image_size"], card["patch_size"]
    backend.warmup()
    for n in (1, 3, 5):  # beyond max_batch_size works too
        pixels = np.random.default_rng(n).standard_normal((n, c, s, s)).astype(np.float32)
        assert backend.embed(pixels).shape == (n, card["embedding_dim"])
        mask = np.ones((n, s // p, s // p), np.uint8)  # uint8 is cast to the model's type
        assert backend.reconstruct(pixels, mask).shape == (n, c, s, s)
    assert backend.describe()["threads"] == 1


def test_a_card_that_disagrees_with_the_onnx_file_is_refused_naming_both(tiny_model_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    card = json.loads((broken / "model.json").read_text())
    card["image_size"] *= 2
    (broken / "model.json").write_text(json.dumps(card))
    with pytest.raises(
        ModelDirError,
        match=r"encoder.onnx: input 'pixels' has shape .* but "
        r"model.json implies",
    ):
        OnnxBackend(load_model_dir(broken), "cpu")


def test_int8_without_an_int8_file_is_refused(tiny_model_dir, tmp_path):
    plain = tmp_path / "model"
    shutil.copytree(tiny_model_dir, plain)
    card = json.loads((plain / "model.json").read_text())
    del card["files"][ENCODER_INT8]
    (plain / ENCODER_INT8).unlink()
    (plain / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelDirError, match="int8 requested"):
        OnnxBackend(load_model_dir(plain), "cpu", int8=True)
