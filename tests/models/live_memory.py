"""Peak bytes of live tensor storage while a function runs (a deterministic CPU memory measure).

A ``TorchDispatchMode`` sees every tensor produced by an ATen op (forward and backward); each new
storage is counted from its creation until its weak reference dies. Unlike process RSS this is
not blurred by the malloc cache, thread pools or lazy library initialisation, so two code paths
can be compared exactly. Kernel-internal scratch buffers (not tensors) are not counted.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as m: fn()`` then ``m.peak`` = max bytes of storages alive at once
    among those created inside the block (tensors that existed before are not counted)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self._refs.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._refs and self._refs[key]() is storage:
                continue
            nbytes = storage.nbytes()
            self._refs[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._release(k, n))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out
