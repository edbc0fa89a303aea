"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP) for ``distributed.strategy: fsdp``.

Layout of checkpoints/step-{step:08d}/ (written atomically: every rank writes its shards into
.tmp-step-{step:08d}/, then rank 0 adds the small files, fsyncs and renames):

    dcp/              DCP files: every model's and optimiser's tensors, each rank writing only
                      the shards it holds (no rank gathers the model); .metadata maps each
                      tensor's global shape to the pieces
    trainer_state.pt  schedulers, RNG states (rank 0's and every rank's), as train/base.py
    state.json        {"step", "loop", "format": "dcp"}

Tensors are keyed by their fully qualified names (``get_model_state_dict`` /
``get_optimizer_state_dict``), which FSDP2 leaves unchanged, so a checkpoint written by N ranks
loads into M ranks (DCP reshards on load) or into one process with a plain model. What differs
between world sizes is the data of each rank, not the checkpoint: see the module docstring of
train/distributed.py for which loops give the same metrics at any world size.

``save_final_policy`` writes final/ as a plain ``save_pretrained`` folder: the full state dict is
gathered one tensor at a time into rank 0's host memory, which writes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from psirl.train.base import (
    CHECKPOINT_DIR,
    LoopSpec,
    _rng_state,
    _set_rng_state,
    commit_checkpoint,
)
from psirl.train.distributed import barrier, world

DCP_DIR = "dcp"


def is_sharded_checkpoint(ckpt: Path) -> bool:
    """True when the checkpoint folder was written by ``save_sharded_checkpoint``."""
    return (Path(ckpt) / DCP_DIR).is_dir()


def _state_dicts(spec: LoopSpec) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    missing = sorted(set(spec.optimizers) - set(spec.models))
    if missing:
        raise ValueError(f"LoopSpec.optimizers: {missing} name no module in LoopSpec.models "
                         "(a sharded checkpoint keys each optimiser by its module)")
    return {
        "models": {name: get_model_state_dict(m) for name, m in spec.models.items()},
        "optimizers": {name: get_optimizer_state_dict(spec.models[name], o)
                       for name, o in spec.optimizers.items()},
    }


def save_sharded_checkpoint(run_dir: Path, step: int, spec: LoopSpec, keep_last: int = 2,
                            rank_rng: list[dict] | None = None) -> Path:
    """Write checkpoints/step-{step:08d}/ with DCP (see the module docstring); every rank calls.

    rank_rng: every rank's RNG state, indexed by rank (gathered by the caller), saved so that
    each rank resumes its own at the same world size. Returns the checkpoint folder.
    """
    import torch.distributed.checkpoint as dcp

    rank, _ = world()
    ckpt_root = Path(run_dir) / CHECKPOINT_DIR
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    dcp.save(_state_dicts(spec), checkpoint_id=str(tmp / DCP_DIR))
    barrier()
    if rank == 0:
        torch.save({"schedulers": {k: s.state_dict() for k, s in spec.schedulers.items()},
                    "rng": _rng_state(),
                    **({"rank_rng": rank_rng} if rank_rng is not None else {})},
                   tmp / "trainer_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "loop": spec.get_state(),
                                                    "format": "dcp"}))
        commit_checkpoint(tmp, final, Path(run_dir), keep_last)
    barrier()
    return final


def load_sharded_checkpoint(ckpt: Path, spec: LoopSpec) -> int:
    """Restore what ``save_sharded_checkpoint`` wrote into `spec`'s modules (sharded or plain, any
    world size), optimisers, schedulers, RNG and loop state; every rank calls. Returns the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    ckpt = Path(ckpt)
    # The target structure (this rank's shards, or whole tensors in one process); a fresh
    # optimiser's state is initialised by get_optimizer_state_dict so DCP can fill it.
    state = _state_dicts(spec)
    dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR))
    for name, module in spec.models.items():
        set_model_state_dict(module, state["models"][name])
    for name, optimizer in spec.optimizers.items():
        set_optimizer_state_dict(spec.models[name], optimizer, state["optimizers"][name])
    trainer_state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    for k, s in spec.schedulers.items():
        s.load_state_dict(trainer_state["schedulers"][k])
    _set_rng_state(trainer_state["rng"])
    rank, world_size = world()
    if len(trainer_state.get("rank_rng", [])) == world_size:  # same world size: this rank's own
        _set_rng_state(trainer_state["rank_rng"][rank])
    meta = json.loads((ckpt / "state.json").read_text())
    spec.set_state(meta.get("loop", {}))
    return int(meta["step"])


def full_policy_state(spec: LoopSpec) -> dict[str, torch.Tensor] | None:
    """The policy's full state dict for final/ when it is FSDP-sharded (rank 0: CPU tensors;
    other ranks: None), else None (save_pretrained reads the module itself). Every rank calls."""
    from psirl.models.sharded import is_sharded
    from psirl.train.fsdp import full_state_dict

    policy = spec.models["policy"]
    return full_state_dict(policy) if is_sharded(policy) else None


def save_final_policy(policy: torch.nn.Module, out_dir: Path,
                      state_dict: dict[str, torch.Tensor] | None) -> None:
    """``policy.save_pretrained(out_dir)``, from `state_dict` when given (a sharded policy's
    gathered weights). The architecture recorded in config.json is the model's own class name,
    not FSDP's generated subclass (FSDPQwen2ForCausalLM), so transformers and vLLM load it."""
    if state_dict is None:
        from psirl.models.loading import _is_peft_model, save_policy

        # LoRA: final/ is the merged model (loads as a plain folder, so stages chain: SFT with
        # LoRA -> DPO / GRPO from final/), and final/adapter/ the adapter alone.
        save_policy(policy, None, out_dir, merge_lora=True)
        if _is_peft_model(policy):
            policy.save_pretrained(Path(out_dir) / "adapter", safe_serialization=True)
        return
    policy.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    for config_file in Path(out_dir).glob("**/config.json"):
        config = json.loads(config_file.read_text())
        names = config.get("architectures") or []
        fixed = [n[len("FSDP"):] if n.startswith("FSDP") else n for n in names]
        if fixed != names:
            config["architectures"] = fixed
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
