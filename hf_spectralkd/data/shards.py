"""Raw records of a streamed split, read by (shard, row range): what the resumable stream is built on.

A streamed split is a list of shards (files), each an ordered list of *blocks*: the smallest row
ranges that can be read on their own. A :class:`ShardLayout` records how many rows each block
holds; the stream plans every pass and every resume from it by arithmetic alone
(:mod:`.streaming`). Two readers provide it:

* :class:`ParquetShards`: local or remote (``hf://``, ``https://``) parquet files read with
  pyarrow. Blocks are the files' row groups (``datasets`` writes image parquet in groups of 100
  rows), whose sizes the footers hold, so the layout costs one footer read per file and any row range
  is read by opening only the row groups that hold it.
* :class:`IterableDatasetShards`: any other ``datasets.IterableDataset`` (webdataset tars,
  image folders, generated data). Each of its shards is one block, counted once by reading it
  without decoding; a row range is read by skipping the shard's earlier rows.

:func:`load_layout` caches a layout as JSON (``stream_layout.json`` in the run's output folder), so
remote footers are read, or shards counted, once per run folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

logger = logging.getLogger(__name__)

LAYOUT_FILE = "stream_layout.json"
#: Open parquet files kept per reader process: a window draws blocks from many files, and reopening a
#: remote file costs a footer request.
OPEN_FILES = 32
#: Rows per batch when a datasets stream is read.
READ_BATCH = 64


@dataclass(frozen=True)
class ShardLayout:
    """Rows of every block of every shard: ``block_rows[s]`` lists shard ``s``'s blocks in file order."""

    shards: tuple[str, ...]
    block_rows: tuple[tuple[int, ...], ...]

    @property
    def num_rows(self) -> int:
        return sum(sum(blocks) for blocks in self.block_rows)

    def blocks(self) -> list[tuple[int, int, int]]:
        """Every block as ``(shard, first row, end row)``, shard by shard."""
        out = []
        for shard, sizes in enumerate(self.block_rows):
            start = 0
            for size in sizes:
                if size > 0:
                    out.append((shard, start, start + size))
                start += size
        return out

    def truncated(self, max_rows: Optional[int]) -> "ShardLayout":
        """The first ``max_rows`` rows in shard order (the split's first records), cutting the last block."""
        if max_rows is None or max_rows >= self.num_rows:
            return self
        left, rows = max_rows, []
        for sizes in self.block_rows:
            kept = []
            for size in sizes:
                take = min(size, left)
                if take > 0:
                    kept.append(take)
                left -= take
            rows.append(tuple(kept))
        return ShardLayout(self.shards, tuple(rows))

    def to_dict(self) -> dict[str, Any]:
        return {"shards": list(self.shards), "block_rows": [list(sizes) for sizes in self.block_rows]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShardLayout":
        return cls(tuple(data["shards"]), tuple(tuple(int(n) for n in sizes) for sizes in data["block_rows"]))


def load_layout(source, cache_dir: Optional[str] = None) -> ShardLayout:
    """``source.layout()``, read from or written to ``<cache_dir>/stream_layout.json`` when given.

    The cache is keyed by ``source.fingerprint()`` (file names, and sizes and modification times of
    local files): a changed data set is measured again.
    """
    cache = Path(cache_dir) / LAYOUT_FILE if cache_dir else None
    fingerprint = source.fingerprint()
    if cache is not None and cache.is_file():
        try:
            stored = json.loads(cache.read_text(encoding="utf-8"))
            if stored.get("fingerprint") == fingerprint:
                return ShardLayout.from_dict(stored["layout"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring unreadable %s: %s", cache, error)
    layout = source.layout()
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"fingerprint": fingerprint, "layout": layout.to_dict()}), encoding="utf-8")
            os.replace(tmp, cache)
        except OSError as error:  # a read-only output folder only costs a re-count next time
            logger.warning("could not cache the stream layout in %s: %s", cache, error)
    return layout


def _is_remote(path: str) -> bool:
    return "://" in path


def _row_group_sizes(path: str) -> tuple[int, ...]:
    """Rows of each row group of a parquet file, from its footer."""
    import pyarrow.parquet as pq

    if _is_remote(path):
        import fsspec

        with fsspec.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
    else:
        metadata = pq.read_metadata(path)
    return tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))


def check_parquet_files(files: Sequence[str], split: str, argument: str = "dataset") -> None:
    """Refuse a split's local parquet files that ``datasets`` would fail on deep inside its build (a
    ``DatasetGenerationError``): a file whose footer cannot be read (cut short by a copy), one with no rows, or files
    whose columns differ. Reads the footers only. Remote files are left to the reader.

    Raises:
        DamagedFileError: a file cannot be read as parquet.
        ConfigurationError: a file holds no rows, or two files have different columns or column types.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..errors import ConfigurationError
    from ..io.integrity import damaged, first_line

    first: Optional[tuple[str, Any]] = None
    for path in files:
        if _is_remote(path):
            continue
        try:
            metadata = pq.read_metadata(path)
        except (pa.ArrowException, OSError) as error:
            raise damaged(argument, path, [f"not a readable parquet file: {first_line(error).rstrip('.')}"]) from None
        if metadata.num_rows == 0:
            raise ConfigurationError(
                f"{argument}: parquet file '{path}' of split '{split}' holds no rows; remove it, or copy it again if it "
                "should hold images"
            )
        schema = metadata.schema.to_arrow_schema().remove_metadata()
        if first is None:
            first = (path, schema)
        elif not schema.equals(first[1]):
            describe = lambda s: ", ".join(f"{f.name}: {f.type}" for f in s)  # noqa: E731
            raise ConfigurationError(
                f"{argument}: the parquet files of split '{split}' have different columns: '{first[0]}' has "
                f"[{describe(first[1])}] but '{path}' has [{describe(schema)}]; give every file of a split the same columns"
            )


class ParquetShards:
    """Rows of parquet files, read by row groups.

    Args:
        files: local paths or fsspec URLs (``hf://datasets/...``; the Hub token comes from
            ``HF_TOKEN`` or the cached login, as for ``datasets``).
        image_column, label_column: the columns read; an image column is ``datasets``' image struct
            (``{"bytes", "path"}``), bytes or a path.
    """

    def __init__(self, files: Sequence[str], image_column: str, label_column: str):
        self.files = [str(f) for f in files]
        self.image_column, self.label_column = image_column, label_column
        self.records_read = 0  # rows of the row groups read, in this process
        self.files_opened = 0
        self._open: OrderedDict[int, Any] = OrderedDict()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # file handles stay in the process that opened them
        return state

    def fingerprint(self) -> list:
        out = []
        for path in self.files:
            if _is_remote(path):
                out.append([path])
            else:
                stat = os.stat(path)
                out.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
        return out

    def _file(self, shard: int):
        import pyarrow.parquet as pq

        opened = self._open.get(shard)
        if opened is not None:
            self._open.move_to_end(shard)
            return opened[0]
        path = self.files[shard]
        if _is_remote(path):
            import fsspec

            remote = fsspec.open(path, "rb").open()
            opened = (pq.ParquetFile(remote), remote)
        else:
            opened = (pq.ParquetFile(path), None)
        self.files_opened += 1
        self._open[shard] = opened
        if len(self._open) > OPEN_FILES:
            _, (evicted, remote) = self._open.popitem(last=False)
            evicted.close()
            if remote is not None:
                remote.close()
        return opened[0]

    def layout(self) -> ShardLayout:
        """Row-group sizes from the footers (one footer read per file; remote ones 16 at a time)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=16 if any(_is_remote(p) for p in self.files) else 1) as pool:
            rows = list(pool.map(_row_group_sizes, self.files))
        return ShardLayout(tuple(self.files), tuple(rows))

    def read(self, shard: int, start: int, stop: int) -> list[tuple[Any, Any]]:
        """``(image value, label)`` of rows ``[start, stop)`` of file ``shard``, opening only their row groups."""
        handle = self._file(shard)
        metadata = handle.metadata
        groups, first_row, group_start = [], None, 0
        for group in range(metadata.num_row_groups):
            group_rows = metadata.row_group(group).num_rows
            group_end = group_start + group_rows
            if group_end > start and group_start < stop:
                groups.append(group)
                first_row = group_start if first_row is None else first_row
                self.records_read += group_rows
            group_start = group_end
        if not groups:
            return []
        table = handle.read_row_groups(groups, columns=[self.image_column, self.label_column])
        table = table.slice(start - first_row, stop - start)
        return list(zip(table.column(self.image_column).to_pylist(), table.column(self.label_column).to_pylist()))


class IterableDatasetShards:
    """Rows of a ``datasets.IterableDataset``, one block per shard of it.

    Args:
        raw: the streamed split; its image column is read undecoded.
        name: what identifies the split in the layout cache (dataset id, config, split, revision).
    """

    def __init__(self, raw, image_column: str, label_column: str, name: str):
        import datasets

        self.raw = raw.cast_column(image_column, datasets.Image(decode=False))
        self.image_column, self.label_column, self.name = image_column, label_column, name
        self.records_read = 0
        self.files_opened = 0

    def fingerprint(self) -> list:
        return [self.name, self.raw.num_shards]

    def _shard(self, shard: int):
        return self.raw.shard(num_shards=self.raw.num_shards, index=shard, contiguous=True)

    def _rows(self, dataset) -> Iterator[dict[str, Any]]:
        # IterableDataset.iter() reads every shard it holds; plain iteration inside a DataLoader worker
        # would instead keep only the shards datasets assigns to that worker (none, for one shard).
        for batch in dataset.iter(batch_size=READ_BATCH):
            columns = list(batch)
            yield from (dict(zip(columns, values)) for values in zip(*batch.values()))

    def layout(self) -> ShardLayout:
        """Rows per shard, counted by reading every shard's label column once (no decoding)."""
        logger.info("counting the rows of %d shards of %s once (cached in the output folder)", self.raw.num_shards, self.name)
        counts = []
        for shard in range(self.raw.num_shards):
            counts.append((sum(1 for _ in self._rows(self._shard(shard).select_columns([self.label_column]))),))
        return ShardLayout(tuple(f"{self.name}#{i}" for i in range(self.raw.num_shards)), tuple(counts))

    def read(self, shard: int, start: int, stop: int) -> list[tuple[Any, Any]]:
        """Rows ``[start, stop)`` of shard ``shard``; its rows before ``start`` are read and dropped."""
        self.files_opened += 1
        self.records_read += stop
        rows = islice(self._rows(self._shard(shard)), start, stop)
        return [(row[self.image_column], row[self.label_column]) for row in rows]
