"""What the benchmarks ran on, printed with their tables: ratios of bf16 runs depend on the CPU.

bf16 products run several times faster in AMX tiles (Intel Sapphire Rapids and later) than in AVX-512 bf16 (AMD
Zen 4), which changes the share of everything else in a forward: one Intel machine with AMX here gave a GGUF Q6_K
slowdown of 1.77 at 1,560 tokens, an AMD one without 1.14.
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu() -> str:
    """The CPU's model name, whether it has AMX, and torch's thread count."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown CPU")
    threads = torch.get_num_threads()
    return f"{name}, {'AMX' if 'amx_bf16' in info else 'no AMX'}, {threads} thread{'s' if threads != 1 else ''}"
