"""The machine a run measures: device and CPU names, last-level cache, GPU
datasheet bandwidth, the git state of the logitkit checkout, and the
``environment`` block of the JSON output."""

from __future__ import annotations

import datetime
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

import logitkit

#: Datasheet HBM bandwidth (GB/s) by GPU name; the first entry whose substrings all occur wins.
DATASHEET_PEAK_GBPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 4800.0),
    (("H100", "NVL"), 3900.0),
    (("H100", "PCIE"), 2000.0),
    (("H100",), 3350.0),  # SXM
    (("A100", "80GB"), 2000.0),
    (("A100",), 1555.0),  # 40GB
)


def datasheet_peak_gbps(device_name: str) -> float | None:
    """Datasheet memory bandwidth of a GPU from its name, or None when unknown."""
    upper = device_name.upper()
    for needles, gbps in DATASHEET_PEAK_GBPS:
        if all(n in upper for n in needles):
            return gbps
    return None


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def llc_bytes(device: torch.device) -> int | None:
    """Size of the last-level cache: the GPU's L2, or the CPU's largest cache level from sysfs."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or None
    best = None
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.fullmatch(r"(\d+)([KMG]?)", path.read_text().strip())
        if m:
            size = int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
            best = max(best or 0, size)
    return best


def git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout holding logitkit's sources, or ``(None, None)``.

    Only counts when the package's own ``__init__.py`` is tracked there, so that an installed
    copy inside some unrelated repository does not report that repository's commit.
    """
    pkg_dir = Path(logitkit.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=pkg_dir, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def collect_environment(
    device: torch.device, copy_gbps: float, copy_bytes: int, rotate_bytes: int, llc: int | None, memory_method: str
) -> dict[str, Any]:
    """The ``environment`` block of the JSON output."""
    commit, dirty = git_state()
    name = device_name(device)
    return {
        "device": device.type,
        "device_name": name,
        "cpu_model": cpu_model(),
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "logitkit_version": logitkit.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "build_info": logitkit.build_info(),
        # linear_ce's GEMM route per input dtype on this device (logitkit.gemm_path)
        "gemm_paths": {
            name: logitkit.gemm_path(dtype, device).path
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))
        },
        "copy_bandwidth_gbps": copy_gbps,
        "copy_buffer_bytes": copy_bytes,
        "datasheet_peak_gbps": datasheet_peak_gbps(name) if device.type == "cuda" else None,
        "llc_bytes": llc,
        "rotation_target_bytes": rotate_bytes,
        "memory_method": memory_method,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
