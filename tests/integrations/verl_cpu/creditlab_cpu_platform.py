"""A CPU platform for verl 0.9.1 (test shim), loaded with VERL_USE_EXTERNAL_MODULES and selected by VERL_PLATFORM=cpu.

verl registers only NVIDIA/Huawei/AMD platforms and otherwise falls back to CUDA + NCCL. This one runs verl's
workers on the CPU: device "cpu", process groups on plain gloo, a device module whose memory/stream calls are
no-ops or torch.cpu's. Ray still needs a logical GPU for verl's resource pools (`ray_init.num_gpus=1`): the
platform reports Ray's "GPU" resource name but never touches CUDA.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class _CPUDeviceModule(types.ModuleType):
    """`torch.cuda`-shaped module for the CPU: torch.cpu where it has the call, harmless answers elsewhere."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # e.g. __isabstractmethod__, which ABCMeta probes
            raise AttributeError(name)
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        return _noop

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def mem_get_info(*args: Any) -> tuple[int, int]:
        return 64 << 30, 64 << 30

    @staticmethod
    def memory_allocated(*args: Any) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def get_rng_state(*args: Any) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *args: Any) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def get_device_name(*args: Any) -> str:
        return "cpu"


CPU = _CPUDeviceModule("creditlab_cpu_device")


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    device_name = "cpu"
    vendor_name = "cpu"
    device_module = CPU

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return True

    def current_device(self) -> str:
        return "cpu"  # verl moves modules with .to(device=current_device()): an index would mean an accelerator

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"  # verl would build "cpu:gloo,cpu:gloo" from a "cpu:gloo" answer

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"  # the logical GPU given to Ray (ray_init.num_gpus=1) for verl's resource pools

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def _gloo_only(init_process_group: Any) -> Any:
    """verl builds backend strings as "cpu:gloo,<device>:<backend>", which is "cpu:gloo,cpu:gloo" here: torch
    refuses the duplicate device type, so such a string becomes plain "gloo"."""

    def init(*args: Any, backend: Any = None, **kwargs: Any) -> Any:
        if isinstance(backend, str) and set(backend.split(",")) == {"cpu:gloo"}:
            backend = "gloo"
        return init_process_group(*args, backend=backend, **kwargs)

    init.creditlab_gloo_only = True
    return init


if not getattr(torch.distributed.init_process_group, "creditlab_gloo_only", False):
    torch.distributed.init_process_group = _gloo_only(torch.distributed.init_process_group)
