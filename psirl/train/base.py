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

import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterable
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
    return torch.optim.AdamW(
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

    With a fused optimiser (``build_optimizer`` picks one) the clip factor goes to the fused
    kernel as its gradient divisor (the ``grad_scale`` hook ``torch.amp.GradScaler`` uses), so
    the gradients are read once by the update instead of being rescaled in a pass of their own:
    ``g / (1 / c)`` with ``c = min(1, max_norm / (norm + 1e-6))``, the factor
    ``clip_grad_norm_`` multiplies by.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    max_norm = grad_clip if grad_clip is not None and grad_clip > 0 else float("inf")
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    fused = bool(getattr(optimizer, "defaults", {}).get("fused")) and get_total_norm is not None
    if not grads:
        grad_norm = 0.0
    elif fused:
        total = _full(get_total_norm(grads, foreach=True))
        grad_norm = float(total)
        if grad_norm > max_norm:  # c < 1; grad_scale is 1 / c
            optimizer.grad_scale = (total + 1e-6) / max_norm
    else:
        # One pass: clip_grad_norm_ returns the pre-clip total norm (max_norm=inf: measure only).
        grad_norm = float(_full(torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)))
    try:
        optimizer.step()
    finally:
        if hasattr(optimizer, "grad_scale"):
            del optimizer.grad_scale
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _full(norm: torch.Tensor) -> torch.Tensor:
    """A norm over FSDP-sharded gradients is a DTensor (a partial sum over ranks): its value."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def split_microbatches(n: int, n_micro: int) -> list[slice]:
    """Split range(n) into `n_micro` contiguous, nearly equal slices (empty ones dropped)."""
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
    trainer_state.pt (optimisers, schedulers, RNG states), state.json (step, loop state).
    rank_rng: in a data-parallel run, every rank's RNG state (indexed by rank), saved beside
    this process's so that each rank resumes its own.
    """
    from safetensors.torch import save_model

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
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp folders of a killed save are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").exists())


def load_checkpoint(ckpt: Path, spec: LoopSpec) -> int:
    """Restore modules, optimisers, schedulers, RNG and loop state; return the checkpoint's step."""
    from safetensors.torch import load_model

    ckpt = Path(ckpt)
    for name, module in spec.models.items():
        load_model(module, str(ckpt / f"{name}.safetensors"))
    trainer_state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    for k, o in spec.optimizers.items():
        o.load_state_dict(trainer_state["optimizers"][k])
    for k, s in spec.schedulers.items():
        s.load_state_dict(trainer_state["schedulers"][k])
    _set_rng_state(trainer_state["rng"])
    rank, world_size = world()
    if len(trainer_state.get("rank_rng", [])) == world_size:  # same world size: this rank's own
        _set_rng_state(trainer_state["rank_rng"][rank])
    state = json.loads((ckpt / "state.json").read_text())
    spec.set_state(state.get("loop", {}))
    return int(state["step"])


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


def prepare_run_dir(config, resume: bool) -> Path:
    """Create the run folder and write the resolved config (or check it exists on resume)."""
    from psirl.train.config import save_resolved_config

    run_dir = Path(config.output_dir)
    if resume:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"--resume: run folder {run_dir} does not exist")
        # Overrides given with --resume (e.g. a larger max_steps) become the run's config.
        save_resolved_config(config, run_dir)
        return run_dir
    if list_checkpoints(run_dir):
        raise FileExistsError(
            f"output_dir {run_dir} already holds checkpoints; resume it with "
            f"`psirl train --resume {run_dir}` or choose another output_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(config, run_dir)
    return run_dir


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but CUDA is not available")
    return torch.device(name)


def run_loop(
    config,
    build: Callable[[Any, Path], LoopSpec],
    *,
    resume: bool = False,
    summary_keys: tuple[str, ...] = ("loss",),
    quiet: bool = False,
) -> Path:
    """Run a loop to `config.max_steps`: the one driver behind every `psirl train`.

    Checkpoints every `config.checkpoint.every` steps and at the end; evaluates every
    `config.eval.every` steps (and at step 0 and the end); logs metrics each step; writes
    final/ (policy loadable with AutoModelForCausalLM.from_pretrained) and report.html.

    Under torchrun (psirl/train/distributed.py) every rank runs this loop on its shard of each
    step; rank 0 alone writes the run folder, metrics, checkpoints, final/ and the report and
    runs the evaluation; every rank loads the checkpoint on resume.
    """
    from psirl.track.metrics import MetricsLogger, StepProgress, summary_line

    init_distributed(config.device)
    main = is_main()
    # Rank 0 first: it creates the run folder and whatever `build` writes there (the tiny
    # initial model); the other ranks then build from the same files.
    # FSDP: `build` shards the models, a collective, so every rank builds at once after rank 0
    # has written the run folder and the initial model (train/fsdp.py).
    from psirl.train.fsdp import prepare_shared_files

    together = prepare_shared_files(config, resume)
    if not main and not together:
        barrier()
    run_dir = prepare_run_dir(config, resume) if main and not together else Path(config.output_dir)
    if together:
        barrier()
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
        if ckpts:
            load = dcp.load_sharded_checkpoint if dcp.is_sharded_checkpoint(ckpts[-1]) else load_checkpoint
            start = load(ckpts[-1], spec)
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
                metrics = dict(spec.step(step, step_generator(config.seed, step)))
                metrics["time/step_s"] = time.perf_counter() - t0
                metrics.update(lrs)
                done = step + 1
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
        dcp.save_final_policy(spec.models["policy"], final, final_state)
        if spec.tokenizer is not None:
            spec.tokenizer.save_pretrained(final)
        from psirl.track.report import write_report

        write_report(run_dir)
    barrier()
    return run_dir


class _NoLogger:
    """The metrics logger of ranks other than 0: rank 0 alone writes metrics.jsonl."""

    def log(self, step: int, metrics: dict) -> dict:
        return dict(metrics)

    def close(self) -> None:
        pass


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
