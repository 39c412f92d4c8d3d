"""Every cache policy name, registered once: `POLICIES`, the options each takes (`OPTIONS`), `make_policy`
and `parse_cache_spec` (the CLI's `--cache`). `eval-long --policy` and `bench/bench_policies.py` read this list.
"""
from __future__ import annotations

from typing import Any

from lm.policies.base import DEFAULT_SINKS, DEFAULT_WINDOW, Policy
from lm.policies.merging import Compressive, CumulativeAverage, MovingAverage, Recurrent
from lm.policies.ranked import Adaptive, HeavyHitters, KeyNorm, SnapKV, ValueAware
from lm.policies.selective import Selective
from lm.policies.window import Full, Window
from memsvc.contract import InvalidInput

SELECTIVE: dict[str, type[Selective]] = {cls.name: cls for cls in (
    MovingAverage, CumulativeAverage, Recurrent, Compressive, HeavyHitters, ValueAware, KeyNorm, SnapKV, Adaptive)}
OPTIONS: dict[str, tuple[str, ...]] = {"full": (), "window": ("window",), "sinks": ("window", "sinks"),
                                       **{name: cls.options for name, cls in SELECTIVE.items()}}
POLICIES = tuple(OPTIONS)


def make_policy(name: str, window: int | None = None, sinks: int | None = None, budget: int | None = None,
                pool: int | None = None) -> Policy:
    """The policy `name` (one of POLICIES) with the options given; an option that does not apply is an error."""
    if name not in OPTIONS:
        raise InvalidInput(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}", "policy")
    given = {k: v for k, v in (("window", window), ("sinks", sinks), ("budget", budget), ("pool", pool))
             if v is not None}
    wrong = [k for k in given if k not in OPTIONS[name]]
    if wrong:
        takes = ", ".join(OPTIONS[name]) or "no options"
        raise InvalidInput(f"policy {name!r} takes no {wrong[0]} (it takes: {takes})", wrong[0])
    if name == "full":
        return Full()
    if name in ("window", "sinks"):
        return Window(given.get("window", DEFAULT_WINDOW), given.get("sinks", DEFAULT_SINKS if name == "sinks" else 0))
    return SELECTIVE[name](**given)


def parse_cache_spec(spec: str) -> Policy:
    """A policy from a spec like "window:256,sinks:4", "window:256", "full" or "policy:h2o,budget:260" (`--cache`)."""
    if spec.strip() == "full":
        return Full()
    options: dict[str, Any] = {}
    for item in spec.split(","):
        key, _, value = item.strip().partition(":")
        if key not in ("policy", "window", "sinks", "budget", "pool") or key in options:
            raise InvalidInput(f"bad cache spec {spec!r}: expected 'window:W[,sinks:S]', 'full' or "
                               f"'policy:NAME[,budget:B,window:W,sinks:S,pool:P]'", "cache")
        try:
            options[key] = value if key == "policy" else int(value)
        except ValueError:
            raise InvalidInput(f"bad cache spec {spec!r}: {key} must be an integer", "cache") from None
    if "policy" not in options and "window" not in options:
        raise InvalidInput(f"bad cache spec {spec!r}: the window is required", "cache")
    name = options.pop("policy", "sinks" if options.get("sinks") else "window")
    if name == "window" and options.get("sinks") == 0:
        del options["sinks"]
    return make_policy(name, **options)


