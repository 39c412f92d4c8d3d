"""Cache policy names, the options each takes and their defaults, the rules their numbers follow, the syntax
of `--cache` specs, and the lengths of an eval-long run (`check_lengths`), without torch: the CLI checks them
here before it imports torch or loads a model. `lm.policies` builds the policies from these checks (each
policy's constructor runs `check_policy_values`; `lm.policies.registry` asserts at import that `OPTIONS` and
`DEFAULTS` match the policy classes).
"""
from __future__ import annotations

import sys
from typing import Any

from memsvc.contract import InvalidInput

OPTIONS: dict[str, tuple[str, ...]] = {
    "full": (), "window": ("window",), "sinks": ("window", "sinks"),
    "moving-average": ("budget", "sinks", "window", "pool"), "cumulative-average": ("budget", "sinks"),
    "recurrent": ("budget", "sinks"), "compressive": ("budget", "sinks", "window", "pool"),
    "h2o": ("budget", "window"), "vatp": ("budget", "sinks", "window"), "knorm": ("budget", "window"),
    "snapkv": ("budget", "window"), "adaptive": ("budget", "sinks", "window"),
}
POLICIES = tuple(OPTIONS)
SPEC_KEYS = ("policy", "window", "sinks", "budget", "pool")
DEFAULT_WINDOW, DEFAULT_SINKS = 256, 4
DEFAULT_BUDGET = 260  # window 256 + 4 sinks: the budget of the default `sinks` policy
# Every policy's numbers when not given: window/sinks for the rules on token indices, all four for the others.
DEFAULTS: dict[str, dict[str, int]] = {
    "full": {}, "window": {"window": DEFAULT_WINDOW, "sinks": 0},
    "sinks": {"window": DEFAULT_WINDOW, "sinks": DEFAULT_SINKS},
    "moving-average": {"budget": DEFAULT_BUDGET, "sinks": DEFAULT_SINKS, "window": 192, "pool": 16},
    "cumulative-average": {"budget": DEFAULT_BUDGET, "sinks": DEFAULT_SINKS, "window": 0, "pool": sys.maxsize},
    "recurrent": {"budget": DEFAULT_BUDGET, "sinks": DEFAULT_SINKS, "window": 0, "pool": sys.maxsize},
    "compressive": {"budget": DEFAULT_BUDGET, "sinks": DEFAULT_SINKS, "window": 192, "pool": 4},
    "h2o": {"budget": DEFAULT_BUDGET, "sinks": 0, "window": 128, "pool": 0},
    "vatp": {"budget": DEFAULT_BUDGET, "sinks": DEFAULT_SINKS, "window": 128, "pool": 0},
    "knorm": {"budget": DEFAULT_BUDGET, "sinks": 0, "window": 128, "pool": 0},
    "snapkv": {"budget": DEFAULT_BUDGET, "sinks": 0, "window": 32, "pool": 0},
    "adaptive": {"budget": DEFAULT_BUDGET, "sinks": DEFAULT_SINKS, "window": 64, "pool": 0},
}
RANKED = ("h2o", "vatp", "knorm", "snapkv", "adaptive")  # keep sinks + window + the best-scored others
MERGING = ("moving-average", "cumulative-average", "recurrent", "compressive")  # fold older tokens into summaries
ONE_SUMMARY = ("cumulative-average", "recurrent")  # one summary slot; the window is what the budget leaves


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_policy_values(name: str, values: dict[str, Any]) -> None:
    """InvalidInput (naming the option) unless `values`, every number of policy `name` (its `DEFAULTS` keys),
    fit together: for window and sinks a window >= 1 and 0 <= sinks <= window; for the others every number an
    integer >= 0, budget >= sinks + 1, and what each kind needs (ranked: window + sinks below the budget,
    snapkv's observation window >= 1; merging: pool >= 1, a window >= 1 where the policy takes one, and room
    for a summary in the budget). Whether the budget fits the model's trained context is checked once the
    model is known (`PolicyLayer.bounds`)."""
    if name == "full":
        return
    if name in ("window", "sinks"):
        window, sinks = values["window"], values["sinks"]
        if not _integer(window) or window <= 0:
            raise InvalidInput(f"window must be a positive integer, got {window!r}", "window")
        if not _integer(sinks) or sinks < 0:
            raise InvalidInput(f"sinks must be a non-negative integer, got {sinks!r}", "sinks")
        if sinks > window:
            raise InvalidInput(f"sinks ({sinks}) must not exceed the window ({window})", "sinks")
        return
    for option in ("budget", "sinks", "window", "pool"):
        if not _integer(values[option]) or values[option] < 0:
            raise InvalidInput(f"{option} must be a non-negative integer, got {values[option]!r}", option)
    budget, sinks, window, pool = values["budget"], values["sinks"], values["window"], values["pool"]
    if budget < sinks + 1:
        raise InvalidInput(f"budget ({budget}) must be at least sinks + 1 ({sinks + 1})", "budget")
    below_budget = window + sinks < budget
    if name in MERGING:
        if pool < 1:
            raise InvalidInput(f"pool must be a positive integer, got {pool}", "pool")
        if "window" in OPTIONS[name] and window < 1:
            raise InvalidInput(f"window must be a positive integer, got {window}", "window")
        below_budget = below_budget or name in ONE_SUMMARY  # its one slot is always there
    if not below_budget:
        raise InvalidInput(f"window + sinks ({window + sinks}) must be below the budget ({budget})", "window")
    if name == "snapkv" and window < 1:
        raise InvalidInput(f"window (the observation window) must be a positive integer, got {window}", "window")


def policy_values(name: str, window: int | None = None, sinks: int | None = None, budget: int | None = None,
                  pool: int | None = None) -> dict[str, int]:
    """Every number of policy `name`: its `DEFAULTS` with the options given (not None) in their place;
    InvalidInput for an unknown name, an option the policy does not take, or numbers that do not fit
    (`check_policy_values`)."""
    given = policy_options(name, window, sinks, budget, pool)
    return {**DEFAULTS[name], **given}


def policy_options(name: str, window: int | None = None, sinks: int | None = None, budget: int | None = None,
                   pool: int | None = None) -> dict[str, int]:
    """The options given (not None) for policy `name`; InvalidInput for an unknown name, an option the
    policy does not take, or numbers that do not fit with the policy's defaults for the others
    (`check_policy_values`, the rule the policy's constructor applies), so a caller finds out before torch."""
    if name not in OPTIONS:
        raise InvalidInput(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}", "policy")
    given = {k: v for k, v in (("window", window), ("sinks", sinks), ("budget", budget), ("pool", pool))
             if v is not None}
    wrong = [k for k in given if k not in OPTIONS[name]]
    if wrong:
        takes = ", ".join(OPTIONS[name]) or "no options"
        raise InvalidInput(f"policy {name!r} takes no {wrong[0]} (it takes: {takes})", wrong[0])
    check_policy_values(name, {**DEFAULTS[name], **given})
    return given


def parse_cache_options(spec: str) -> tuple[str, dict[str, int]]:
    """(policy name, options) of a spec like "window:256,sinks:4", "window:256", "full" or
    "policy:h2o,budget:260" (`--cache`); InvalidInput naming what is wrong."""
    if spec.strip() == "full":
        return "full", {}
    options: dict[str, Any] = {}
    for item in spec.split(","):
        key, _, value = item.strip().partition(":")
        if key not in SPEC_KEYS or key in options:
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
    return name, policy_options(name, **options)


def check_lengths(max_tokens: int | None, skip: int) -> None:
    """InvalidInput unless an eval-long run can score a token: `max_tokens` (None: whole files) at least 2 and
    above `skip` + 1 (a stream of n tokens scores its n - 1 next-token predictions past the first `skip`),
    `skip` >= 0."""
    if max_tokens is not None and max_tokens < 2:
        raise InvalidInput(f"max_tokens must be at least 2, got {max_tokens}", "max_tokens")
    if skip < 0:
        raise InvalidInput(f"skip must be >= 0, got {skip}", "skip")
    if max_tokens is not None and max_tokens - 1 <= skip:
        raise InvalidInput(f"max_tokens {max_tokens} leaves no token to score past the first {skip} (skip): give "
                           f"max_tokens of at least {skip + 2}, or a smaller skip", "max_tokens")
