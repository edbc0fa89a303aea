"""`psirl compare`: several configs (or presets over one config), same seed, one overlaid report."""

from __future__ import annotations

from pathlib import Path

from psirl.train.config import load_config


def compare_runs(
    configs: list[Path],
    *,
    presets: list[str] | None = None,
    output_dir: Path,
    overrides: list[str] | None = None,
    quiet: bool = False,
) -> Path:
    """Run each config (or each preset over the single config) and write output_dir/compare.html.

    With presets, the config's algorithm.knobs (e.g. sampling sizes) apply on top of each preset.
    Every run gets the same seed (the config's) and its own folder output_dir/<name>; the report
    overlays reward, accuracy, KL, entropy and length curves.
    """
    from psirl.track.report import write_compare_report
    from psirl.train import run_config

    overrides = list(overrides or [])
    output_dir = Path(output_dir)
    jobs: list[tuple[str, Path, list[str]]] = []
    if presets:
        if len(configs) != 1:
            raise ValueError("--presets takes exactly one config to run them over")
        for name in presets:
            jobs.append((name, configs[0], [f"algorithm.preset={name}"]))
    else:
        names = [Path(c).stem for c in configs]
        if len(set(names)) != len(names):
            names = [f"{i}-{n}" for i, n in enumerate(names)]
        jobs = [(n, Path(c), []) for n, c in zip(names, configs, strict=True)]

    run_dirs = []
    for name, path, extra in jobs:
        run_dir = output_dir / name
        cfg = load_config(path, [*extra, *overrides, f"output_dir={run_dir}"])
        run_dirs.append(run_config(cfg, quiet=quiet))
    return write_compare_report(run_dirs, output_dir / "compare.html")
