"""One rank of the FSDP tests (tests/train/test_fsdp.py), launched by torchrun with 2 processes.

    python -m torch.distributed.run --nproc_per_node 2 ... fsdp_worker.py ROOT

ROOT holds data.pt (the batch of test_distributed._make_data), tiny/ (a 2-layer tiny model) and
the run configs. Part 1: one AdamW step of policy_loss on this rank's rows, with the model
sharded by train/fsdp.py, for every aggregation mode (one with activation checkpointing, one
with LoRA), a critic gradient, reference log-probs and sampling through the sharded model.
Part 2: `psirl train` runs with distributed.strategy fsdp: SFT (uninterrupted, and 1 step then
resumed at 2 ranks), GRPO (2 steps resumed to 3, 3 uninterrupted, and 3 with strategy ddp). Rank 0 writes
ROOT/fsdp_rank0.pt; the test compares with single-process results computed in its own process.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from dist_worker import policy_knobs

from psirl.core.aggregate import AGGREGATION_MODES
from psirl.core.objective import policy_loss
from psirl.models.loading import load_policy
from psirl.models.logprobs import token_logprobs
from psirl.models.sharded import full_tensors, is_sharded
from psirl.rollout.batch import SamplingParams
from psirl.rollout.hf_engine import HFEngine
from psirl.train import distributed as D
from psirl.train.base import build_optimizer, clip_and_step, split_microbatches
from psirl.train.fsdp import shard_model

OPTIM = SimpleNamespace(lr=1e-2, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.01)
GRAD_CLIP = 0.5  # below the gradients' norm: the clip (a global norm over shards) is exercised
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}


def fsdp_options(**overrides) -> SimpleNamespace:
    options = {"cpu_offload": False, "reference_cpu_offload": False,
               "activation_checkpointing": False, "mixed_precision": False,
               "reshard_after_forward": True}
    return SimpleNamespace(**{**options, **overrides})


def full_parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter's full value (a collective for sharded ones), by name."""
    out = {}
    for name, p in model.named_parameters():
        data = p.detach()
        out[name] = (data.full_tensor() if hasattr(data, "full_tensor") else data).clone()
    return out


def policy_step(data: dict, tiny_dir: str, mode: str, rows: list[int], *, lora: bool = False,
                **options) -> dict:
    """Shard a fresh policy, backpropagate this rank's rows in 2 micro-batches with the global
    normaliser, take one clipped AdamW step; return the full gradients before it, the global
    gradient norm and the full parameters after it."""
    model, _ = load_policy(tiny_dir, device="cpu", dtype="float32")
    if lora:
        from psirl.models.lora import apply_lora

        torch.manual_seed(0)  # LoRA A matrices: rank 0's are broadcast anyway
        model = apply_lora(model, **LORA)
    model.train()
    shard_model(model, fsdp_options(**options))
    assert is_sharded(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, OPTIM)
    knobs = policy_knobs(mode)
    mask, t = data["mask"], data["mask"].shape[1]
    normaliser = D.global_step_normaliser(mask[rows], mode, knobs.constant_normaliser)
    for micro in split_microbatches(len(rows), 2):
        r = rows[micro]
        logp, entropy = token_logprobs(model, data["ids"][r], data["attn"][r], t, with_entropy=True)
        loss, _ = policy_loss(logp, data["old_logp"][r], data["adv"][r], mask[r], knobs,
                              normaliser, ref_logp=data["ref_logp"][r], entropy=entropy)
        loss.backward()
    D.all_reduce_gradients(params)  # a no-op for the shards: FSDP summed them in backward
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    grad_norm = clip_and_step(params, optimizer, None, GRAD_CLIP)
    return {"params": full_parameters(model), "grads": grads, "grad_norm": grad_norm}


def gradient_part(data: dict, tiny_dir: str, rank: int, world_size: int) -> dict:
    out: dict = {}
    rows = list(D.shard_indices(data["ids"].shape[0], rank, world_size))
    mask, t = data["mask"], data["mask"].shape[1]
    for mode in AGGREGATION_MODES:
        out[f"step/{mode}"] = policy_step(data, tiny_dir, mode, rows)
    out["step/ac"] = policy_step(data, tiny_dir, "token_mean", rows, activation_checkpointing=True)
    out["step/lora"] = policy_step(data, tiny_dir, "seq_mean_token_mean", rows, lora=True)
    out["step/bf16"] = policy_step(data, tiny_dir, "token_mean", rows, mixed_precision=True)

    # The critic: sum of squared values over this rank's tokens / the global token count.
    from psirl.models.value import ValueModel

    policy, tokenizer = load_policy(tiny_dir, device="cpu", dtype="float32")
    value = ValueModel.from_policy(policy)
    torch.nn.init.normal_(value.head.weight, std=0.1, generator=torch.Generator().manual_seed(1))
    shard_model(value, fsdp_options())
    n_tokens = D.global_step_normaliser(mask[rows], "token_mean")
    values = value.values(data["ids"][rows], data["attn"][rows], t)
    ((values ** 2) * mask[rows]).sum().div(n_tokens).backward()
    out["value_grads"] = {n: p.grad.full_tensor() for n, p in value.named_parameters()}
    # Under mixed precision the value head stays float32 (its own unit): values of rank 0's rows.
    value_bf16 = ValueModel.from_policy(policy)
    torch.nn.init.normal_(value_bf16.head.weight, std=0.1,
                          generator=torch.Generator().manual_seed(1))
    shard_model(value_bf16, fsdp_options(mixed_precision=True))
    first = list(D.shard_indices(data["ids"].shape[0], 0, world_size))
    with torch.no_grad():
        out["values_bf16"] = value_bf16.values(data["ids"][first], data["attn"][first], t)

    # The reference: sharded, no gradients; log-probs of the whole batch on every rank.
    shard_model(policy, fsdp_options(), trainable=False)
    with torch.no_grad():
        out["ref_logp"] = token_logprobs(policy, data["ids"], data["attn"], t)[0]
    # Weight sync for an engine that copies weights (vLLM): one gathered tensor at a time.
    out["full_tensors"] = {name: tensor.clone() for name, tensor in full_tensors(policy)}
    # Sampling through the sharded model: rank r samples 1 + r prompts, so the ranks decode for
    # different numbers of tokens (the gathered weights make that safe).
    engine = HFEngine(policy, tokenizer)
    prompts = ["1+2=", "3+4=", "5+1="][: 1 + rank]
    batch = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=4, n=2, seed=7))
    out["sampled"] = (prompts, batch.completions, batch.behaviour_logprobs.clone())
    return out


def runs_part(root: Path) -> dict:
    """`psirl train` with distributed.strategy fsdp, through the CLI."""
    import psirl.train.online as online
    from psirl.cli import app

    def train(*args: str) -> None:
        app(["train", *args, "--quiet"], standalone_mode=False)

    # SFT: 2 steps uninterrupted; 1 step, then resumed by 2 ranks (the test resumes a copy with 1).
    train(str(root / "sft.yaml"))
    train(str(root / "sft.yaml"), f"output_dir={root / 'sft_resumed'}", "max_steps=1")
    if D.is_main():
        shutil.copytree(root / "sft_resumed", root / "sft_resumed_1rank")
    D.barrier()
    train("--resume", str(root / "sft_resumed"), "max_steps=2")

    trained = {}
    build = online.build_online

    def build_and_keep(config, run_dir):
        spec = build(config, run_dir)
        trained["policy"] = spec.models["policy"]
        return spec

    def digest() -> str:
        h = hashlib.sha256()
        for _, p in sorted(full_parameters(trained["policy"]).items()):
            h.update(p.contiguous().numpy().tobytes())
        return h.hexdigest()

    online.build_online = build_and_keep
    out = {}
    train(str(root / "dapo.yaml"))
    train(str(root / "grpo.yaml"))
    if D.is_main():  # the test resumes this copy of the 2-rank, 2-step run in one process
        shutil.copytree(root / "grpo", root / "grpo_resumed_1rank")
    D.barrier()
    train("--resume", str(root / "grpo"), "max_steps=3")
    out["digest_resumed"] = digest()
    train(str(root / "grpo.yaml"), f"output_dir={root / 'grpo_uninterrupted'}", "max_steps=3")
    out["digest_uninterrupted"] = digest()
    out["policy_sharded"] = is_sharded(trained["policy"])
    train(str(root / "grpo.yaml"), f"output_dir={root / 'grpo_ddp'}", "max_steps=3",
          "distributed.strategy=ddp")
    return out


def main() -> None:
    root = Path(sys.argv[1])
    torch.set_num_threads(1)
    rank, world_size = D.init_distributed("cpu")
    assert world_size == 2, world_size
    data = torch.load(root / "data.pt", weights_only=True)
    result = gradient_part(data, str(root / "tiny"), rank, world_size)
    result.update(runs_part(root))
    result["sampled_all"] = D.gather_objects(result.pop("sampled"))
    if rank == 0:
        torch.save(result, root / "fsdp_rank0.pt")


if __name__ == "__main__":
    main()
