"""The devices a model command's `--device` (and `MEMSVC_DEVICE`) may name, parsed without torch: a command
refuses a name no torch device has (`tpu`, `cuda:x`, `meta`) before it imports torch. Whether this machine
has that device is `lm.devices.resolve_device`'s question, which needs torch."""
from __future__ import annotations

import re

from memsvc.contract import InvalidInput

DEVICE_TYPES = ("cpu", "cuda", "mps")  # what a model runs on here (torch.device takes more names)
_DEVICE = re.compile(r"(cpu|cuda|mps)(?::(0|[1-9][0-9]*))?")  # as torch.device spells them: no sign, no spaces


def parse_device(name: str) -> tuple[str, int | None]:
    """(type, index) of a device name: "cpu", "cuda", "cuda:N" or "mps" (index None where not given), exactly
    as `torch.device` reads it; InvalidInput (field "device") for anything else."""
    match = _DEVICE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise InvalidInput(f"unknown device {str(name)!r}: give cpu, cuda, cuda:N or mps", "device")
    return match[1], None if match[2] is None else int(match[2])


def check_device(name: str | None) -> None:
    """InvalidInput for a `--device` that names no device (None: the default, always fine); torch-free."""
    if name is not None:
        parse_device(name)
