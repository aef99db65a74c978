"""Small validators shared by the public entry points (the pipelines, ``samplers.sample``, the loaders, the CLI).

Each checks one kind of argument, once, at the boundary where a person passes it, and says what was wrong and what
to do, so that inner layers can trust their inputs. Wrong values raise ValueError, wrong kinds of object
TypeError, requests that would not fit in memory :class:`InsufficientMemoryError` (a MemoryError), raised before
anything big is allocated.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any

MAX_SEED = 2 ** 64 - 1          # what torch.Generator.manual_seed takes


class InsufficientMemoryError(MemoryError):
    """A request that would need more memory than the machine has; the message gives the estimate and a smaller
    request that fits."""


# ------------------------------------------------------------------------------------------------ numbers
def is_int(value: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(value: Any, name: str, *, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """``value`` as an int in [low, high]; anything else (a float, a bool, a string) is refused by name."""
    ok = is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        kind = "a positive integer" if low == 1 and high is None else f"an integer{_range(low, high)}"
        raise ValueError(f"{name} must be {kind}{hint}, got {value!r}")
    return int(value)


def number(value: Any, name: str, *, low: float | None = None, high: float | None = None, hint: str = "") -> float:
    """``value`` as a finite float in [low, high] (ints welcome, bools, NaN and inf refused)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        kind = "a finite number" if low is None and high is None else f"a number{_range(low, high)}"
        raise ValueError(f"{name} must be {kind}{hint}, got {value!r}")
    return value


def _range(low, high) -> str:
    if low is not None and high is not None:
        return f" from {low:g} to {high:g}"
    if low is not None:
        return f" ≥ {low:g}"
    if high is not None:
        return f" ≤ {high:g}"
    return ""


def seeds(seed: Any, n: int) -> list[int] | None:
    """One seed per image from ``seed``: None (the caller draws fresh ones), an int (image i gets seed + i) or a
    list of n ints. Seeds are what ``torch.Generator.manual_seed`` takes, 0 … 2**64 − 1."""
    if seed is None:
        return None
    hint = "; pass None (on the command line: leave out --seed) for random seeds"
    if is_int(seed):
        first = int(seed)
        if not 0 <= first <= MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to 2**64 − 1{hint}, got {seed!r}")
        if first + n - 1 > MAX_SEED:
            raise ValueError(f"seed={first} with {n} images needs seeds up to {first + n - 1}, past the largest "
                             f"seed 2**64 − 1; use a seed ≤ {MAX_SEED - n + 1}")
        return [first + i for i in range(n)]
    kinds = f"seed must be None, an int, or a list of {n} ints (one per image), each from 0 to 2**64 − 1"
    if isinstance(seed, (str, bytes)) or not hasattr(seed, "__len__"):
        raise ValueError(f"{kinds}; got {seed!r}")
    listed = list(seed)
    if len(listed) != n:
        raise ValueError(f"{kinds}; got a list of {len(listed)}")
    for i, s in enumerate(listed):
        if not is_int(s) or not 0 <= int(s) <= MAX_SEED:
            raise ValueError(f"seed[{i}] must be an integer from 0 to 2**64 − 1, got {s!r}")
    return [int(s) for s in listed]


# ------------------------------------------------------------------------------------------------ text
def text(value: Any, name: str = "prompt") -> str:
    """A prompt: a str that is valid Unicode text (UTF-8 encodable: no lone surrogates)."""
    if not isinstance(value, str):
        if isinstance(value, (bytes, bytearray)):
            raise TypeError(f"{name} must be text (str), got bytes; decode them first: {name}.decode('utf-8')")
        hint = ' (use "" for no prompt)' if value is None else ""
        raise TypeError(f"{name} must be a string{hint}, got {type(value).__name__} {value!r:.60}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text: {value[e.start:e.end]!r} at position {e.start} is a "
                         "lone surrogate (text decoded with errors='surrogateescape'?); fix or remove it") from None
    return value


def texts(value: Any, n: int, name: str = "prompt") -> list[str]:
    """``value`` as n strings: one string for all, or a list of n strings (one per image)."""
    if isinstance(value, str):
        return [text(value, name)] * n
    if not isinstance(value, (list, tuple)):
        if isinstance(value, (bytes, bytearray)) or value is None or not hasattr(value, "__iter__"):
            text(value, name)  # raises the type error
        raise TypeError(f"{name} must be a string or a list of {n} strings (one per image), got a "
                        f"{type(value).__name__}")
    listed = list(value)
    if len(listed) != n:
        raise ValueError(f"{name} must be a string or a list of {n} strings (one per image); got a list of "
                         f"{len(listed)}")
    return [text(p, f"{name}[{i}]") for i, p in enumerate(listed)]


# ------------------------------------------------------------------------------------------------ tensors
def finite(x, name: str, hint: str = "") -> None:
    """Refuse a tensor with NaN or inf values, naming the argument and how many there are."""
    import torch

    if x.is_floating_point() or x.is_complex():
        if x.numel() and bool(torch.isfinite(x.sum())):
            return   # one pass, no mask the size of x (a NaN or inf makes the sum non-finite; overflow only errs safe)
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            nan = int(torch.isnan(x).sum())
            what = ", ".join(part for part in (f"{nan} NaN" if nan else "",
                                               f"{int(bad.sum()) - nan} inf" if int(bad.sum()) > nan else "")
                             if part)
            raise ValueError(f"{name} contains {what} value(s) (of {x.numel()}){hint}")


# ------------------------------------------------------------------------------------------------ devices
DTYPES = {"float32": "float32", "fp32": "float32", "full": "float32", "float": "float32",
          "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64", "double": "float64"}


def dtype(value: Any):
    """A torch floating dtype from a dtype or its usual names ("float16", "fp16", "half", "bf16", ...)."""
    import torch

    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    if isinstance(value, str) and value.lower().removeprefix("torch.") in DTYPES:
        return getattr(torch, DTYPES[value.lower().removeprefix("torch.")])
    raise ValueError(f"dtype must be a floating-point torch dtype (torch.float32, torch.float16, torch.bfloat16) or "
                     f"its name ('float32', 'float16', 'bfloat16'), got {value!r}")


def device(value: Any):
    """A torch.device that exists here: a CUDA device only with a CUDA build and a visible GPU, and so on."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {value!r} is not a torch device: use 'cpu', 'cuda', 'cuda:1', 'mps', ... ({e})") \
            from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES?)")
            raise ValueError(f"device {value!r}: {why}; use device='cpu' (--device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {value!r}: there are {torch.cuda.device_count()} CUDA device(s), numbered "
                             f"from 0")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {value!r}: MPS (Apple GPU) is not available here; use device='cpu'")
    return dev


# ------------------------------------------------------------------------------------------------ memory
def _cgroup_room() -> int | None:
    """Bytes left under a cgroup (v2 or v1) memory limit, or None when there is no limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2 ** 60:
            return max(0, int(limit) - usage)
    return None


def available_memory(device: Any = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device`` (None when unknown): for the CPU the system's available
    memory (psutil, else /proc/meminfo's MemAvailable, else ``SC_AVPHYS_PAGES``), within any cgroup limit; for a
    CUDA device its free memory."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except (RuntimeError, AssertionError):
            return None
    if dev.type != "cpu":
        return None
    free = None
    try:
        import psutil
        free = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            free = int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            try:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                free = None
    room = _cgroup_room()
    if room is not None:
        free = room if free is None else min(free, room)
    return free


def gigabytes(n: float) -> str:
    """Bytes in words: 512 MB, 3.2 GB, 4.1 TB."""
    if n >= 2**40:
        return f"{n / 2**40:,.1f} TB"
    return f"{n / 2**30:.1f} GB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MB"
