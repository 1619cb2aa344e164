"""Timing and machine description shared by the `ddetr bench` commands (and the kernel build's
CPU fingerprint). torch is imported inside the functions: `ddetr --help` stays fast."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op off CUDA): a clock read after it is honest."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, warmup: int, repeats: int) -> float:
    """Median milliseconds of `repeats` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile `q` (0..100) of an ascending list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_summary(latencies: list[float], batch_size: int) -> dict:
    """Call latencies (ms) of `batch_size` images each -> images/s and mean/p50/p90/p99/min/max ms."""
    ordered = sorted(latencies)
    mean = statistics.fmean(latencies)
    return {
        "images_per_s": batch_size * 1000 / mean,
        "latency_ms": {
            "mean": mean,
            **{f"p{q}": percentile(ordered, q) for q in (50, 90, 99)},
            "min": ordered[0],
            "max": ordered[-1],
        },
    }


def cpuinfo(field: str) -> str | None:
    """The first `field` ("model name", "flags", ...) of /proc/cpuinfo, or None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def device_name(device) -> str:
    """What a report calls `device`: the GPU's name, else the CPU model."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpuinfo("model name") or platform.processor() or platform.machine() or "cpu"
