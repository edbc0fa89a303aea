"""The machinery every training loop shares, written once.

A loop (sft, online, preference, ...) is a `LoopSpec`: the modules it trains, their optimisers, a
`step(step, generator) -> metrics` function and an optional `evaluate(step) -> metrics`. `run_loop`
owns everything else: the run folder, the resolved config, seeding, the LR schedule, metrics,
progress, periodic evaluation, checkpoints and resume, the final save and the report.

Resume is exact because nothing random depends on hidden iterator state: every step draws its
randomness from `step_generator(seed, step)`, and a checkpoint holds weights, optimiser and
scheduler state, the global RNG states and the loop's own state (e.g. the adaptive KL coefficient).
A run killed at any point restarts from its last checkpoint and replays the same steps bitwise on CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from psirl.train.distributed import (
    any_rank,
    barrier,
    broadcast_parameters,
    gather_objects,
    init_distributed,
    is_main,
    world,
)

CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
CHECKSUMS_FILE = "checksums.json"  # sha256 of every other file of a checkpoint
LOCK_FILE = ".psirl.lock"  # flock'ed by the run that uses the folder
STATUS_FILE = "status.json"  # how the last run in the folder ended: finished | stopped
# exit status of a run stopped by SIGTERM (128 + 15, what a shell reports for a TERM kill)
EXIT_STOPPED = 143

log = logging.getLogger("psirl.train")


class NonFiniteError(RuntimeError):
    """The run produced NaN / inf: too many skipped updates, or weights that must not be saved."""


class RunDirInUse(RuntimeError):
    """Another process holds the run folder's lock."""


class CheckpointDamaged(RuntimeError):
    """A checkpoint whose files are missing, truncated or fail their checksum."""


# --------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (if present) and torch; make torch kernels deterministic where cheap."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional
        pass
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A torch.Generator that depends only on (seed, step, stream).

    Loops draw data order and sampling noise from it, so step k of a resumed run sees exactly the
    randomness of step k of an uninterrupted run without saving any iterator state.
    """
    g = torch.Generator()
    # Large odd multipliers keep (seed, step, stream) triples apart.
    g.manual_seed((seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1))
    return g


# --------------------------------------------------------------------------- optimiser


def build_optimizer(params: Iterable[torch.nn.Parameter], optim) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, with the config's lr / betas / eps / weight decay."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    # The fused kernel updates every tensor in one pass (about 4x faster than the default
    # per-tensor loop on CPU here); same update rule, float rounding aside.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in trainable)
    from psirl.train.precision import adamw  # bf16 weights: float32 master weights and state

    return adamw(
        trainable,
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=fused,
    )


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base LR at optimiser step `step` (0-based).

    Linear warm-up over `warmup_steps`, then constant, linear decay to 0, or cosine decay to 0
    at `total_steps`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule: unknown schedule {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, optim, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(
            s, warmup_steps=optim.warmup_steps, total_steps=total_steps, schedule=optim.schedule
        ),
    )


def clip_and_step(
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    grad_clip: float | None = None,
) -> float:
    """Clip the global grad norm (if asked), step, zero grads; return the pre-clip grad norm.

    The norm is accumulated in float32 whatever the gradients' dtype (a bfloat16 sum of squares
    over millions of entries loses the clip factor's precision), on the gradients' device.
    With a fused optimiser (``build_optimizer`` picks one) the clip factor goes to the fused
    kernel as its gradient divisor (the ``grad_scale`` hook ``torch.amp.GradScaler`` uses), so
    the gradients are read once by the update instead of being rescaled in a pass of their own:
    ``g / (1 / c)`` with ``c = min(1, max_norm / (norm + 1e-6))``, the factor
    ``clip_grad_norm_`` multiplies by. The kernel wants a float32 divisor on the parameters'
    device (a bfloat16 one raised "expected scalar type Float but found BFloat16"); the divisor
    is built with a clamp rather than an ``if norm > max_norm`` so that a fused step is queued
    without waiting for the norm (the one host sync is the returned float).

    A non-finite norm (a NaN / inf loss or gradient) skips the update: weights and optimiser
    state are left as they were (the fused kernel's ``found_inf`` flag, GradScaler's mechanism,
    which also undoes the step count; a non-fused optimiser is not stepped), the LR schedule
    still advances, and the skip is counted for run_loop (``take_skipped_updates``), which logs
    it and stops a run after ``optim.max_nonfinite_steps`` such steps in a row.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    clipping = grad_clip is not None and grad_clip > 0
    fused = bool(getattr(optimizer, "defaults", {}).get("fused"))
    total = _grad_norm_fp32(grads) if grads else None
    if total is not None and clipping:
        if fused:
            # 1 / c = max(1, (norm + 1e-6) / max_norm); exactly 1.0 (g / 1 == g) when not clipping.
            optimizer.grad_scale = ((total + 1e-6) / grad_clip).clamp_min(1.0)
        else:
            _scale_grads_(grads, (grad_clip / (total + 1e-6)).clamp_max(1.0))
    if total is not None and fused:
        _skip_update_if_nonfinite(optimizer, total)
    # Non-fused: the norm is read before the step, which is skipped when it is not finite.
    grad_norm = None if fused or total is None else float(total)
    try:
        if grad_norm is None or math.isfinite(grad_norm):  # fused: the kernel skips (found_inf)
            optimizer.step()
    finally:
        for hook in ("grad_scale", "found_inf"):
            if hasattr(optimizer, hook):
                delattr(optimizer, hook)
    if scheduler is not None:
        _step_scheduler(scheduler)
    optimizer.zero_grad(set_to_none=True)
    if grad_norm is None:
        grad_norm = 0.0 if total is None else float(total)
    if not math.isfinite(grad_norm):
        _NONFINITE["skipped"] += 1
    return grad_norm


def _grad_norm_fp32(grads: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of `grads`, a float32 scalar on the first gradient's device.

    Per (device, dtype) group one ``_foreach_norm`` accumulating in float32; no host sync.
    FSDP-sharded gradients (DTensors) go through torch's own total norm, then `_full`.
    """
    if any(hasattr(g, "full_tensor") for g in grads):
        return _full(torch.nn.utils.get_total_norm(grads, foreach=True)).float()
    device = grads[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    norms = []
    for (dev, _), group in groups.items():
        if dev.type in ("cpu", "cuda"):
            part = torch._foreach_norm(group, 2, dtype=torch.float32)
        else:
            part = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in group]
        norms.extend(n.to(device) for n in part)
    return torch.linalg.vector_norm(torch.stack(norms))


def _scale_grads_(grads: list[torch.Tensor], factor: torch.Tensor) -> None:
    """Multiply every gradient in place by the float32 scalar tensor `factor` (no host sync)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (dev, _), group in groups.items():
        # A float32 factor times bfloat16 gradients: computed in float32, rounded once.
        torch._foreach_mul_(group, factor.to(dev))


# Updates skipped by clip_and_step since run_loop last read the count (one process, one run).
_NONFINITE = {"skipped": 0}


def _skip_update_if_nonfinite(optimizer: torch.optim.Optimizer, total_norm: torch.Tensor) -> None:
    """Tell a fused Adam/AdamW kernel to skip its update when `total_norm` is NaN / inf, without
    a host sync (the flag stays on the device)."""
    optimizer.found_inf = (~torch.isfinite(total_norm)).to(torch.float32)


def _step_scheduler(scheduler) -> None:
    import warnings

    with warnings.catch_warnings():  # after a skipped first update: intended, not a misuse
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()


def take_skipped_updates() -> int:
    """How many updates clip_and_step skipped as non-finite since the last call (and reset)."""
    n, _NONFINITE["skipped"] = _NONFINITE["skipped"], 0
    return n


def _full(norm: torch.Tensor) -> torch.Tensor:
    """A norm over FSDP-sharded gradients is a DTensor (a partial sum over ranks): its value."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def split_microbatches(n: int, n_micro: int) -> list[slice]:
    """Split range(n) into `n_micro` contiguous, nearly equal slices (empty ones dropped).

    More slices than rows (possible only when dynamic sampling kept few rows; the config
    refuses minibatches > rows otherwise) gives one row per slice, logged at INFO.
    """
    if n_micro > n > 0:
        log.info("split_microbatches: %d minibatches asked for %d rows; using %d", n_micro, n, n)
    n_micro = max(1, min(n_micro, n))
    bounds = [round(i * n / n_micro) for i in range(n_micro + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


# --------------------------------------------------------------------------- checkpoints


@dataclass
class LoopSpec:
    """What a loop hands to `run_loop`.

    models:     name -> module, each checkpointed as one safetensors file; "policy" is also
                written to final/ with save_pretrained at the end of the run.
    optimizers: name -> optimiser; schedulers: name -> LR scheduler (same keys or a subset).
    step:       step(step_index, generator) -> metrics (floats). Does its own backward/optimiser step.
    evaluate:   evaluate(step_index) -> metrics, called every `eval.every` steps and at the end.
    state:      loop state that must survive a resume (json-serialisable); read/written by
                get_state / set_state.
    data_parallel: the loop supports torchrun with several processes (its step takes its rank's
                shard, uses the global normaliser and all-reduces gradients); run_loop refuses a
                world size > 1 for loops that do not.
    """

    models: dict[str, torch.nn.Module]
    tokenizer: Any
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    step: Callable[[int, torch.Generator], dict[str, float]]
    evaluate: Callable[[int], dict[str, float]] | None = None
    get_state: Callable[[], dict] = field(default=lambda: {})
    set_state: Callable[[dict], None] = field(default=lambda state: None)
    data_parallel: bool = False  # True: `step` shards its batch and reduces (train/distributed.py)


def _rng_state() -> dict:
    """The global RNG states as tensors and plain Python values (no NumPy objects), so that
    trainer_state.pt loads with ``torch.load(weights_only=True)``: resuming never unpickles code."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"],
                             s["has_gauss"], s["cached"]))


def save_checkpoint(run_dir: Path, step: int, spec: LoopSpec, keep_last: int = 2,
                    rank_rng: list[dict] | None = None) -> Path:
    """Write checkpoints/step-{step:08d}/ atomically (temp folder, fsync, rename); prune old ones.

    Layout: {name}.safetensors for every module (policy, value, ...),
    trainer_state.pt (optimisers, schedulers, RNG states), state.json (step, loop state),
    checksums.json (sha256 of each of those files, written inside the temp folder, so a
    checkpoint either has all its checksums or does not exist).
    rank_rng: in a data-parallel run, every rank's RNG state (indexed by rank), saved beside
    this process's so that each rank resumes its own.
    Refuses (NonFiniteError, nothing written, nothing pruned) when a module holds NaN / inf, so
    retention never replaces a good checkpoint with a poisoned one.
    """
    from safetensors.torch import save_model

    check_finite_modules(spec.models, f"checkpoint step-{step:08d}")
    ckpt_root = Path(run_dir) / CHECKPOINT_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, module in spec.models.items():
        # save_model de-duplicates tied tensors (embeddings / lm_head) and works the same for a
        # plain transformers model, a PEFT-wrapped one or a value head.
        save_model(module, str(tmp / f"{name}.safetensors"))
    torch.save(
        {
            "optimizers": {k: o.state_dict() for k, o in spec.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in spec.schedulers.items()},
            "rng": _rng_state(),
            **({"rank_rng": rank_rng} if rank_rng is not None else {}),
        },
        tmp / "trainer_state.pt",
    )
    (tmp / "state.json").write_text(json.dumps({"step": step, "loop": spec.get_state()}))
    return commit_checkpoint(tmp, final, run_dir, keep_last)


def commit_checkpoint(tmp: Path, final: Path, run_dir: Path, keep_last: int) -> Path:
    """Make a fully written temp checkpoint folder the checkpoint: checksums of its files,
    fsync, rename over `final`, then drop all but the newest `keep_last` checkpoints (only
    complete, finite checkpoints are ever renamed into place, so this keeps the last good one)."""
    write_checksums(tmp)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def first_nonfinite_tensor(models: dict[str, torch.nn.Module]) -> tuple[str, str] | None:
    """(module name, tensor name) of the first weight or buffer holding NaN/inf, else None."""
    for name, module in models.items():
        for key, tensor in module.state_dict().items():
            if (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                    and not bool(torch.isfinite(tensor).all())):
                return name, key
    return None


def check_finite_state(state: dict[str, torch.Tensor], module: str, what: str) -> None:
    """check_finite_modules for a gathered state dict (a sharded policy's full weights)."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"refusing to write {what}: module {module!r} has non-finite "
                                 f"(NaN/inf) values in {key!r}; the earlier checkpoints are kept")


def check_finite_modules(models: dict[str, torch.nn.Module], what: str) -> None:
    """Raise NonFiniteError naming the module and tensor when any weight or buffer is NaN/inf."""
    bad = first_nonfinite_tensor(models)
    if bad is not None:
        raise NonFiniteError(
            f"refusing to write {what}: module {bad[0]!r} has non-finite (NaN/inf) values "
            f"in {bad[1]!r}; the earlier checkpoints are kept"
        )


# --------------------------------------------------------------------------- integrity


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> Path:
    """folder/checksums.json: {file name: sha256} for every other file in the folder."""
    sums = {p.name: _sha256(p) for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name != CHECKSUMS_FILE}
    out = Path(folder) / CHECKSUMS_FILE
    out.write_text(json.dumps(sums, indent=1))
    return out


def verify_checkpoint(ckpt: Path) -> None:
    """Raise CheckpointDamaged naming the first file that is missing or fails its checksum.

    A checkpoint written before checksums existed (no checksums.json) is accepted as is; its
    files are then checked only by loading them (load_checkpoint names the one that fails).
    """
    ckpt = Path(ckpt)
    sums_path = ckpt / CHECKSUMS_FILE
    if not sums_path.exists():
        return
    try:
        sums = json.loads(sums_path.read_text())
        if not isinstance(sums, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError) as exc:
        raise CheckpointDamaged(f"{sums_path}: unreadable ({exc})") from None
    for name, want in sums.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointDamaged(f"{path}: missing")
        if _sha256(path) != want:
            raise CheckpointDamaged(f"{path}: sha256 does not match {CHECKSUMS_FILE} (damaged)")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp folders of a killed save are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").exists())


def load_checkpoint(ckpt: Path, spec: LoopSpec) -> int:
    """Restore modules, optimisers, schedulers, RNG and loop state; return the checkpoint's step.

    Verifies the checksums first; a file that fails to load raises CheckpointDamaged naming it.
    """
    from safetensors.torch import load_model

    ckpt = Path(ckpt)
    verify_checkpoint(ckpt)
    with _names_file(ckpt / "state.json"):
        state = json.loads((ckpt / "state.json").read_text())
        step = int(state["step"])
    for name, module in spec.models.items():
        path = ckpt / f"{name}.safetensors"
        with _names_file(path):
            load_model(module, str(path))
    with _names_file(ckpt / "trainer_state.pt"):
        trainer_state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        for k, o in spec.optimizers.items():
            o.load_state_dict(trainer_state["optimizers"][k])
        for k, s in spec.schedulers.items():
            s.load_state_dict(trainer_state["schedulers"][k])
        _set_rng_state(trainer_state["rng"])
        rank, world_size = world()
        if len(trainer_state.get("rank_rng", [])) == world_size:  # same world size: own state
            _set_rng_state(trainer_state["rank_rng"][rank])
    spec.set_state(state.get("loop", {}))
    return step


@contextlib.contextmanager
def _names_file(path: Path) -> Iterator[None]:
    """Turn any failure to read `path` (truncated, garbage, missing key) into CheckpointDamaged."""
    try:
        yield
    except CheckpointDamaged:
        raise
    except Exception as exc:  # safetensors, torch.load and json raise many types for bad bytes
        raise CheckpointDamaged(f"{path}: cannot be loaded ({type(exc).__name__}: {exc})") from exc


def load_latest_intact_checkpoint(run_dir: Path, spec: LoopSpec) -> int:
    """Load the newest checkpoint that verifies and loads; return its step (0: none exists).

    A damaged checkpoint is reported with a warning naming the damaged file and resume falls
    back to the next newest; once one loads, the damaged ones are moved aside to
    checkpoints/damaged-step-*/ (kept for inspection, out of retention's count). Every
    checkpoint damaged -> CheckpointDamaged listing them all (nothing moved).
    """
    problems, damaged = [], []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            step = load_checkpoint(ckpt, spec)
        except CheckpointDamaged as exc:
            problems.append(str(exc))
            damaged.append(ckpt)
            log.warning("resume: %s; falling back to an older checkpoint", exc)
            continue
        # Only once an intact one loaded: with none, they stay, so the next resume fails again
        # instead of silently starting from step 0.
        for bad in damaged if is_main() else []:
            aside = bad.with_name(f"damaged-{bad.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(bad, aside)
            log.warning("resume: moved the damaged %s to %s", bad.name, aside.name)
        return step
    if problems:
        raise CheckpointDamaged(
            "resume: no intact checkpoint left: " + "; ".join(problems)
            + f"; start again with `psirl train CONFIG --overwrite` (output_dir {run_dir})"
        )
    return 0


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the run


# Files that mark a folder as holding a (possibly unfinished) psirl run.
_RUN_MARKERS = ("config.yaml", "metrics.jsonl", CHECKPOINT_DIR, FINAL_DIR, "init_model", STATUS_FILE)


def prepare_run_dir(config, resume: bool, overwrite: bool = False) -> Path:
    """Create the run folder and write the resolved config (or check it exists on resume).

    A fresh run refuses a folder that already holds a run (a config, metrics, checkpoints, a
    built initial model): with checkpoints it should be resumed; without one (killed before its
    first checkpoint) or with a different config its files would silently mix with the new
    run's (e.g. the old tiny initial model trained under the new config). `overwrite=True`
    clears the folder first (the lock file stays: this process holds it).
    """
    from psirl.train.config import save_resolved_config

    run_dir = Path(config.output_dir)
    if resume:
        if overwrite:
            raise ValueError("--overwrite and --resume contradict each other; choose one")
        if not run_dir.is_dir():
            raise FileNotFoundError(f"--resume: run folder {run_dir} does not exist")
        # Overrides given with --resume (e.g. a larger max_steps) become the run's config.
        save_resolved_config(config, run_dir)
        return run_dir
    if overwrite:
        overwrite_run_dir(run_dir)
    elif any((run_dir / name).exists() for name in _RUN_MARKERS):
        raise FileExistsError(_refusal(config, run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(config, run_dir)
    return run_dir


def _refusal(config, run_dir: Path) -> str:
    """Why a fresh run may not use `run_dir`, and the two ways out."""
    from psirl.train.config import CONFIG_FILE, config_to_dict, read_yaml

    ways = (f"resume it with `psirl train --resume {run_dir}`, start again with --overwrite "
            "(Python: overwrite=True), or choose another output_dir")
    try:
        old = read_yaml(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).exists() else None
    except Exception:  # an unreadable old config counts as a different one
        old = {}
    differs = []
    if old is not None:
        new = config_to_dict(config)
        differs = sorted(k for k in set(old) | set(new)
                         if k != "output_dir" and old.get(k) != new.get(k))
    if differs:
        return (f"output_dir {run_dir} holds a run with a different config (differs in: "
                f"{', '.join(differs)}); start again with --overwrite (Python: overwrite=True) "
                "or choose another output_dir")
    if list_checkpoints(run_dir):
        return f"output_dir {run_dir} already holds checkpoints; {ways}"
    return (f"output_dir {run_dir} holds a run left without a completed checkpoint; {ways}")


def overwrite_run_dir(run_dir: Path) -> bool:
    """Clear `run_dir` when it holds a psirl run (else leave it alone); True if cleared.

    A folder without any run file is never emptied, so a mistyped output_dir with --overwrite
    cannot delete unrelated files."""
    run_dir = Path(run_dir)
    if not any((run_dir / name).exists() for name in _RUN_MARKERS):
        return False
    log.warning("--overwrite: clearing the earlier run in %s", run_dir)
    clear_run_dir(run_dir)
    return True


def clear_run_dir(run_dir: Path) -> None:
    """Delete everything in a run folder except its lock file (held by this process)."""
    for child in Path(run_dir).iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# folder (resolved) -> [open lock file, depth]: the lock is re-entrant within a process, so that
# run_config (which may clear the folder) and run_loop can both hold it.
_HELD_LOCKS: dict[str, list] = {}


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive flock on run_dir/.psirl.lock for the duration (creating the folder).

    A second process asking for the same folder fails at once with RunDirInUse (no waiting):
    two runs writing one folder would interleave metrics and checkpoints. The kernel drops the
    lock when the holder dies, so a killed run never leaves the folder locked. Ranks other than
    0 of a data-parallel run do not lock (rank 0 alone writes the folder).
    """
    import fcntl

    run_dir = Path(run_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        yield run_dir
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        try:
            yield run_dir
        finally:
            _HELD_LOCKS[key][1] -= 1
        return
    fh = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 - closed below, after the run
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip()
        fh.close()
        raise RunDirInUse(
            f"output_dir {run_dir} is in use by another run"
            + (f" ({holder})" if holder else "")
            + "; wait for it to end or choose another output_dir"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}\n")
    fh.flush()
    _HELD_LOCKS[key] = [fh, 1]
    try:
        yield run_dir
    finally:
        _HELD_LOCKS.pop(key, None)
        fh.close()  # releases the flock


def write_run_status(run_dir: Path, state: str, step: int) -> None:
    """run_dir/status.json: {"state": "finished" | "stopped" | "failed", "step": N}, atomically."""
    out = Path(run_dir) / STATUS_FILE
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps({"state": state, "step": step}))
    os.replace(tmp, out)


def read_run_status(run_dir: str | os.PathLike) -> dict | None:
    """How the last run in the folder ended ({"state", "step"}), or None when unknown."""
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but CUDA is not available")
    return torch.device(name)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota
    (containers and CI runners often allow fewer CPUs than the machine has)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def set_cpu_threads(threads: int | None) -> int:
    """Set torch's intra-op CPU threads to `threads`, or (None) to the CPUs the process may use
    (torch's own default counts the machine's cores, more than a container or CI runner may
    get). Not chosen from the current load: the thread count changes float summation order, so a
    load-dependent choice would make a resumed run differ from an uninterrupted one. On a busy
    shared machine set `threads: 1` (benchmarks/threads_under_load.py: 3 GRPO steps took a median
    8.4 s with 1 thread and 30.8 s with 2 at load 6-14 on 2 cores). Returns the number."""
    n = threads or usable_cpus()
    torch.set_num_threads(n)
    return n


def run_loop(
    config,
    build: Callable[[Any, Path], LoopSpec],
    *,
    resume: bool = False,
    summary_keys: tuple[str, ...] = ("loss",),
    quiet: bool = False,
    overwrite: bool = False,
) -> Path:
    """Run a loop to `config.max_steps`: the one driver behind every `psirl train`.

    Checkpoints every `config.checkpoint.every` steps and at the end; evaluates every
    `config.eval.every` steps (and at step 0 and the end); logs metrics each step; writes
    final/ (policy loadable with AutoModelForCausalLM.from_pretrained) and report.html.

    Under torchrun (psirl/train/distributed.py) every rank runs this loop on its shard of each
    step; rank 0 alone writes the run folder, metrics, checkpoints, final/ and the report and
    runs the evaluation; every rank loads the checkpoint on resume.

    Truthfulness: the folder is locked for the whole run (run_dir_lock); a fresh run refuses a
    used folder unless `overwrite` (prepare_run_dir); an update with a non-finite gradient is
    skipped (clip_and_step) and counted as `train/skipped_nonfinite`, and
    `optim.max_nonfinite_steps` such steps in a row stop the run with NonFiniteError; no
    checkpoint or final/ is written from non-finite weights; status.json says whether the run
    finished or was stopped by SIGTERM (after its checkpoint) at which step.
    """
    with run_dir_lock(config.output_dir):
        return _run_locked(config, build, resume=resume, summary_keys=summary_keys, quiet=quiet,
                           overwrite=overwrite)


def _run_locked(config, build, *, resume, summary_keys, quiet, overwrite) -> Path:
    from psirl.track.metrics import MetricsLogger, StepProgress, summary_line

    init_distributed(config.device)
    main = is_main()
    # Rank 0 first: it creates the run folder and whatever `build` writes there (the tiny
    # initial model); the other ranks then build from the same files.
    # FSDP: `build` shards the models, a collective, so every rank builds at once after rank 0
    # has written the run folder and the initial model (train/fsdp.py).
    from psirl.train.fsdp import prepare_shared_files

    together = prepare_shared_files(config, resume, overwrite)
    if not main and not together:
        barrier()
    run_dir = (prepare_run_dir(config, resume, overwrite) if main and not together
               else Path(config.output_dir))
    if together:
        barrier()
    set_cpu_threads(config.threads)
    seed_everything(config.seed)
    spec = build(config, run_dir)
    if main and not together:
        barrier()
    if world()[1] > 1 and not spec.data_parallel:
        raise ValueError(f"loop: {config.loop!r} does not support data-parallel training yet; "
                         "run it as one process")
    broadcast_parameters(spec.models.values())

    from psirl.train import dcp  # sharded checkpoints (distributed.strategy: fsdp)
    from psirl.train.fsdp import check_equal_passes, uses_fsdp

    sharded = uses_fsdp(config)
    check_equal_passes(config, spec)
    start = 0
    if resume:
        ckpts = list_checkpoints(run_dir)
        if ckpts and dcp.is_sharded_checkpoint(ckpts[-1]):
            start = dcp.load_sharded_checkpoint(ckpts[-1], spec)
        else:
            start = load_latest_intact_checkpoint(run_dir, spec)
    # Drop metrics logged after the checkpoint we start from (-1: no checkpoint, drop them all).
    # A fresh start drops them all too: they belong to a run killed before its first checkpoint.
    resume_from = start if start > 0 else -1
    logger = (MetricsLogger(run_dir, sinks=tuple(config.track.sinks), resume_from_step=resume_from)
              if main else _NoLogger())
    # FSDP: every rank runs the (deterministic) evaluation, since generating gathers the sharded
    # weights, a collective; rank 0 alone logs it.
    eval_every = config.eval.every if main or (sharded and world()[1] > 1) else 0

    # SIGTERM -> checkpoint at the next step boundary, so a polite kill loses nothing.
    stop_requested = {"flag": False}

    def _on_term(signum, frame):  # noqa: ARG001
        stop_requested["flag"] = True

    previous = signal.signal(signal.SIGTERM, _on_term) if _in_main_thread() else None
    last_done = start  # the last step completed (and logged) in this process
    max_nonfinite = getattr(config.optim, "max_nonfinite_steps", 3)
    nonfinite_streak = 0  # steps in a row with a skipped (non-finite) update
    take_skipped_updates()  # a count left by an earlier run in this process is not ours
    try:
        if start == 0 and spec.evaluate is not None and eval_every > 0:
            logger.log(0, spec.evaluate(0))
        with StepProgress(config.max_steps, description=f"{config.loop}", initial=start,
                          disable=quiet or not main) as progress:
            for step in range(start, config.max_steps):
                # The LR this step uses (its first update's, when a step takes several): read it
                # before the step, whose scheduler.step() moves it on to the next step's value.
                lrs = {f"lr/{name}": sched.get_last_lr()[0] for name, sched in spec.schedulers.items()}
                t0 = time.perf_counter()
                metrics = _run_step(spec, step, step_generator(config.seed, step))
                metrics["time/step_s"] = time.perf_counter() - t0
                metrics.update(lrs)
                done = step + 1
                skipped = take_skipped_updates()
                metrics["train/skipped_nonfinite"] = float(skipped)
                nonfinite_streak = nonfinite_streak + 1 if skipped else 0
                if nonfinite_streak >= max_nonfinite:
                    logger.log(done, metrics)
                    raise NonFiniteError(_nonfinite_message(run_dir, done, nonfinite_streak))
                if spec.evaluate is not None and eval_every > 0 and (
                    done % eval_every == 0 or done == config.max_steps
                ):
                    metrics.update(spec.evaluate(done))
                logger.log(done, metrics)
                progress.advance(summary_line(done, metrics, summary_keys))
                # A SIGTERM seen by any rank stops every rank at this step boundary (decided
                # once, here: a signal arriving later waits for the next boundary).
                stopping = any_rank(stop_requested["flag"])
                stop_requested["flag"] |= stopping
                every = config.checkpoint.every
                if (every > 0 and done % every == 0) or done == config.max_steps or stopping:
                    if world()[1] > 1:  # every rank raises, instead of rank 0 alone
                        _check_finite_on_every_rank(spec, done)
                    # Data-parallel: every rank's RNG state goes into rank 0's checkpoint.
                    per_rank = {"rank_rng": gather_objects(_rng_state())} if world()[1] > 1 else {}
                    if sharded:  # every rank writes its shards
                        dcp.save_sharded_checkpoint(run_dir, done, spec,
                                                    keep_last=config.checkpoint.keep_last, **per_rank)
                    elif main:
                        save_checkpoint(run_dir, done, spec, keep_last=config.checkpoint.keep_last,
                                        **per_rank)
                    barrier()
                last_done = done
                if stopping:
                    break
    finally:
        logger.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    # Finished = every step done, even if a SIGTERM arrived during the last one.
    # FSDP: the policy's full weights, gathered onto rank 0 (a collective); None otherwise.
    final_state = dcp.full_policy_state(spec) if last_done == config.max_steps else None
    if last_done == config.max_steps and main:
        final = run_dir / FINAL_DIR
        if final_state is None:
            check_finite_modules({"policy": spec.models["policy"]}, str(final))
        else:
            check_finite_state(final_state, "policy", str(final))
        dcp.save_final_policy(spec.models["policy"], final, final_state)
        if spec.tokenizer is not None:
            spec.tokenizer.save_pretrained(final)
        from psirl.track.report import write_report

        write_report(run_dir)
    if main:
        finished = last_done == config.max_steps
        write_run_status(run_dir, "finished" if finished else "stopped", last_done)
    barrier()
    return run_dir


def _check_finite_on_every_rank(spec: LoopSpec, step: int) -> None:
    """Data-parallel: refuse the checkpoint on all ranks together when any holds NaN/inf
    weights (rank 0's own refusal alone would leave the others waiting at the barrier)."""
    bad = first_nonfinite_tensor(spec.models)
    if any_rank(bad is not None):
        where = f"module {bad[0]!r} ({bad[1]!r})" if bad else "another rank's weights"
        raise NonFiniteError(f"refusing to write checkpoint step-{step:08d}: non-finite (NaN/inf) "
                             f"values in {where}; the earlier checkpoints are kept")


def _run_step(spec: LoopSpec, step: int, generator: torch.Generator) -> dict:
    """spec.step, with a failure on NaN/inf weights reported as such: sampling from a NaN policy
    fails deep inside torch (an index or multinomial error) that does not say why."""
    try:
        return dict(spec.step(step, generator))
    except Exception as exc:
        bad = first_nonfinite_tensor(spec.models)
        if bad is None:
            raise
        raise NonFiniteError(
            f"step {step + 1}: failed ({type(exc).__name__}: {exc}) with non-finite (NaN/inf) "
            f"weights in module {bad[0]!r} ({bad[1]!r}); an earlier update made them so: lower "
            "optim.lr, check optim.eps"
        ) from exc


def _nonfinite_message(run_dir: Path, step: int, streak: int) -> str:
    ckpts = list_checkpoints(run_dir)
    last = f"last good checkpoint: {ckpts[-1]}" if ckpts else "no checkpoint was written"
    return (
        f"step {step}: the loss or gradient norm was NaN/inf in {streak} steps in a row "
        f"(steps {step - streak + 1}..{step}); their updates were skipped and the run is stopped "
        f"(optim.max_nonfinite_steps={streak}); {last}. Lower optim.lr, check optim.eps and "
        "the data / rewards of those steps"
    )


class _NoLogger:
    """The metrics logger of ranks other than 0: rank 0 alone writes metrics.jsonl."""

    def log(self, step: int, metrics: dict) -> dict:
        return dict(metrics)

    def close(self) -> None:
        pass


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
