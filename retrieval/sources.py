"""The SOURCE of `simmim embed` -> the image paths to embed.

SOURCE is a folder (searched recursively for files with an image suffix, simmim_core's
IMAGE_SUFFIXES), a Parquet file with a `path` column, or a text file with one path per line
(blank lines and lines starting with # are skipped). Relative paths in a list are relative to
the list's own folder. Paths come back absolute (symlinks kept as they are), each once, in the
source's order (a folder's sorted).
"""

from __future__ import annotations

import os
from pathlib import Path

from simmim_core.preprocess import IMAGE_SUFFIXES

from .errors import UsageError


def image_paths(source: str | os.PathLike) -> list[str]:
    """Every image path SOURCE names (absolute). Raises UsageError when it names none."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(source.absolute())
            for name in names
            if Path(name).suffix.lower() in IMAGE_SUFFIXES
        )
        if not paths:
            raise UsageError(
                f"{source}: no image files ({' '.join(sorted(IMAGE_SUFFIXES))}) in this "
                "folder or below; give a folder of images, or a .txt or .parquet list of paths"
            )
        return paths
    if not source.is_file():
        raise UsageError(
            f"{source}: no such file or folder; give a folder of images, or a .txt or "
            ".parquet file listing image paths"
        )
    listed = _parquet_paths(source) if source.suffix.lower() == ".parquet" else _text_paths(source)
    base = source.absolute().parent
    paths = list(dict.fromkeys(os.path.normpath(base / p) for p in listed))
    if not paths:
        raise UsageError(f"{source}: lists no image paths")
    return paths


def _text_paths(source: Path) -> list[str]:
    try:
        lines = source.read_text().splitlines()
    except UnicodeDecodeError:
        raise UsageError(
            f"{source}: not a text file; give a folder of images, or a list of paths as "
            "text (one per line) or Parquet (a 'path' column)"
        ) from None
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def _parquet_paths(source: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(source)
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"{source}: not a readable Parquet file ({e})") from None
    if "path" not in schema.names:
        raise UsageError(
            f"{source}: has no 'path' column (its columns: {', '.join(schema.names)}); "
            "list the image paths in a column named path"
        )
    column = pq.read_table(source, columns=["path"]).column("path")
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise UsageError(f"{source}: column 'path' holds {column.type}, not strings")
    return [p for p in column.to_pylist() if p]
