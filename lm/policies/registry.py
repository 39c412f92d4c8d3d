"""Every cache policy name, registered once: `POLICIES`, the options each takes (`OPTIONS`, kept torch-free in
`lm.cache_specs`), `make_policy` and `parse_cache_spec` (the CLI's `--cache`).
`eval-long --policy` and `bench/bench_policies.py` read this list.
"""
from __future__ import annotations

from dataclasses import fields

from lm.cache_specs import DEFAULTS, OPTIONS, POLICIES, parse_cache_options, policy_values
from lm.policies.base import DEFAULT_SINKS, DEFAULT_WINDOW, Policy
from lm.policies.merging import Compressive, CumulativeAverage, MovingAverage, Recurrent
from lm.policies.ranked import Adaptive, HeavyHitters, KeyNorm, SnapKV, ValueAware
from lm.policies.selective import Selective
from lm.policies.window import Full, Window

__all__ = ["OPTIONS", "POLICIES", "SELECTIVE", "make_policy", "parse_cache_spec"]

SELECTIVE: dict[str, type[Selective]] = {cls.name: cls for cls in (
    MovingAverage, CumulativeAverage, Recurrent, Compressive, HeavyHitters, ValueAware, KeyNorm, SnapKV, Adaptive)}
_CLASSES = {"full": (), "window": ("window",), "sinks": ("window", "sinks"),
            **{name: cls.options for name, cls in SELECTIVE.items()}}
if _CLASSES != OPTIONS:
    raise RuntimeError("lm.cache_specs.OPTIONS must list every policy class and the options it takes")
_DEFAULTS = {"full": {}, "window": {"window": DEFAULT_WINDOW, "sinks": 0},
             "sinks": {"window": DEFAULT_WINDOW, "sinks": DEFAULT_SINKS},
             **{name: {f.name: f.default for f in fields(cls) if f.name in ("budget", "sinks", "window", "pool")}
                for name, cls in SELECTIVE.items()}}
if _DEFAULTS != DEFAULTS:
    raise RuntimeError("lm.cache_specs.DEFAULTS must give every policy class's defaults")


def make_policy(name: str, window: int | None = None, sinks: int | None = None, budget: int | None = None,
                pool: int | None = None) -> Policy:
    """The policy `name` (one of POLICIES) with the options given; an option that does not apply is an error."""
    values = policy_values(name, window, sinks, budget, pool)
    if name == "full":
        return Full()
    if name in ("window", "sinks"):
        return Window(**values)
    return SELECTIVE[name](**values)


def parse_cache_spec(spec: str) -> Policy:
    """A policy from a spec like "window:256,sinks:4", "window:256", "full" or "policy:h2o,budget:260" (`--cache`)."""
    name, options = parse_cache_options(spec)
    return make_policy(name, **options)
