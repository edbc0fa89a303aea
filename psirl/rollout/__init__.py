"""Generation engines behind one interface (see DESIGN.md, layer ``rollout``).

Public names: ``RolloutBatch``, ``SamplingParams``, ``Engine``, ``HFEngine``.
"""

from .batch import RolloutBatch, SamplingParams
from .engine import Engine
from .hf_engine import HFEngine

__all__ = ["Engine", "HFEngine", "RolloutBatch", "SamplingParams"]
