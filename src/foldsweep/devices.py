"""Which devices a sweep runs on, decided without importing torch where no GPU can exist.

Importing torch costs seconds; `validate` (and a CPU-only machine's start-up) should not pay them just to
learn that there is no CUDA device. torch can only see a CUDA device through the NVIDIA driver library,
so where that library cannot be loaded the count is 0 without asking torch; where it can, torch counts
(CUDA_VISIBLE_DEVICES, MIG and all), exactly as before.
"""

from __future__ import annotations

import ctypes
import sys

from foldsweep.errors import DeviceError
from foldsweep.spec import SweepSpec

__all__ = ["DRIVER", "cuda_device_count", "refuse_graphs_off_cuda", "resolve_devices"]

DRIVER = {"win32": "nvcuda.dll"}.get(sys.platform, "libcuda.so.1")


def resolve_devices(spec: SweepSpec) -> list[str]:
    """`auto` is every visible CUDA device, else the CPU; a named device must exist here. `cuda_graphs: on`
    with a CPU among them is refused here, before any trial (else every trial would fail with it)."""
    devices = _devices(spec)
    for name in devices:
        refuse_graphs_off_cuda(spec.resources.cuda_graphs, name)
    return devices


def refuse_graphs_off_cuda(mode: str, device: str) -> None:
    """`resources.cuda_graphs: on` where no capture can apply (a CPU) is refused, not ignored."""
    if mode == "on" and not device.startswith("cuda"):
        raise DeviceError(f"`resources.cuda_graphs` is 'on' but training runs on {device}: CUDA graphs need a "
                          "CUDA device; set it to 'auto' or 'off'")


def _devices(spec: SweepSpec) -> list[str]:
    wanted = spec.resources.devices
    if wanted == "cpu":
        return ["cpu"]
    available = cuda_device_count()
    if wanted == "auto":
        return [f"cuda:{i}" for i in range(available)] if available else ["cpu"]
    for name in wanted:
        if name.startswith("cuda:") and int(name[5:]) >= available:
            raise DeviceError(f"resources.devices: `{name}` does not exist; this machine has {available} CUDA "
                              f"device(s){' (cuda:0..cuda:' + str(available - 1) + ')' if available else ''}")
    return list(wanted)


def cuda_device_count() -> int:
    """torch's count of visible CUDA devices; 0 without importing torch when there is no NVIDIA driver."""
    if not _driver_loadable():
        return 0
    import torch

    return int(torch.cuda.device_count())


def _driver_loadable() -> bool:
    if sys.platform == "darwin":  # no CUDA on macOS
        return False
    try:
        ctypes.CDLL(DRIVER)
    except OSError:
        return False
    return True
