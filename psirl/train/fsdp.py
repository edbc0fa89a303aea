"""Sharded data parallelism with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

    torchrun --nproc_per_node N -m psirl.cli train cfg.yaml distributed.strategy=fsdp

Chosen by ``distributed.strategy: fsdp`` (default ``ddp``: every rank holds the whole model).
Each rank holds 1/N of every parameter, gradient and AdamW moment; a decoder layer's full
weights exist only while that layer runs (gathered in its forward, and again in backward).

Units: every decoder layer is one FSDP unit; the root unit holds the rest (embeddings, final
norm, LM head, a value head; tied embeddings stay in one unit). The loops call the decoder and
the head separately, so models/sharded.py enters the root's forward around ``token_logprobs``
and ``ValueModel.values`` (``through_fsdp_root``), and ``HFEngine.generate`` gathers every unit
once per call (``models.sharded.gathered``).

Exactness (train/distributed.py): every rank's loss is divided by the GLOBAL step normaliser and
the gradients are SUMMED over ranks, so the update is the single-process full-batch one. FSDP's
reduce-scatter averages by default; ``shard_model`` sets each unit's gradient divide factor to 1
and forces SUM reductions (gloo has no PREMUL_SUM), which makes the reduce-scatter the same sum
the DDP path all-reduces. The gradients are then sharded DTensors: ``all_reduce_gradients``
skips them, and ``clip_and_step`` takes the global norm from the shards (one all-reduce).

Models: the policy and the value model are sharded with their optimiser (built AFTER sharding,
over the sharded parameters). The reference model (no optimiser, no gradients) is sharded the
same way: it costs 1/N of its weights per rank plus one layer gathered at a time during its
forward; with ``fsdp.reference_cpu_offload`` its shards live in host memory (CUDA only).

Options (``distributed.fsdp``): ``cpu_offload`` (CPUOffloadPolicy: parameter, gradient and
optimiser shards in host memory, the AdamW step on the CPU), ``activation_checkpointing`` (each
decoder layer recomputed in backward, transformers' non-reentrant checkpointing),
``mixed_precision`` (MixedPrecisionPolicy: float32 master shards, layers run in bfloat16,
gradients reduced in float32 - the bf16 recipe of the GPU path), ``reshard_after_forward``.

With one process there is nothing to shard: the model stays plain and only the checkpoint
format (torch.distributed.checkpoint, train/dcp.py) follows the strategy, so a run saved with N
ranks resumes with any number of ranks, one included.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from psirl.models.sharded import is_sharded, make_root_callable
from psirl.train.distributed import _COMM, broadcast_parameters, world

__all__ = ["decoder_layers", "full_state_dict", "is_sharded", "shard_model", "shard_models",
           "uses_fsdp"]


def uses_fsdp(config) -> bool:
    """True when the config asks for FSDP (``distributed.strategy: fsdp``)."""
    section = getattr(config, "distributed", None)
    return section is not None and section.strategy == "fsdp"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM, a PEFT-wrapped one or a ValueModel: the children of
    the first ``nn.ModuleList`` whose name ends in "layers" (Qwen2, Llama, Mistral, Gemma ...).
    Raises TypeError naming the class when there is none."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" and len(module):
            return list(module)
    raise TypeError(f"{type(model).__name__}: no decoder `layers` ModuleList to shard per layer")


def _device_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    _, world_size = world()
    device = _COMM["device"]
    return init_device_mesh(device.type, (world_size,))


def _enable_activation_checkpointing(model: nn.Module) -> None:
    from psirl.models.backbone import unwrap_peft

    inner = unwrap_peft(model)
    target = getattr(inner, "backbone", inner)  # ValueModel: its decoder backbone
    enable = getattr(target, "gradient_checkpointing_enable", None)
    if enable is None:
        raise TypeError(f"{type(target).__name__}: has no gradient_checkpointing_enable; "
                        "set distributed.fsdp.activation_checkpointing: false")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard_model(model: nn.Module, options, *, trainable: bool = True,
                cpu_offload: bool | None = None) -> nn.Module:
    """Shard `model` in place with FSDP2, one unit per decoder layer plus the root; return it.

    Call on every rank, after the model is complete (LoRA applied, copies for the reference and
    critic taken) and BEFORE building its optimiser. Rank 0's weights are broadcast first, so
    the shards come from one model. options: the ``distributed.fsdp`` config section.
    trainable: False for the reference (no activation checkpointing, no gradients).
    cpu_offload: overrides ``options.cpu_offload``. One process: returns `model` unchanged.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if world()[1] == 1 or is_sharded(model):
        return model
    broadcast_parameters([model])
    if trainable and options.activation_checkpointing:
        _enable_activation_checkpointing(model)
    kwargs = {"mesh": _device_mesh(), "reshard_after_forward": options.reshard_after_forward}
    if options.mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
    offload = options.cpu_offload if cpu_offload is None else cpu_offload
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    layers = decoder_layers(model)
    for unit in layers:
        fully_shard(unit, **kwargs)
    # A ValueModel's head stays float32 (values regress to returns): under mixed precision it is
    # a unit of its own without the bf16 policy (it is called once per values() call).
    head = getattr(model, "head", None) if hasattr(model, "backbone") else None
    fp32_units = [head] if head is not None and options.mixed_precision else []
    for unit in fp32_units:
        fully_shard(unit, **{k: v for k, v in kwargs.items() if k != "mp_policy"})
    fully_shard(model, **kwargs)
    units = [*layers, *fp32_units, model]
    for unit in units:
        # Sum, not FSDP's mean: the loss already carries the global normaliser.
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    make_root_callable(model)
    # Fix the root now (FSDP otherwise takes the first unit to run forward, and the loops may
    # call a layer or gather for generation before any call through the root).
    model._get_fsdp_state()._lazy_init()
    return model


def shard_models(config, policy: nn.Module, reference: nn.Module | None = None,
                 value: nn.Module | None = None) -> None:
    """The loops' one call: shard the policy, the reference and the value model in place when
    ``distributed.strategy`` is fsdp and several ranks run (else nothing happens). Call it after
    the reference / value copies are taken and before the optimisers are built."""
    if not uses_fsdp(config) or world()[1] == 1:
        return
    options = config.distributed.fsdp
    shard_model(policy, options)
    if value is not None:
        shard_model(value, options)
    if reference is not None:
        shard_model(reference, options, trainable=False,
                    cpu_offload=options.cpu_offload or options.reference_cpu_offload)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict of a sharded `model` on rank 0 (CPU tensors), None elsewhere:
    for final/ (save_pretrained). A collective: every rank calls it. Gathers one tensor at a
    time onto rank 0's host memory (``full_state_dict`` + ``cpu_offload``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
    return state if world()[0] == 0 else None


def sharded_parameters(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The parameters among `params` that FSDP manages (DTensors)."""
    from torch.distributed.tensor import DTensor

    return [p for p in params if isinstance(p, DTensor)]


def check_equal_passes(config, spec) -> None:
    """Refuse an FSDP run in which ranks could run different numbers of forward passes per
    optimiser step (every layer's gather is a collective, so the passes must pair up): the
    micro-batches of a step are ``split_microbatches(rows on this rank, optim.grad_accum)``,
    equal in number on every rank only when every rank holds at least ``grad_accum`` rows. (The
    online loop's update adds weight-0 passes instead, so it needs no such bound.)"""
    _, world_size = world()
    if not uses_fsdp(config) or world_size == 1:
        return
    rows = config.optim.batch_size // world_size
    # The online loop pads: every rank runs exactly grad_accum passes per step (online.update).
    if config.loop != "online" and rows < config.optim.grad_accum:
        raise ValueError(
            f"optim.grad_accum: {config.optim.grad_accum} micro-batches need at least as many rows "
            f"on every rank under distributed.strategy fsdp, which may hold only {rows} "
            f"(optim.batch_size {config.optim.batch_size} over {world_size} ranks)")
    if not is_sharded(spec.models["policy"]):
        raise ValueError(f"distributed.strategy: fsdp, but the {config.loop!r} loop did not shard "
                         "its models (it must call train.fsdp.shard_models); use strategy ddp")


def prepare_shared_files(config, resume: bool, overwrite: bool = False) -> bool:
    """Under FSDP with several ranks: rank 0 creates the run folder and the initial model (the
    files the other ranks read in `build`) and returns True on every rank, so that the ranks
    then build (and shard, a collective) together; else returns False and does nothing."""
    from psirl.train.base import prepare_run_dir

    if not uses_fsdp(config) or world()[1] == 1:
        return False
    if world()[0] == 0:
        run_dir = prepare_run_dir(config, resume, overwrite)
        if config.model.path is None:
            from psirl.train.setup import policy_path

            policy_path(config, run_dir)
    return True
