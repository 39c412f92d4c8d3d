"""Cache policy names, the options each takes, the syntax of `--cache` specs, and the lengths of an eval-long
run (`check_lengths`), without torch: the CLI checks them here before it imports torch or loads a model. `lm.policies.registry`
builds the policies from these checks (and asserts at import that `OPTIONS` matches the policy classes).
"""
from __future__ import annotations

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


def policy_options(name: str, window: int | None = None, sinks: int | None = None, budget: int | None = None,
                   pool: int | None = None) -> dict[str, int]:
    """The options given (not None) for policy `name`; InvalidInput for an unknown name or an option the
    policy does not take. (Their values are checked by the policy itself.)"""
    if name not in OPTIONS:
        raise InvalidInput(f"unknown policy {name!r}; valid policies: {', '.join(POLICIES)}", "policy")
    given = {k: v for k, v in (("window", window), ("sinks", sinks), ("budget", budget), ("pool", pool))
             if v is not None}
    wrong = [k for k in given if k not in OPTIONS[name]]
    if wrong:
        takes = ", ".join(OPTIONS[name]) or "no options"
        raise InvalidInput(f"policy {name!r} takes no {wrong[0]} (it takes: {takes})", wrong[0])
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
