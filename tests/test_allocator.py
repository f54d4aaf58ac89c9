"""`reuse_freed_memory`: large tensors come from the heap (whose freed memory the next step reuses), not from
mappings of their own that are handed back to the kernel when freed. Its speed: `benchmarks/neuroar_step.py`."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

MIB = 2**20
# In a fresh process: glibc's count of bytes in mappings of their own while a 64 MiB tensor lives.
PROBE = """
import ctypes, sys, torch
from neuroar.allocator import reuse_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
took = reuse_freed_memory() if sys.argv[1] == "reuse" else None
x = torch.ones(64 * 2**20, dtype=torch.uint8)
print(took, libc.mallinfo2().hblkhd)
"""


def _probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    took, mapped = out.split()
    return took, int(mapped)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_large_tensors_come_from_the_heap():
    took, mapped = _probe("reuse")
    assert took == "True"
    assert mapped < 64 * MIB, "a 64 MiB tensor was given a mapping of its own"
    _, mapped_by_default = _probe("default")
    assert mapped_by_default >= 64 * MIB  # the probe sees glibc's own mapping where the setting is off
