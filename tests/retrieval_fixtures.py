"""Helpers for the retrieval tests: a small photo library on disk (with a broken file), vectors
files written by the real writer without Ray, and the `simmim` CLI called in this process."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from service_fixtures import encode, make_image

import simmim_cli
from retrieval.encoder import ImageEncoder
from retrieval.output import ResumableOutput
from retrieval.sources import image_paths
from retrieval.vectors import rows
from simmim_core.model_dir import load_model_dir

BROKEN = "broken.png"


def make_library(folder: Path, n: int = 10) -> Path:
    """n distinct images (PNG and JPEG, RGB and gray, several sizes) in nested folders, one
    file named .png that is not an image, and a text file that is not taken as an image."""
    for i in range(n):
        sub = folder / ("shirts" if i % 2 else "shoes") / ("old" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        img = make_image(i, size=(40 + 4 * i, 36), mode="L" if i % 4 == 0 else "RGB")
        fmt, suffix = ("JPEG", ".jpg") if i % 5 == 4 else ("PNG", ".png")
        (sub / f"img{i}{suffix}").write_bytes(encode(img, fmt))
    (folder / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n but nothing else")
    (folder / "notes.txt").write_text("not an image")
    return folder


def write_vectors(source: Path, out: Path, model_dir: Path, int8: bool = False) -> Path:
    """What `simmim embed` writes, made in this process with the same encoder and writer."""
    encoder = ImageEncoder(load_model_dir(model_dir), int8, threads=1)
    paths = image_paths(source)
    output = ResumableOutput(out, encoder.stamp, paths)
    output.write(rows(paths, *encoder.embed_files(paths)))
    output.finish()
    return out


def read_rows(path: Path) -> dict[str, tuple]:
    """path -> (embedding list or None, error or None)."""
    table = pq.read_table(path).to_pydict()
    return {p: (e, err) for p, e, err in zip(table["path"], table["embedding"], table["error"])}


def simmim(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `simmim ARGV` in this process: (exit status, stdout, stderr)."""
    status = simmim_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err
