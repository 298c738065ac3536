"""Jetson power, clocks and nvpmodel mode sampled from `tegrastats` while a profile runs.

Only on Jetson (where the `tegrastats` binary exists); elsewhere the sampler reports nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field

_POWER = re.compile(r"(VDD_[A-Z0-9_]+|VIN_SYS_5V0|POM_5V_IN)\s+(\d+)mW")
_GPU = re.compile(r"GR3D_FREQ\s+(\d+)%(?:@\[?(\d+)\]?)?")
_EMC = re.compile(r"EMC_FREQ\s+(\d+)%(?:@(\d+))?")
_CPU = re.compile(r"CPU\s+\[([^\]]+)\]")


@dataclass
class Sample:
    power_mw: dict[str, int]
    gpu_util: int | None
    gpu_mhz: int | None
    cpu_mhz: list[int]


def parse_line(line: str) -> Sample:
    power = {name: int(mw) for name, mw in _POWER.findall(line)}
    gpu = _GPU.search(line)
    cpu = _CPU.search(line)
    cpu_mhz = [int(m) for m in re.findall(r"@(\d+)", cpu.group(1))] if cpu else []
    return Sample(power_mw=power, gpu_util=int(gpu.group(1)) if gpu else None,
                  gpu_mhz=int(gpu.group(2)) if gpu and gpu.group(2) else None, cpu_mhz=cpu_mhz)


@dataclass
class Summary:
    samples: int = 0
    mean_power_mw: dict[str, float] = field(default_factory=dict)
    gpu_mhz_min: int | None = None
    gpu_mhz_max: int | None = None
    nvpmodel: str | None = None
    throttled: bool = False


def summarise(samples: list[Sample], nvpmodel: str | None = None) -> Summary:
    out = Summary(samples=len(samples), nvpmodel=nvpmodel)
    if not samples:
        return out
    names = {n for s in samples for n in s.power_mw}
    out.mean_power_mw = {n: sum(s.power_mw.get(n, 0) for s in samples) / len(samples) for n in sorted(names)}
    clocks = [s.gpu_mhz for s in samples if s.gpu_mhz]
    if clocks:
        out.gpu_mhz_min, out.gpu_mhz_max = min(clocks), max(clocks)
        out.throttled = out.gpu_mhz_min < 0.9 * out.gpu_mhz_max  # clocks dropped during the run
    return out


class Sampler:
    """Context manager: runs `tegrastats --interval N` in the background when available."""

    def __init__(self, interval_ms: int = 200):
        self.interval_ms = interval_ms
        self.samples: list[Sample] = []
        self.available = shutil.which("tegrastats") is not None
        self._proc = None
        self._thread = None

    def __enter__(self) -> "Sampler":
        if self.available:
            self._proc = subprocess.Popen(["tegrastats", "--interval", str(self.interval_ms)],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self.samples.append(parse_line(line))

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)

    def summary(self) -> Summary | None:
        if not self.available:
            return None
        mode = None
        if shutil.which("nvpmodel"):
            try:
                mode = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=5).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                mode = None
        return summarise(self.samples, mode)
