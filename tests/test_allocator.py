"""The CLI's allocator setting: freed buffers are reused without page faults, and the user's own choice wins."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from pathotune.core import allocator

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Allocate, touch and free a 64 MiB block twenty times; print the minor page faults of the last five rounds. With
# freed memory kept, the heap still grows onto fresh pages for the first seven to nine rounds (glibc 2.36) before a
# freed block is large enough to take the next one; from then on no round faults.
FAULTS = """
import resource, sys
import torch
from pathotune.core.allocator import retain_freed_memory
print(retain_freed_memory() if sys.argv[1] == "retain" else False)
for i in range(20):
    if i == 15:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(16 << 20)
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != allocator.OPT_OUT}
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@glibc_only
def test_retained_memory_is_reused_without_page_faults():
    retained, with_retain = _faults("retain")
    _, without = _faults("system")
    assert retained == "True"
    assert without > 5 * 16_000  # 64 MiB through mmap: every 4 KiB page faulted in again, every round
    assert with_retain < 2.5 * 16_384


@pytest.mark.parametrize(
    "env",
    [{allocator.OPT_OUT: "system"}, {"MALLOC_MMAP_THRESHOLD_": "131072"}, {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}],
)
def test_the_users_allocator_choice_wins(monkeypatch, env):
    monkeypatch.setattr(allocator, "_state", {})
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert allocator.retain_freed_memory() is False
    assert allocator.allocator_note() == ("jemalloc" if "LD_PRELOAD" in env else platform.libc_ver()[0] or "system")
