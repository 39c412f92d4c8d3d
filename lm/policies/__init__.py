"""Fixed-size KV cache policies: which entries a bounded cache (`lm.cache.BoundedCache`) keeps.

Each policy is a frozen dataclass of options that brings its own cache layer type (`policy.layer_type`), as
transformers' cache layers do: the layer owns its entries and carries the policy out.
- `window`: `full`, `window` and `sinks`, rules on token indices (`WindowLayer`: exact blocks, re-based
  positions);
- `selective`: the stateful, content-dependent policies' base (`SelectiveLayer`: compaction to the budget
  before each block);
- `ranked`: h2o, vatp, knorm, snapkv, adaptive; `merging`: moving-average, cumulative-average, recurrent,
  compressive;
- `registry`: every name registered once (`POLICIES`, `OPTIONS`, `make_policy`, `parse_cache_spec`).
"""
from lm.policies.base import DEFAULT_SINKS, DEFAULT_WINDOW, EvictCallback, Policy, PolicyLayer
from lm.policies.merging import Compressive, CumulativeAverage, Merging, MovingAverage, Recurrent
from lm.policies.ranked import MODES, Adaptive, HeavyHitters, KeyNorm, Ranked, SnapKV, ValueAware
from lm.policies.registry import OPTIONS, POLICIES, SELECTIVE, make_policy, parse_cache_spec
from lm.policies.selective import DEFAULT_BLOCK, DEFAULT_BUDGET, CacheEntries, Selective, SelectiveLayer
from lm.policies.window import Full, Window, WindowLayer, visible

__all__ = [
    "DEFAULT_BLOCK", "DEFAULT_BUDGET", "DEFAULT_SINKS", "DEFAULT_WINDOW", "MODES", "OPTIONS", "POLICIES", "SELECTIVE",
    "Adaptive", "CacheEntries", "Compressive", "CumulativeAverage", "EvictCallback", "Full", "HeavyHitters",
    "KeyNorm", "Merging", "MovingAverage", "Policy", "PolicyLayer", "Ranked", "Recurrent", "Selective",
    "SelectiveLayer", "SnapKV", "ValueAware", "Window", "WindowLayer", "make_policy", "parse_cache_spec", "visible",
]
