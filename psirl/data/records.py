"""Load validated records from JSONL, Parquet or a local `datasets` folder.

``load_records(path, kind=...)`` is the one entry point; every problem is a DataError naming the
file, the 1-based line (JSONL) or row (Parquet / datasets), and the field. Nothing is downloaded:
a path that does not exist locally is an error. Record kinds and their fields are documented in
psirl/data/schema.py; the reward sources they feed are those of
../shared/reference/003_e8bd019fa090e190.txt.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from psirl.data.errors import DataError
from psirl.data.lengths import check_prompt_lengths
from psirl.data.schema import KINDS, validate_record

__all__ = ["RecordList", "check_enough_records", "check_prompt_lengths", "load_records"]

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


class RecordList(list):
    """A ``list[dict]`` of records that also remembers where each came from.

    ``locations[i]`` is ``"file:line"`` (JSONL) or ``"file: row n"`` (Parquet / datasets) of
    ``self[i]``; ``source`` is the path. Used by check_prompt_lengths to name the offending line.
    """

    def __init__(self, records: list[dict[str, Any]], locations: list[str], source: str):
        super().__init__(records)
        self.locations = locations
        self.source = source


# The longest JSONL line (one record) accepted. Checked on the raw bytes, before JSON parsing and
# tokenization, which for a 20 MB line took minutes only to reject it for its token count.
MAX_LINE_BYTES = 4 << 20


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", parsed_json)`` for every non-blank line; bad JSON or a line over
    MAX_LINE_BYTES -> DataError (the over-long line is never read whole)."""
    max_line_bytes = MAX_LINE_BYTES
    with path.open("rb") as handle:
        # +2: room for the line's own "\r\n", which does not count towards the limit
        for line_number, raw in enumerate(iter(lambda: handle.readline(max_line_bytes + 2), b""),
                                          start=1):
            where = f"{path}:{line_number}"
            if len(raw.rstrip(b"\r\n")) > max_line_bytes:
                raise DataError(
                    f"{where}: line longer than {max_line_bytes} bytes "
                    f"(psirl.data.records.MAX_LINE_BYTES); one record this large cannot fit any "
                    f"prompt budget"
                )
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not valid UTF-8 ({error.reason})") from None
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{where}: invalid JSON: {error.msg} (column {error.colno})"
                ) from None


def _without_nulls(row: dict[str, Any]) -> dict[str, Any]:
    # Columnar formats cannot express an absent field: a null there means "not present".
    return {key: value for key, value in row.items() if value is not None}


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read as Parquet: {error}") from None
    row_number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_number += 1
            yield f"{path}: row {row_number}", _without_nulls(row)


def _saved_without_rows(folder: Path) -> bool:
    """True for a Dataset saved with no rows (no data files; datasets cannot reload it)."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _choose_split(path: Path, split: str | None) -> tuple[Path, str]:
    """(folder of the chosen split, label for messages) of a dataset folder."""
    dict_file = path / "dataset_dict.json"
    if not dict_file.exists():
        if split is not None:
            raise DataError(
                f"{path}: field 'split': split={split!r} given but this folder holds a single "
                f"Dataset without splits; leave split unset"
            )
        return path, str(path)
    try:
        splits = list(json.loads(dict_file.read_text(encoding="utf-8"))["splits"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{dict_file}: field 'splits': unreadable ({error})") from None
    available = ", ".join(sorted(splits))
    if split is None:
        if len(splits) != 1:
            raise DataError(
                f"{path}: field 'split': this dataset folder has several splits "
                f"({available}); choose one with split=..."
            )
        split = splits[0]
    if split not in splits:
        raise DataError(
            f"{path}: field 'split': unknown split {split!r}; available splits: {available}"
        )
    return path / split, f"{path}[{split}]"


def _iter_datasets_folder(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    folder, label = _choose_split(path, split)
    if _saved_without_rows(folder):
        return
    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as error:  # datasets raises FileNotFoundError / ValueError variants
        raise DataError(
            f"{folder}: not a dataset folder saved with Dataset.save_to_disk: {error}"
        ) from None
    for row_number, row in enumerate(dataset, start=1):
        yield f"{label}: row {row_number}", _without_nulls(dict(row))


def _iter_raw(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        return _iter_datasets_folder(path, split)
    suffix = path.suffix.lower()
    if split is not None:
        raise DataError(
            f"{path}: field 'split': split={split!r} only applies to a `datasets` folder; "
            f"a {suffix or 'plain'} file has no splits"
        )
    if suffix in JSONL_SUFFIXES:
        return _iter_jsonl(path)
    if suffix in PARQUET_SUFFIXES:
        return _iter_parquet(path)
    raise DataError(
        f"{path}: unsupported file type {suffix or '(no suffix)'!r}; expected JSONL "
        f"({', '.join(JSONL_SUFFIXES)}), Parquet ({', '.join(PARQUET_SUFFIXES)}) or a folder "
        f"saved with datasets' save_to_disk"
    )


def _check_pair_differs(record: dict[str, Any], where: str) -> None:
    """A pair whose chosen and rejected completions are equal states no preference (its DPO
    loss is log 2 with zero gradient whatever the model), so it is a data error, not a pair."""
    if record.get("chosen") == record.get("rejected"):
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical; a preference "
                        "pair needs two different completions")


def check_enough_records(records: list, needed: int, key: str, what: str = "records") -> None:
    """Refuse a training set smaller than one step's batch (each step would silently use fewer
    examples than `key` asks for). `records` may be a RecordList (its source is named)."""
    if len(records) < needed:
        source = getattr(records, "source", None)
        raise DataError(f"{source + ': ' if source else ''}{len(records)} {what}, fewer than "
                        f"{key}={needed}; each step needs that many distinct {what}")


def load_records(
    path: str | Path,
    *,
    kind: str,
    split: str | None = None,
    limit: int | None = None,
) -> RecordList:
    """Read and validate records of ``kind`` from a local JSONL / Parquet file or dataset folder.

    Args:
        path: ``*.jsonl`` / ``*.ndjson`` (one JSON object per line, blank lines skipped),
            ``*.parquet``, or a folder written by ``Dataset.save_to_disk`` /
            ``DatasetDict.save_to_disk``.
        kind: "prompt" | "sft" | "preference" | "labelled" (schemas in psirl/data/schema.py).
        split: for a DatasetDict folder, which split; may be omitted when it has exactly one.
        limit: read at most this many records (the first ``limit``, in file order).

    Returns:
        RecordList (a ``list[dict]``): validated records, extra fields kept, numeric
        ``answer`` values as strings; ``.locations[i]`` says where record i came from.

    Raises:
        DataError naming the file, line/row and field: missing file, bad JSON line, missing
        field, wrong type, empty value, no records ("file has no records"), unknown split.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: unknown record kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: must be a positive integer or None, got {limit!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found (psirl reads local files only)")
    records: list[dict[str, Any]] = []
    locations: list[str] = []
    for where, raw in _iter_raw(path, split):
        record = validate_record(kind, raw, where)
        if kind == "preference":
            _check_pair_differs(record, where)
        records.append(record)
        locations.append(where)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        label = f"{path}[{split}]" if split is not None else str(path)
        raise DataError(f"{label}: file has no records")
    return RecordList(records, locations, str(path))
