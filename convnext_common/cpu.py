"""What this machine's CPU can do, as its operating system reports it (Linux's
/proc/cpuinfo): the one place its instruction-set flags are read."""

from __future__ import annotations

import functools

CPUINFO = "/proc/cpuinfo"

# the flags of native bfloat16 products: x86's AVX512_BF16 dot products and AMX-BF16
# tiles (Linux's names), Arm's BF16 extension ("Features: ... bf16")
BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The instruction-set flags of this machine's first CPU: /proc/cpuinfo's "flags"
    (x86) or "Features" (Arm) line; None where there is no such file or line (not
    Linux), so that callers can tell "unknown" from "absent"."""
    return flags_of_cpuinfo(CPUINFO)


def flags_of_cpuinfo(path) -> frozenset[str] | None:
    """The first "flags" / "Features" line of the cpuinfo file at `path`, as a set; None
    where the file cannot be read or has no such line."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = (s.strip() for s in line.partition(":"))
                if key in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def has_bfloat16_instructions() -> bool | None:
    """True where this CPU multiplies bfloat16 natively (`BFLOAT16_FLAGS`), False where
    its flags are known and name none of them (bfloat16 is then converted to float32
    and back around every operation, in software), None where its flags are unknown."""
    flags = cpu_flags()
    return None if flags is None else bool(flags & BFLOAT16_FLAGS)
