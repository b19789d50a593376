"""What the machine a run lands on can do fast: native bf16 on the CPU, and the host allocator.

The machines that run this project change from run to run (CPUs with and without AVX512-BF16 or
AMX), so the precision chosen by ``--amp auto`` (and the benchmark's fast path) is decided here,
from the CPU's own feature flags, never assumed: on a CPU without native bf16, autocast to bf16
emulates every convolution and measured about 9x slower than fp32 (bench/README.md).
"""
import ctypes
import ctypes.util
import os
import platform
from pathlib import Path

import torch

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_allocator = {"tuned": None}


# oneDNN's instruction-set cap (``ONEDNN_MAX_CPU_ISA``) values under which its kernels use native bf16
_ONEDNN_BF16_ISAS = ("BF16", "AMX", "FP16", "AVX10", "ALL", "DEFAULT")


def onednn_isa_cap():
    """The instruction-set cap set for oneDNN (``ONEDNN_MAX_CPU_ISA`` or ``DNNL_MAX_CPU_ISA``,
    upper case), or None when uncapped."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value else None


def cpu_bf16_flags():
    """The native-bf16 features of this CPU among ``avx512_bf16`` and ``amx_bf16`` (a sorted list;
    empty when the CPU has neither), read through torch's cpuinfo probes (AMX tiles come with
    AMX-BF16 on every CPU that has them). Empty as well when oneDNN, which runs the convolutions,
    is capped below bf16 (e.g. ``ONEDNN_MAX_CPU_ISA=AVX2``: it then emulates bf16 as on an
    AVX2-only CPU, measured 10x slower than fp32)."""
    cap = onednn_isa_cap()
    if cap is not None and not any(isa in cap for isa in _ONEDNN_BF16_ISAS):
        return []
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return sorted(name for name, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)())


def cpu_has_native_bf16():
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), i.e. when autocast to bf16 can
    be faster than fp32 on it."""
    return bool(cpu_bf16_flags())


def auto_amp(device):
    """What ``--amp auto`` means on ``device``: bf16 on CUDA and on CPUs with native bf16, otherwise
    ``off`` (fp32)."""
    if torch.device(device).type == "cuda":
        return "bf16"
    return "bf16" if cpu_has_native_bf16() else "off"


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``, else ``"unknown"``)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_description():
    """A dict naming the CPU a measurement ran on: model, torch's capability (``AVX2``,
    ``AVX512``, ...), its native-bf16 flags, oneDNN's instruction-set cap and the logical core count."""
    return {"cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16": cpu_bf16_flags(), "onednn_isa_cap": onednn_isa_cap(), "cpu_count": os.cpu_count()}


def tune_host_allocator():
    """Keep freed host memory for reuse instead of returning it to the kernel (glibc only).

    By default glibc serves every block above its mmap threshold (at most 32 MB) with a fresh
    ``mmap`` and unmaps it on free, so each activation of a 256^2 U-Net step is page-faulted and
    zeroed by the kernel anew: on the CPU a third of the self-training step was system time.
    ``mallopt(M_MMAP_MAX, 0)`` serves large blocks from the heap and ``M_TRIM_THRESHOLD -1`` never
    gives the heap's top back, so a step reuses the previous step's pages (measured: self-training step at
    256^2, batch 8, 10.0 -> 7.1 s). The peak resident memory stays that of one step. Returns True
    when applied (idempotent), False where the C library is not glibc.
    """
    if _allocator["tuned"] is None:
        _allocator["tuned"] = False
        name = ctypes.util.find_library("c")
        if platform.system() == "Linux" and name and platform.libc_ver()[0] == "glibc":
            libc = ctypes.CDLL(name)
            # -1: never trim (mallopt(3))
            _allocator["tuned"] = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    return _allocator["tuned"]
