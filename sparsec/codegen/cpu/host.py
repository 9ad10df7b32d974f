"""What the host CPU can do, read once from LLVM (the same view Numba compiles for).

The bitmask kernels have two implementations: a vector one built on AVX-512 expand instructions
(``avx512f`` + ``avx512bw`` + ``avx512vbmi2`` for byte and word expands) and a portable scalar one.
:func:`host_features` decides which one runs; nothing else in the package reads CPU flags.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import llvmlite.binding as llvm


@dataclass(frozen=True)
class HostFeatures:
    """The CPU features the kernels care about (``True`` = usable by compiled code)."""

    name: str
    avx512: bool  # avx512f + avx512bw + avx512vl: 16-lane floats, byte/word masks
    avx512vbmi: bool  # vpermb: byte permutes (int4 nibble unpack)
    avx512vbmi2: bool  # vpexpandb / vpexpandw: expand packed 8/16-bit values by a mask
    avx512vnni: bool
    avx512bf16: bool

    @property
    def vector_bitmask(self) -> bool:
        """True when the AVX-512 bitmask kernels are the fast path on this CPU."""
        return self.avx512 and self.avx512vbmi and self.avx512vbmi2

    @property
    def cores(self) -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def host_features() -> HostFeatures:
    """Features of the CPU this process runs on (cached)."""
    flags = {f[1:]: f[0] == "+" for f in llvm.get_host_cpu_features().flatten().split(",") if f}
    on = lambda *names: all(flags.get(n, False) for n in names)  # noqa: E731
    return HostFeatures(
        name=llvm.get_host_cpu_name(),
        avx512=on("avx512f", "avx512bw", "avx512vl"),
        avx512vbmi=on("avx512vbmi"),
        avx512vbmi2=on("avx512vbmi2"),
        avx512vnni=on("avx512vnni"),
        avx512bf16=on("avx512bf16"),
    )


def last_level_cache_bytes() -> int:
    """Size of the largest cache of cpu0 as the OS reports it (32 MiB when it reports none):
    what timed layers must exceed, rotated, to come from memory as in a decode step."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KMG") or 0) * unit)
    return best or 32 << 20
