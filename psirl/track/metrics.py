"""Per-step metrics: run_dir/metrics.jsonl (always), optional TensorBoard / W&B / MLflow sinks.

File format: one JSON object per line, ``{"step": int, "time": float (unix seconds), name: value,
...}``, values are numbers (NaN / Infinity written as JSON's common extensions), strings, booleans
or null. Every line is flushed and fsynced before `log` returns, so a run killed with SIGKILL loses
at most the line being written; `read_metrics` skips such a torn final line. On resume the lines of
steps after the checkpoint are dropped, so the file of a resumed run equals that of an
uninterrupted one apart from wall-clock values (`metrics_differences` compares two runs ignoring
them). See DESIGN.md, "Conventions" (run folder, exact resume).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from psirl.track.progress import StepProgress, summary_line

__all__ = [
    "METRICS_FILE",
    "MetricsLogger",
    "StepProgress",
    "comparable_metrics",
    "metrics_differences",
    "metrics_path",
    "read_metrics",
    "summary_line",
    "truncate_metrics",
]

METRICS_FILE = "metrics.jsonl"
SINKS = ("jsonl", "tensorboard", "wandb", "mlflow")
RESERVED_KEYS = ("step", "time")
# Keys whose values depend on the machine / wall clock, ignored when comparing two runs:
# name wall-clock metrics "time/..." (seconds) or "perf/..." (throughput).
VOLATILE_KEYS = ("time",)
VOLATILE_PREFIXES = ("time/", "perf/")

_MISSING = ("track.sinks: the {sink!r} metrics sink needs the {package!r} package: "
            "pip install 'psirl[track]'")


class SinkUnavailable(ImportError):
    """A configured metrics sink whose package is not installed (one line in the CLI)."""


# --------------------------------------------------------------------------- reading


def metrics_path(run_dir: str | os.PathLike) -> Path:
    """run_dir/metrics.jsonl (a path that already names a .jsonl file is returned as is)."""
    path = Path(run_dir)
    return path if path.suffix == ".jsonl" else path / METRICS_FILE


def _parse_lines(path: Path) -> tuple[list[dict], list[bytes], int]:
    """(records, their raw lines, byte length of the complete lines); a torn last line is dropped.

    A line that is not valid JSON anywhere but last raises ValueError naming file:line.
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    # data ends with b"\n" for a clean file, so the last element is b"" (or a torn fragment).
    records: list[dict] = []
    raw: list[bytes] = []
    good_bytes = 0
    for i, line in enumerate(lines):
        is_last = i == len(lines) - 1
        if not line.strip():
            good_bytes += len(line) + (0 if is_last else 1)
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError('expected an object with an integer "step"')
        except ValueError as exc:
            if is_last:  # torn by a kill in the middle of a write
                break
            raise ValueError(f"{path}:{i + 1}: not a metrics record: {exc}") from None
        records.append(record)
        raw.append(line)
        good_bytes += len(line) + (0 if is_last else 1)
    return records, raw, good_bytes


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All records of run_dir/metrics.jsonl in file order, each {"step": int, "time": float, ...}.

    A torn final line (a kill mid-write) is skipped; a malformed line elsewhere raises ValueError
    naming file:line. A missing file raises FileNotFoundError.
    """
    path = metrics_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is {path.parent} a run folder?)")
    return _parse_lines(path)[0]


def truncate_metrics(run_dir: str | os.PathLike, last_step: int) -> int:
    """Drop every record with step > last_step (and any torn final line); return how many
    records were dropped. The rewrite is atomic (temp file, fsync, rename)."""
    path = metrics_path(run_dir)
    if not path.is_file():
        return 0
    records, raw, _ = _parse_lines(path)
    keep = [line for rec, line in zip(records, raw, strict=True) if rec["step"] <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(b"".join(line + b"\n" for line in keep))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return len(records) - len(keep)


def _repair_tail(path: Path) -> None:
    """Make the file end at a line boundary before appending: drop a torn final fragment, or add
    the newline a complete final record lacks."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    _, _, good_bytes = _parse_lines(path)
    with open(path, "r+b") as fh:
        fh.truncate(good_bytes)
        if good_bytes:
            fh.seek(good_bytes - 1)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- comparing runs


def comparable_metrics(
    records: Iterable[Mapping[str, Any]],
    *,
    ignore_keys: Sequence[str] = VOLATILE_KEYS,
    ignore_prefixes: Sequence[str] = VOLATILE_PREFIXES,
) -> list[dict]:
    """Records without wall-clock keys ("time", "time/...", "perf/..." by default)."""
    return [
        {
            k: v
            for k, v in r.items()
            if k not in ignore_keys and not k.startswith(tuple(ignore_prefixes))
        }
        for r in records
    ]


def metrics_differences(
    a: str | os.PathLike | Sequence[Mapping[str, Any]],
    b: str | os.PathLike | Sequence[Mapping[str, Any]],
    *,
    ignore_keys: Sequence[str] = VOLATILE_KEYS,
    ignore_prefixes: Sequence[str] = VOLATILE_PREFIXES,
    rel_tol: float = 0.0,
) -> list[str]:
    """Where two runs' metrics differ, one line each; [] when they match.

    a, b: run folders or lists of records. Values match when equal, both NaN, or (rel_tol > 0)
    |x - y| <= rel_tol * max(|x|, |y|). Used to check that a resumed run equals an uninterrupted
    one (the default rel_tol = 0 asks for bitwise-equal floats).
    """
    ra = comparable_metrics(_records(a), ignore_keys=ignore_keys, ignore_prefixes=ignore_prefixes)
    rb = comparable_metrics(_records(b), ignore_keys=ignore_keys, ignore_prefixes=ignore_prefixes)
    out: list[str] = []
    if len(ra) != len(rb):
        out.append(f"number of records: {len(ra)} != {len(rb)}")
    for i, (x, y) in enumerate(zip(ra, rb, strict=False)):
        where = f"record {i} (step {x.get('step')})"
        for key in sorted(set(x) | set(y)):
            if key not in x or key not in y:
                out.append(f"{where}: {key!r} only in {'first' if key in x else 'second'} run")
            elif not _same(x[key], y[key], rel_tol):
                out.append(f"{where}: {key!r}: {x[key]!r} != {y[key]!r}")
    return out


def _records(x) -> list[Mapping[str, Any]]:
    return read_metrics(x) if isinstance(x, str | os.PathLike) else list(x)


def _same(x: Any, y: Any, rel_tol: float) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    if rel_tol > 0 and _is_number(x) and _is_number(y):
        return math.isclose(x, y, rel_tol=rel_tol, abs_tol=0.0)
    return x == y


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# --------------------------------------------------------------------------- optional sinks


class _TensorBoardSink:
    def __init__(self, run_dir: Path, resume_from_step: int | None, **_: Any):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise SinkUnavailable(_MISSING.format(sink="tensorboard", package="tensorboard")) from exc
        # purge_step: events at steps >= purge_step left by the killed run are discarded.
        purge = None if resume_from_step is None else resume_from_step + 1
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandbSink:
    """One W&B run per run folder; its id is kept in run_dir/wandb_run_id so a resume continues it."""

    def __init__(self, run_dir: Path, resume_from_step: int | None, *, project, run_name, config):
        try:
            import wandb
        except ImportError as exc:
            raise SinkUnavailable(_MISSING.format(sink="wandb", package="wandb")) from exc
        run_id = _persistent_id(run_dir / "wandb_run_id")
        self.run = wandb.init(
            project=project,
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class _MlflowSink:
    """One MLflow run per run folder (experiment = project); its id is kept in run_dir/mlflow_run_id."""

    def __init__(self, run_dir: Path, resume_from_step: int | None, *, project, run_name, config):
        try:
            import mlflow
        except ImportError as exc:
            raise SinkUnavailable(_MISSING.format(sink="mlflow", package="mlflow")) from exc
        self.mlflow = mlflow
        id_file = run_dir / "mlflow_run_id"
        mlflow.set_experiment(project)
        if id_file.is_file():
            self.run = mlflow.start_run(run_id=id_file.read_text().strip())
        else:
            self.run = mlflow.start_run(run_name=run_name)
            id_file.write_text(self.run.info.run_id)
            if config:
                mlflow.log_params(_flatten(config))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.mlflow.log_metrics(dict(metrics), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_SINK_CLASSES = {"tensorboard": _TensorBoardSink, "wandb": _WandbSink, "mlflow": _MlflowSink}


def _persistent_id(path: Path) -> str:
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _run_config(run_dir: Path) -> dict | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------- the logger


class MetricsLogger:
    """Appends one line per `log` call to run_dir/metrics.jsonl and forwards numbers to sinks.

    sinks: any of "jsonl" (always on, whether listed or not), "tensorboard", "wandb", "mlflow";
      the last three need `pip install 'psirl[track]'` and are imported only when asked for.
    resume_from_step: the step of the checkpoint being resumed; records with a larger step are
      dropped first, so the resumed file equals an uninterrupted run's. None: a fresh run (a torn
      final line left by a kill is still removed before appending).
    project / run_name / config: passed to W&B / MLflow (config defaults to run_dir/config.yaml).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        sinks: Sequence[str] = ("jsonl",),
        *,
        resume_from_step: int | None = None,
        project: str = "psirl",
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        unknown = [s for s in sinks if s not in SINKS]
        if unknown:
            raise ValueError(f"track.sinks: unknown sink(s) {unknown}; known sinks: {list(SINKS)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_from_step is not None:
            truncate_metrics(self.run_dir, resume_from_step)
        else:
            _repair_tail(self.path)
        existing = read_metrics(self.run_dir) if self.path.is_file() else []
        self._last_step: int | None = existing[-1]["step"] if existing else None
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._sinks: list[Any] = []
        try:
            for name in dict.fromkeys(sinks):
                if name == "jsonl":
                    continue
                self._sinks.append(
                    _SINK_CLASSES[name](
                        self.run_dir,
                        resume_from_step,
                        project=project,
                        run_name=run_name or self.run_dir.name,
                        config=dict(config) if config is not None else _run_config(self.run_dir),
                    )
                )
        except BaseException:
            self.close()
            raise

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Write {"step": step, "time": time.time(), **metrics} as one fsynced line; return it.

        step: int >= 0, never smaller than the previous call's (equal is allowed, e.g. an eval
        logged separately). Values: int / float / bool / str / None, or anything with `.item()`
        (a 0-d tensor, a NumPy scalar). Keys "step" and "time" are reserved.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if self._last_step is not None and step < self._last_step:
            raise ValueError(f"step {step} is smaller than the last logged step {self._last_step}")
        record: dict[str, Any] = {"step": step, "time": time.time()}
        for key, value in metrics.items():
            if not isinstance(key, str):
                raise TypeError(f"metric names must be strings, got {key!r}")
            if key in RESERVED_KEYS:
                raise ValueError(f"metric name {key!r} is reserved")
            record[key] = _plain_value(key, value)
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._last_step = step
        if self._sinks:
            numbers = {
                k: float(v) for k, v in record.items() if k not in RESERVED_KEYS and _is_number(v)
            }
            for sink in self._sinks:
                sink.log(step, numbers)
        return record

    def close(self) -> None:
        """Close the file and every sink (idempotent)."""
        if not self._fh.closed:
            self._fh.close()
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _plain_value(key: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            value = item()
        except (ValueError, RuntimeError) as exc:
            raise TypeError(
                f"metric {key!r}: expected a scalar, got {type(value).__name__} ({exc})"
            ) from None
        if value is None or isinstance(value, bool | int | float | str):
            return value
    raise TypeError(
        f"metric {key!r}: expected a number, string, bool or None, got {type(value).__name__}"
    )
