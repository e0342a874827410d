"""`simmim embed`: image files -> vectors.parquet on a real local Ray (Ray Data actors with
onnxruntime sessions), the service's vectors, unreadable files recorded, resumable runs; and
what SOURCE may be."""

from __future__ import annotations

import importlib
import logging
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from retrieval_fixtures import BROKEN, make_library, read_rows, simmim, write_vectors
from service_fixtures import Reference

import simmim_cli
from retrieval.errors import UsageError
from retrieval.sources import image_paths
from simmim_core.model_dir import ENCODER, ENCODER_INT8, load_model_dir


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for this module's jobs (`simmim embed` uses it), then shut down."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return make_library(tmp_path_factory.mktemp("library"))


@pytest.fixture(scope="module")
def embedded(local_ray, library, tiny_model_dir, tmp_path_factory):
    """`simmim embed LIBRARY --out vectors.parquet --model-dir TINY` on the local Ray."""
    out = tmp_path_factory.mktemp("embedded") / "vectors.parquet"
    argv = ["embed", library, "--out", out, "--model-dir", tiny_model_dir, "--batch-size", "3"]
    assert simmim_cli.main([str(a) for a in [*argv, "--no-progress"]]) == 0
    return out


def embed(capsys, source, out, model_dir, *more) -> tuple[int, str, str]:
    return simmim(
        capsys, "embed", source, "--out", out, "--model-dir", model_dir, "--no-progress", *more
    )


# --- one run ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_embed_writes_a_row_for_every_image_file_under_the_folder(embedded, library):
    assert sorted(read_rows(embedded)) == image_paths(library)
    assert len(read_rows(embedded)) == 11  # 10 images + the broken one; notes.txt is no image


@pytest.mark.slow
def test_embedded_vectors_equal_the_service_preprocessing_and_onnxruntime(
    embedded, library, tiny_model_dir
):
    good = [p for p in image_paths(library) if not p.endswith(BROKEN)]
    expected = Reference(tiny_model_dir).embed([open(p, "rb").read() for p in good])
    found = read_rows(embedded)
    got = np.array([found[p][0] for p in good], np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_an_unreadable_file_is_recorded_with_its_error_and_no_vector(embedded, library):
    rows = read_rows(embedded)
    vector, error = rows[str(library / BROKEN)]
    assert vector is None and "not a decodable image" in error
    assert all(e is None for p, (_, e) in rows.items() if not p.endswith(BROKEN))


@pytest.mark.slow
def test_the_file_metadata_names_the_model_encoder_sha256_and_dimension(embedded, tiny_model_dir):
    schema = pq.read_schema(embedded)
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    card = load_model_dir(tiny_model_dir).card
    assert meta["simmim.model"] == card["name"]
    assert meta["simmim.encoder_file"] == ENCODER
    assert meta["simmim.encoder_sha256"] == card["files"][ENCODER]["sha256"]
    assert meta["simmim.dim"] == str(card["embedding_dim"])
    assert meta["simmim.normalized"] == "false"
    assert schema.field("embedding").type == pa.list_(pa.float32(), card["embedding_dim"])


# --- resumable and incremental ----------------------------------------------------------------
@pytest.mark.slow
def test_a_second_run_embeds_only_new_files_and_drops_removed_ones(
    capsys, local_ray, embedded, library, tiny_model_dir, tmp_path
):
    folder = shutil.copytree(library, tmp_path / "library")
    out = shutil.copy(embedded, tmp_path / "vectors.parquet")
    before = read_rows(out)
    # the copy sits elsewhere: its paths are all new, except those of a list naming the old ones
    listing = tmp_path / "list.txt"
    kept = [p for p in sorted(before) if not p.endswith(BROKEN)][:6]
    listing.write_text("\n".join([*kept, str(folder / "shirts" / "img1.png")]))
    status, stdout, _ = embed(capsys, listing, out, tiny_model_dir)
    assert status == 0
    assert "embedded 1 now, kept 6 from an earlier run" in stdout
    after = read_rows(out)
    assert sorted(after) == sorted([*kept, str(folder / "shirts" / "img1.png")])
    for p in kept:
        assert after[p] == before[p]
    assert not (tmp_path / "vectors.parquet.partial").exists()


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_finished_parts(
    capsys, local_ray, library, tiny_model_dir, tmp_path
):
    # a run that stopped after one part: the part holds the first 4 images (the writer's own
    # file, moved where an interrupted run leaves its parts)
    first = tmp_path / "first.txt"
    first.write_text("\n".join([p for p in image_paths(library) if not p.endswith(BROKEN)][:4]))
    out = tmp_path / "vectors.parquet"
    part = tmp_path / "vectors.parquet.partial" / "part-000001.parquet"
    part.parent.mkdir()
    write_vectors(first, part, tiny_model_dir)
    status, stdout, _ = embed(capsys, library, out, tiny_model_dir)
    assert status == 0
    assert "embedded 7 now, kept 4 from an earlier run" in stdout
    assert sorted(read_rows(out)) == image_paths(library)
    assert not part.parent.exists()


@pytest.mark.slow
def test_a_run_with_nothing_new_leaves_the_file_as_it_is(
    capsys, local_ray, library, tiny_model_dir, tmp_path
):
    folder = shutil.copytree(library, tmp_path / "library")
    (folder / BROKEN).unlink()
    out = tmp_path / "vectors.parquet"
    assert embed(capsys, folder, out, tiny_model_dir)[0] == 0
    written = out.stat().st_mtime_ns
    status, stdout, _ = embed(capsys, folder, out, tiny_model_dir)
    assert status == 0 and "embedded 0 now, kept 10" in stdout
    assert out.stat().st_mtime_ns == written


def test_vectors_of_another_model_in_out_are_refused_not_mixed(
    capsys, library, tiny_model_dir, tmp_path
):
    out = write_vectors(library, tmp_path / "vectors.parquet", tiny_model_dir)
    status, _, err = embed(capsys, library, out, tiny_model_dir, "--int8")
    assert status == 1
    assert f"--out {out} holds vectors of" in err and ENCODER_INT8 in err
    assert len(err.splitlines()) == 1


# --- SOURCE ---------------------------------------------------------------------------------
def test_a_folder_gives_its_image_files_recursively_sorted_and_absolute(library):
    paths = image_paths(library)
    assert paths == sorted(paths) and len(paths) == 11
    assert str(library / "shirts" / "img1.png") in paths
    assert not any(p.endswith("notes.txt") for p in paths)


def test_a_text_list_names_paths_relative_to_its_folder(library):
    listing = library.parent / "list.txt"
    listing.write_text(
        f"# two images\n{library.name}/shirts/img1.png\n\n{library}/shoes/img2.png\n"
    )
    assert image_paths(listing) == [
        str(library / "shirts/img1.png"),
        str(library / "shoes/img2.png"),
    ]


def test_a_parquet_list_names_paths_in_its_path_column(library, tmp_path):
    listing = tmp_path / "list.parquet"
    paths = image_paths(library)[:3]
    pq.write_table(pa.table({"path": paths, "label": [0, 1, 2]}), listing)
    assert image_paths(listing) == paths


@pytest.mark.parametrize("command", ["embed", "index", "search"])
def test_every_option_says_what_it_does_and_its_default(capsys, command):
    module = importlib.import_module(simmim_cli.COMMANDS[command][0])
    for action in module.build_parser()._actions:
        if action.option_strings and action.dest != "help" and not action.required:
            assert "default" in action.help, f"simmim {command} {action.option_strings}"
    assert simmim_cli.main([]) == 0
    assert f"  {command} " in capsys.readouterr().out


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda tmp: tmp / "missing", "no such file or folder"),
        (lambda tmp: tmp, "no image files"),
        (lambda tmp: _write(tmp / "empty.txt", ""), "lists no image paths"),
        (lambda tmp: _write(tmp / "binary.txt", b"\xff\xfe\x00"), "not a text file"),
        (lambda tmp: _write(tmp / "bad.parquet", "no parquet"), "not a readable Parquet file"),
        (
            lambda tmp: _parquet(tmp / "nopath.parquet", {"file": ["a.png"]}),
            "has no 'path' column",
        ),
    ],
)
def test_a_source_that_names_no_image_is_one_line_saying_what_to_give(
    capsys, tmp_path, make_source, message
):
    source = make_source(tmp_path)
    status, _, err = simmim(capsys, "embed", source, "--out", tmp_path / "v.parquet")
    assert status == 1
    assert err.startswith("simmim embed: ") and message in err and len(err.splitlines()) == 1
    with pytest.raises(UsageError):
        image_paths(source)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "{tmp}/missing/v.parquet"], "does not exist"),
        (["--out", "{tmp}"], "is a folder"),
        (["--out", "{tmp}/v.parquet", "--model-dir", "{tmp}"], "--model-dir"),
        (["--out", "{tmp}/v.parquet", "--ray-address", "127.0.0.1:1"], "no Ray cluster answers"),
        (["--out", "{tmp}/v.parquet", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_embed_options_that_cannot_work_are_one_line_saying_what_to_do(
    capsys, library, tmp_path, argv, message
):
    argv = [a.format(tmp=tmp_path) for a in argv]
    status, _, err = simmim(capsys, "embed", library, *argv)
    assert status == 1
    assert err.startswith("simmim embed: ") and message in err and len(err.splitlines()) == 1


def _write(path, content):
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def _parquet(path, columns):
    pq.write_table(pa.table(columns), path)
    return path
