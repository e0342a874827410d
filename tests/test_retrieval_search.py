"""`simmim index` and `simmim search` against a real Milvus Lite database in tmp_path, queries
embedded here or by a real `simmim serve` on loopback, and the refusal of another model."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from pymilvus import MilvusClient
from retrieval_fixtures import BROKEN, make_library, read_rows, simmim, write_vectors
from service_fixtures import ServerProcess

import simmim_cli
from retrieval.index import index
from retrieval.milvus import connect
from retrieval.sources import image_paths
from simmim_core.model_dir import ENCODER, ENCODER_INT8, load_model_dir


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return make_library(tmp_path_factory.mktemp("library"))


@pytest.fixture(scope="module")
def vectors(library, tiny_model_dir, tmp_path_factory):
    return write_vectors(library, tmp_path_factory.mktemp("v") / "vectors.parquet", tiny_model_dir)


@pytest.fixture(scope="module")
def int8_vectors(library, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("v8") / "vectors.parquet"
    return write_vectors(library, out, tiny_model_dir, int8=True)


@pytest.fixture(scope="module")
def db(vectors, tmp_path_factory):
    """`simmim index VECTORS --uri .../vectors.db --collection images` (Milvus Lite)."""
    uri = str(tmp_path_factory.mktemp("milvus") / "vectors.db")
    assert simmim_cli.main(["index", str(vectors), "--uri", uri, "--collection", "images"]) == 0
    return uri


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("serve"), api_key=None) as s:
        s.wait_ready()
        yield s


def good_images(library) -> list[str]:
    return [p for p in image_paths(library) if not p.endswith(BROKEN)]


def search(capsys, db, *argv) -> tuple[int, str, str]:
    return simmim(capsys, "search", *argv, "--uri", db, "--collection", "images")


def parse(text: str) -> dict[str, list[tuple[int, float, str]]]:
    """The text output -> {query: [(rank, score, path), ...]}."""
    results, query = {}, None
    for line in text.splitlines():
        if line.startswith(" "):
            rank, score, path = line.split(maxsplit=2)
            results[query].append((int(rank), float(score), path))
        else:
            query = line
            results[query] = []
    return results


# --- index ------------------------------------------------------------------------------------
def test_index_loads_every_good_row_and_counts_the_rows_with_an_error(capsys, vectors, tmp_path):
    uri = str(tmp_path / "v.db")
    status, out, _ = simmim(capsys, "index", vectors, "--uri", uri, "--collection", "c")
    assert status == 0
    assert "indexed 10 vectors (HNSW, COSINE), skipped 1 rows with an error; 10 in" in out


def test_the_collection_has_an_hnsw_cosine_index_and_records_the_model(db, tiny_model_dir):
    client = MilvusClient(db)
    card = load_model_dir(tiny_model_dir).card
    properties = client.describe_collection("images")["properties"]
    assert properties["simmim.model"] == card["name"]
    assert properties["simmim.encoder_sha256"] == card["files"][ENCODER]["sha256"]
    assert properties["simmim.dim"] == str(card["embedding_dim"])
    index = client.describe_index("images", "embedding")
    assert (index["index_type"], index["metric_type"]) == ("HNSW", "COSINE")


def test_indexing_the_same_file_again_replaces_its_rows_instead_of_adding(
    capsys, vectors, tmp_path
):
    uri = str(tmp_path / "v.db")
    simmim(capsys, "index", vectors, "--uri", uri, "--collection", "c")
    status, out, _ = simmim(capsys, "index", vectors, "--uri", uri, "--collection", "c")
    assert status == 0 and "; 10 in the collection" in out


def test_vectors_of_another_model_are_refused_into_a_collection(
    capsys, vectors, int8_vectors, tmp_path
):
    uri = str(tmp_path / "v.db")
    simmim(capsys, "index", vectors, "--uri", uri, "--collection", "c")
    status, _, err = simmim(capsys, "index", int8_vectors, "--uri", uri, "--collection", "c")
    assert status == 1 and len(err.splitlines()) == 1
    assert "holds vectors of" in err and ENCODER_INT8 in err and "--replace" in err


def test_replace_rebuilds_the_collection_for_the_new_vectors(
    capsys, vectors, int8_vectors, tmp_path
):
    uri = str(tmp_path / "v.db")
    simmim(capsys, "index", vectors, "--uri", uri, "--collection", "c")
    status, out, _ = simmim(
        capsys, "index", int8_vectors, "--uri", uri, "--collection", "c", "--replace"
    )
    assert status == 0 and "; 10 in the collection" in out
    properties = MilvusClient(uri).describe_collection("c")["properties"]
    assert properties["simmim.encoder_file"] == ENCODER_INT8


@pytest.mark.slow
def test_milvus_lite_still_answers_after_a_minute_without_requests(vectors, tmp_path):
    # pymilvus's default keepalive pings an idle connection every 10 s, which gRPC servers with
    # default settings (Milvus Lite's) answer with GOAWAY too_many_pings after about 30 s; the
    # next client in the process then failed to connect
    uri = str(tmp_path / "v.db")
    index(str(vectors), uri, "c")
    time.sleep(60)
    client = connect(uri)
    assert client.get_collection_stats("c")["row_count"] == 10
    client.close()


# --- search -----------------------------------------------------------------------------------
def test_each_indexed_image_finds_itself_first(capsys, db, library, tiny_model_dir):
    queries = good_images(library)
    status, out, _ = search(capsys, db, *queries, "--model-dir", tiny_model_dir, "-k", "3")
    assert status == 0
    results = parse(out)
    assert list(results) == queries
    for query, hits in results.items():
        assert [rank for rank, _, _ in hits] == [1, 2, 3]
        assert hits[0][2] == query and hits[0][1] == pytest.approx(1.0, abs=1e-4)
        assert hits[0][1] >= hits[1][1] >= hits[2][1]


def test_search_scores_are_the_cosine_similarities_of_the_stored_vectors(
    capsys, db, library, vectors, tiny_model_dir
):
    query = good_images(library)[0]
    status, out, _ = search(capsys, db, query, "--model-dir", tiny_model_dir, "-k", "4")
    stored = {p: np.asarray(e) for p, (e, _) in read_rows(vectors).items() if e is not None}
    for _, score, path in parse(out)[query]:
        a, b = stored[query], stored[path]
        assert score == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-4)


def test_json_output_lists_rank_score_and_path_per_query(capsys, db, library, tiny_model_dir):
    queries = good_images(library)[:2]
    status, out, _ = search(
        capsys, db, *queries, "--model-dir", tiny_model_dir, "-k", "2", "--json"
    )
    assert status == 0
    found = json.loads(out)
    assert [q["query"] for q in found] == queries
    assert [n["rank"] for n in found[0]["neighbours"]] == [1, 2]
    assert set(found[0]["neighbours"][0]) == {"rank", "score", "path"}


def test_a_collection_built_by_another_model_is_refused(capsys, db, library):
    # no --model-dir: the embedded default model, not the tiny model that built the collection
    status, out, err = search(capsys, db, good_images(library)[0])
    assert status == 1 and out == "" and len(err.splitlines()) == 1
    assert "the collection was built by" in err and "search with the model that built it" in err


@pytest.mark.slow
def test_search_through_the_service_gives_the_local_neighbours_and_scores(
    capsys, db, library, tiny_model_dir, server
):
    queries = good_images(library)[:3]
    status, remote, _ = search(capsys, db, *queries, "--server", server.url, "-k", "4")
    assert status == 0
    _, local, _ = search(capsys, db, *queries, "--model-dir", tiny_model_dir, "-k", "4")
    remote, local = parse(remote), parse(local)
    for query in queries:
        assert [p for _, _, p in remote[query]] == [p for _, _, p in local[query]]
        for (_, a, _), (_, b, _) in zip(remote[query], local[query]):
            assert a == pytest.approx(b, abs=1e-4)


@pytest.mark.slow
def test_a_service_serving_another_encoder_is_refused(
    capsys, library, int8_vectors, server, tmp_path
):
    # the collection holds int8 vectors; the service embeds with encoder.onnx (its /info says)
    uri = str(tmp_path / "v.db")
    assert simmim(capsys, "index", int8_vectors, "--uri", uri, "--collection", "images")[0] == 0
    status, _, err = search(capsys, uri, good_images(library)[0], "--server", server.url)
    assert status == 1 and len(err.splitlines()) == 1
    assert f"the service at {server.url} embeds with" in err and ENCODER_INT8 in err


# --- mistakes ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["index", "{tmp}/none.parquet", "--uri", "{tmp}/v.db"], "no such file"),
        (["index", "{image}", "--uri", "{tmp}/v.db"], "not a Parquet file written by simmim"),
        (["index", "{vectors}", "--uri", "ftp://host/x"], "give a Milvus Lite database file"),
        (["index", "{vectors}", "--uri", "{tmp}/v"], "ending in .db"),
        (["index", "{vectors}", "--uri", "{tmp}/no/v.db"], "does not exist; create it first"),
        (["index", "{vectors}", "--uri", "http://127.0.0.1:9"], "cannot open the Milvus server"),
        (["search", "{image}", "--uri", "{db}", "--collection", "nope"], "no such collection"),
        (["search", "{tmp}/none.png", "--uri", "{db}", "--collection", "images"], "no such file"),
        (["search", "{broken}", "--uri", "{db}", "--model-dir", "{model}"], "not a decodable"),
        (["search", "{image}", "--uri", "{db}", "-k", "0"], "-k must be at least 1"),
    ],
)
def test_index_and_search_mistakes_are_one_line_saying_what_to_do(
    capsys, tmp_path, db, vectors, library, tiny_model_dir, argv, message
):
    values = {
        "tmp": tmp_path,
        "db": db,
        "vectors": vectors,
        "image": good_images(library)[0],
        "broken": library / BROKEN,
        "model": tiny_model_dir,
    }
    status, out, err = simmim(capsys, *[a.format(**values) for a in argv])
    assert status == 1 and out == ""
    assert err.startswith(f"simmim {argv[0]}: ") and message in err and len(err.splitlines()) == 1
