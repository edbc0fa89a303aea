"""Running psirl's model functions on a model sharded with FSDP2 (train/fsdp.py shards it).

FSDP2 (``torch.distributed.fsdp.fully_shard``) gathers a unit's parameters in a forward
pre-hook and frees them after; the hooks fire when the unit module is *called*. psirl shards
each decoder layer as its own unit and the rest (embeddings, final norm, LM head, a value head)
as the root unit, but ``token_logprobs`` and ``ValueModel.values`` call the decoder and the head
separately, never the root module. So the root's parameters would stay sharded.
``through_fsdp_root`` (a decorator on those functions) fixes that: it runs the function inside the root's registered forward method (``psirl_run``,
``register_fsdp_forward_method``), so the root unit is gathered for the whole call, the layers
gather themselves one at a time, and the root's gradients are reduce-scattered once at the end of
backward (FSDP's final callback), whatever the number of head chunks.

Every rank must make the same sequence of unit calls (each gather is a collective): callers keep
the number of decoder passes per call equal on every rank (``backbone.completion_hidden_states``
picks one-pass layouts for a sharded model).

Generation (``gathered``): decoding calls the model once per token, and ranks finish at different
tokens, so per-layer gathers cannot stay in step. The engine therefore gathers every unit once at
the start of ``generate`` (one collective sequence, the same on every rank), samples with no
communication, and frees the gathered weights at the end. Cost: the unsharded weights live on
each rank for the duration of sampling (the sharded ones remain; the optimiser state stays
sharded). ``full_tensors`` yields one full parameter at a time for an engine that copies weights
(vLLM): peak extra memory one tensor, not the model.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

ROOT_METHOD = "psirl_run"


def is_sharded(model: nn.Module) -> bool:
    """True when `model` (or a submodule) is managed by FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without torch.distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def through_fsdp_root(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for ``fn(model, ...)``: run it inside the FSDP root's forward (``psirl_run``)
    when `model` is a sharded root. After a call without gradients the root's gathered weights
    are freed again (with gradients FSDP frees them after backward)."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = model.__dict__.get(ROOT_METHOD)
        if run is None or model.__dict__.get("_psirl_in_root", False):
            return fn(model, *args, **kwargs)
        with warnings.catch_warnings():
            # FSDP warns when a forward returns a view (an in-place op on it would skip the
            # gather before backward); token_logprobs returns views that callers only read.
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
            out = run(fn, model, *args, **kwargs)
        if not torch.is_grad_enabled() and not model.__dict__.get("_psirl_gathered", False):
            model.reshard()
        return out

    return wrapper


def make_root_callable(root: nn.Module) -> None:
    """Give the FSDP root module `root` the forward method ``psirl_run(fn, *args, **kwargs)``
    (call after ``fully_shard(root)``)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    def psirl_run(fn, *args, **kwargs):
        root.__dict__["_psirl_in_root"] = True
        try:
            return fn(*args, **kwargs)
        finally:
            root.__dict__["_psirl_in_root"] = False

    root.__dict__[ROOT_METHOD] = psirl_run
    register_fsdp_forward_method(root, ROOT_METHOD)


def _units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Every FSDP unit of `model` unsharded for the block (no-op for a plain model, and when
    already inside ``gathered``): the model can then be called any number of times, on any
    submodule, with no collective. Every rank must enter together. Restores resharding after
    forward and frees the gathered weights on exit."""
    units = _units(model)
    if not units or model.__dict__.get("_psirl_gathered", False):
        yield model
        return
    model.__dict__["_psirl_gathered"] = True
    try:
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
        handles = [unit.unshard(async_op=True) for unit in units]
        for handle in handles:
            if handle is not None:
                handle.wait()
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
        model.__dict__["_psirl_gathered"] = False


def full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter and buffer of `model`, one at a time: a sharded
    parameter is all-gathered (``DTensor.full_tensor``, a collective: every rank iterates), a
    plain one is returned as is. For engines that load weights by name (vLLM's load_weights)."""
    from torch.distributed.tensor import DTensor

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = tensor.detach()
        yield name, data.full_tensor() if isinstance(data, DTensor) else data
