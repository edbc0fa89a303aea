"""Generation engines behind one interface (see DESIGN.md, layer ``rollout``).

Public names: ``RolloutBatch``, ``SamplingParams``, ``Engine``, ``HFEngine``, ``build_engine``.
"""

from .batch import RolloutBatch, SamplingParams
from .build import ENGINES, build_engine
from .engine import Engine
from .hf_engine import HFEngine

__all__ = ["ENGINES", "Engine", "HFEngine", "RolloutBatch", "SamplingParams", "build_engine"]
