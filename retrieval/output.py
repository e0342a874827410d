"""Writing vectors.parquet so that `simmim embed` is resumable and incremental.

While a run goes on, finished rows go to numbered part files in `<out>.partial/`; a part is
renamed into place when it closes (at least once a minute, and when the run stops, even on an
error or Ctrl-C), so an interruption loses at most the last minute of work. At the end, the rows
kept from earlier runs and the new parts are written to `<out>.tmp`, which is renamed over
`<out>`, and `<out>.partial/` is removed.

A run embeds only the paths of SOURCE that have no vector yet in `<out>` or `<out>.partial/`.
Files that failed are tried again; rows of paths no longer in SOURCE are dropped. A file changed
in place keeps its old vector (delete `<out>` to start over). Earlier rows made by another model
are refused, never mixed.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import UsageError
from .vectors import ModelStamp, read_stamp, schema

PART_SECONDS = 60.0  # a part closes after this long...
PART_ROWS = 50_000  # ...or this many rows
MERGE_ROWS = 8192  # rows per read while merging
# no dictionary encoding: every path and vector is different (with it, writing takes 6 times
# as long and the file is a third larger)
WRITE_OPTIONS = {"use_dictionary": False}


@dataclass(frozen=True)
class Written:
    rows: int  # rows in <out>
    failed: int  # of which with an error
    kept: int  # rows kept from earlier runs
    embedded: int  # rows made by this run (failed ones included)


class ResumableOutput:
    """<out> and its <out>.partial/ folder, for vectors of `stamp` of the paths in `source`."""

    def __init__(self, out: os.PathLike | str, stamp: ModelStamp, source: list[str]):
        self.out = Path(out)
        if not self.out.parent.is_dir():
            raise UsageError(f"--out {out}: the folder {self.out.parent} does not exist")
        if self.out.is_dir():
            raise UsageError(f"--out {out} is a folder; name the .parquet file to write")
        self.stamp, self.schema = stamp, schema(stamp)
        self.partial = self.out.with_name(self.out.name + ".partial")
        for tmp in self.partial.glob("*.tmp"):  # a part that was being written when killed
            tmp.unlink()
        self.earlier = ([self.out] if self.out.exists() else []) + sorted(
            self.partial.glob("part-*.parquet")
        )
        for path in self.earlier:
            found = read_stamp(path, "--out: ")
            if found != stamp:
                raise UsageError(
                    f"--out {path} holds vectors of {found.describe()}, not of "
                    f"{stamp.describe()}; choose another --out, or delete it to start over"
                )
        self.wanted = pa.array(source, pa.string())
        done, self.dropped = set(), 0
        for path in self.earlier:
            table = pq.read_table(path, columns=["path", "error"])
            for p, keep in zip(table["path"].to_pylist(), self._keep(table).to_pylist()):
                if keep:
                    done.add(p)
                else:
                    self.dropped += 1
        self.kept = len(done)
        self.todo = [p for p in source if p not in done]
        self._next_part = len(self.earlier) + 1
        self._new_parts: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._part_rows, self._part_opened, self.embedded = 0, 0.0, 0

    def _keep(self, table: pa.Table | pa.RecordBatch) -> pa.Array:
        """Which earlier rows stay: no error, and the path is still in SOURCE."""
        return pc.and_(pc.is_null(table["error"]), pc.is_in(table["path"], value_set=self.wanted))

    def _part_path(self) -> Path:
        while (path := self.partial / f"part-{self._next_part:06d}.parquet").exists():
            self._next_part += 1
        return path

    def write(self, table: pa.Table) -> None:
        """Append rows (path, embedding, error) made by this run."""
        if self._writer is None:
            self.partial.mkdir(exist_ok=True)
            self._part = self._part_path()
            self._writer = pq.ParquetWriter(
                self._part.with_suffix(".tmp"), self.schema, **WRITE_OPTIONS
            )
            self._part_rows, self._part_opened = 0, time.monotonic()
        self._writer.write_table(table.select(self.schema.names).cast(self.schema))
        self._part_rows += table.num_rows
        self.embedded += table.num_rows
        if self._part_rows >= PART_ROWS or time.monotonic() - self._part_opened >= PART_SECONDS:
            self.close_part()

    def close_part(self) -> None:
        """Close the part being written and put it in place (its rows then count as done)."""
        if self._writer is not None:
            self._writer.close()
            os.replace(self._part.with_suffix(".tmp"), self._part)
            self._new_parts.append(self._part)
            self._writer = None

    def finish(self) -> Written:
        """Write <out> (earlier rows kept + this run's), atomically; remove <out>.partial/."""
        self.close_part()
        if self.earlier == [self.out] and not self._new_parts and not self.dropped:
            rows = pq.read_metadata(self.out).num_rows
            return Written(rows, 0, self.kept, 0)  # up to date: no error rows, nothing new
        tmp = self.out.with_name(self.out.name + ".tmp")
        rows = failed = 0
        with pq.ParquetWriter(tmp, self.schema, **WRITE_OPTIONS) as writer:
            for path, earlier in [(p, True) for p in self.earlier] + [
                (p, False) for p in self._new_parts
            ]:
                for batch in pq.ParquetFile(path).iter_batches(MERGE_ROWS):
                    if earlier:
                        batch = batch.filter(self._keep(batch))
                    writer.write_batch(batch)
                    rows += batch.num_rows
                    failed += batch.num_rows - batch["error"].null_count
        os.replace(tmp, self.out)
        shutil.rmtree(self.partial, ignore_errors=True)
        return Written(rows, failed, self.kept, self.embedded)
