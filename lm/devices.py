"""Where the model side runs: the device and dtype a model is loaded with (`lm.model.load_model`) and that
every model command's `--device` names. Imports torch only, so a command checks that this machine has its
`--device` before it loads transformers or a model (the name itself: torch-free, `memsvc.contract.parse_device`)."""
from __future__ import annotations

import torch

from memsvc.contract import DEVICE_TYPES, InvalidInput, parse_device


def default_device() -> str:
    """"cuda" when torch sees a GPU, else "cpu": the `--device` default of every model command."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None = None,
                   dtype: str | torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) a model runs with: `device` None is `default_device()`; `dtype` None is float32 on the
    CPU, bfloat16 on CUDA and float16 on mps (half the weights' bytes; the GPU's tensor cores). Accepts dtype
    names ("float32", "bf16", "fp16", ...). InvalidInput for an unknown device or dtype, or a CUDA device on a
    machine without one, before any model is read."""
    asked = default_device() if device is None else device
    if isinstance(asked, torch.device):
        device = asked
        if device.type not in DEVICE_TYPES:
            raise InvalidInput(f"unknown device {str(asked)!r}: give cpu, cuda, cuda:N or mps", "device")
    else:
        device = torch.device(*parse_device(asked))  # the torch-free rule the CLI applied before torch
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInput("device 'mps' asked for, but torch sees no Apple GPU here", "device")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"device {str(device)!r} asked for, but torch sees no CUDA GPU here", "device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidInput(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s)",
                           "device")
    if dtype is None:
        dtype = {"cpu": torch.float32, "cuda": torch.bfloat16, "mps": torch.float16}[device.type]
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InvalidInput(f"unknown dtype {dtype!r}: give one of {', '.join(DTYPES)}", "dtype")
        dtype = DTYPES[dtype]
    return device, dtype


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
