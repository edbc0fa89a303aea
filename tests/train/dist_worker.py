"""One rank of the data-parallel tests (tests/train/test_distributed.py), launched by torchrun.

    python -m torch.distributed.run --nproc_per_node 2 ... dist_worker.py DATA.pt TINY_DIR CFG.yaml OUT

Part 1 (gradients): on the batch in DATA.pt, this rank backpropagates its shard with the global
normaliser and all-reduces the gradients, for the SFT update and for policy_loss in every
aggregation mode; it also runs the batch-level advantage estimators and reduce_metrics. Part 2
(end to end): `psirl train CFG.yaml` through the CLI, resumed, and run again uninterrupted;
then the SFT loop from sft.yaml and the preference loop from dpo.yaml and kto.yaml beside CFG.yaml.
Each rank writes OUT/rank{r}.pt; the test compares them with single-process results computed in
the test process.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from psirl.algorithms import PolicyLossKnobs
from psirl.core.aggregate import AGGREGATION_MODES
from psirl.core.objective import policy_loss
from psirl.models.loading import load_policy
from psirl.models.logprobs import token_logprobs
from psirl.train import distributed as D
from psirl.train.base import split_microbatches
from psirl.train.sft_update import sft_update

CONSTANT = 7.0  # the constant normaliser C of the "constant" mode


def policy_knobs(mode: str) -> PolicyLossKnobs:
    """Token ratio, symmetric clip, KL (k3) and entropy in the loss: every aggregated term."""
    return PolicyLossKnobs(aggregation=mode, constant_normaliser=CONSTANT if mode == "constant" else None,
                           kl_placement="loss", kl_coef=0.1, entropy_coef=0.01)


class RecordingOptimizer(torch.optim.SGD):
    """Keeps the gradients it is asked to step with, and changes nothing (lr 0)."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads: list[torch.Tensor] | None = None

    def step(self, closure=None):  # noqa: ARG002
        self.grads = [p.grad.clone() for p in self.param_groups[0]["params"]]


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def gradient_part(data: dict, tiny_dir: str, rank: int, world_size: int) -> dict:
    model, tokenizer = load_policy(tiny_dir, device="cpu", dtype="float32")
    model.train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    out: dict = {}

    # SFT: this rank's examples, two micro-batches, the real update with a recording optimiser.
    mine = list(D.shard_indices(len(data["sft_prompts"]), rank, world_size))
    opt = RecordingOptimizer(params)
    metrics = sft_update(model, params, opt, None, [data["sft_prompts"][i] for i in mine],
                         [data["sft_completions"][i] for i in mine], pad_id=tokenizer.pad_token_id,
                         grad_accum=2)
    out["sft"] = dict(zip(names, opt.grads, strict=True))
    out["sft_metrics"] = metrics

    # policy_loss: this rank's rows, global normaliser, micro-batches, summed gradients.
    rows = list(D.shard_indices(data["ids"].shape[0], rank, world_size))
    mask = data["mask"]
    t = mask.shape[1]
    for mode in AGGREGATION_MODES:
        model.zero_grad(set_to_none=True)
        knobs = policy_knobs(mode)
        normaliser = D.global_step_normaliser(mask[rows], mode, knobs.constant_normaliser)
        for micro in split_microbatches(len(rows), 2):
            r = rows[micro]
            logp, entropy = token_logprobs(model, data["ids"][r], data["attn"][r], t, with_entropy=True)
            loss, _ = policy_loss(logp, data["old_logp"][r], data["adv"][r], mask[r], knobs, normaliser,
                                  ref_logp=data["ref_logp"][r], entropy=entropy)
            loss.backward()
        D.all_reduce_gradients(params)
        out[f"policy/{mode}"] = gradients(model)
        out[f"normaliser/{mode}"] = normaliser

    # Batch-level advantage estimators on this rank's rows, with global statistics.
    for name in D.BATCH_ESTIMATORS:
        out[f"adv/{name}"] = D.global_advantages(name, data["token_rewards"][rows], mask[rows],
                                                 torch.tensor(rows), gamma=0.9)

    # A parameter with a gradient on rank 0 only, and one with none anywhere.
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    if rank == 0:
        a.grad = torch.tensor([1.0, 2.0, 3.0])
    D.all_reduce_gradients([a, b])
    out["partial_grad"] = (a.grad.clone(), b.grad)

    # Metrics: rank 0 saw rewards [0, 1], rank 1 saw [1, 1, 1].
    # Equal losses on both ranks still add up; entropy is a token mean (10 and 30 tokens).
    local = ({"reward/mean": 0.5, "reward/std": 0.5**0.5, "loss/total": 1.0, "ratio/max": 1.5,
              "ratio/min": 0.9, "grad_norm": 3.0, "loss/kl": 0.25, "sampling/samples": 2.0,
              "entropy/mean": 1.0, "x/mean": 0.5, "x/std": 0.5} if rank == 0 else
             {"reward/mean": 1.0, "reward/std": 0.0, "loss/total": 2.0, "ratio/max": 1.2,
              "ratio/min": 0.7, "grad_norm": 3.0, "loss/kl": 0.25, "sampling/samples": 3.0,
              "entropy/mean": 2.0, "x/mean": 0.5, "x/std": 0.5})
    out["metrics"] = D.reduce_metrics(local, weight=2.0 if rank == 0 else 3.0,
                                      token_weight=10.0 if rank == 0 else 30.0,
                                      token_means={"entropy/mean"})
    out["gathered"] = D.gather_floats([float(rank), 10.0 + rank])
    return out


def online_part(cfg_path: str, out_dir: Path) -> dict:
    """Through the CLI: `psirl train CFG.yaml` (2 steps), `--resume` it to 3 steps, and a fresh
    uninterrupted 3-step run; returns digests of the trained policies, every rank's included."""
    import psirl.train.online as online
    from psirl.cli import app

    trained = {}
    build = online.build_online

    def build_and_keep(config, run_dir):
        spec = build(config, run_dir)
        trained["policy"] = spec.models["policy"]
        return spec

    def digest() -> str:
        h = hashlib.sha256()
        for _, p in sorted(trained["policy"].state_dict().items()):
            h.update(p.detach().contiguous().numpy().tobytes())
        return h.hexdigest()

    online.build_online = build_and_keep
    out = {}
    app(["train", cfg_path, "--quiet"], standalone_mode=False)
    out["digests_2"] = D.gather_objects(digest())
    app(["train", "--resume", str(out_dir / "run"), "max_steps=3", "--quiet"], standalone_mode=False)
    out["digests_resumed"] = D.gather_objects(digest())
    app(["train", cfg_path, f"output_dir={out_dir / 'run_uninterrupted'}", "max_steps=3", "--quiet"],
        standalone_mode=False)
    out["digests_uninterrupted"] = D.gather_objects(digest())
    # SFT: 2 steps of 6 examples, 3 per rank, a tiny model that rank 0 builds in the run folder.
    app(["train", str(Path(cfg_path).with_name("sft.yaml")), "--quiet"], standalone_mode=False)
    # Offline preference (DPO, then KTO on the same pairs): each step's pairs shared by the ranks.
    for name in ("dpo", "kto"):
        app(["train", str(Path(cfg_path).with_name(f"{name}.yaml")), "--quiet"],
            standalone_mode=False)
    return out


def main() -> None:
    data_path, tiny_dir, cfg_path, out_dir = sys.argv[1:5]
    torch.set_num_threads(1)
    rank, world_size = D.init_distributed("cpu")
    assert world_size == 2, world_size
    data = torch.load(data_path, weights_only=True)
    result = gradient_part(data, tiny_dir, rank, world_size)
    result.update(online_part(cfg_path, Path(out_dir)))
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
