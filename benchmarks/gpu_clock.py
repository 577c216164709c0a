"""The GPU's SM clock and power draw while a benchmark times something (NVML via ctypes).

A kernel's time scales with the SM clock, and an H100 lowers its clock when it reaches its
power limit, so the same kernel can time several percent apart depending on what ran
before it. The benchmarks sample the clock between timed repetitions and report it next to
each time, so that two numbers are compared knowing the clocks they ran at.

The clock also depends on how hot the GPU already is: right after seconds of work at the
power limit, the same kernel runs several percent slower than after a pause. rest() waits
until the GPU has cooled back to near the coolest temperature this process has seen, so that
every method a benchmark times starts from the same state, whatever ran before it.

NVML ships with the NVIDIA driver (libnvidia-ml.so.1); no Python package is needed. Where
it cannot be loaded, every reading is None.
"""

from __future__ import annotations

import ctypes
import statistics
import time

_NVML_CLOCK_SM = 1
_NVML_TEMPERATURE_GPU = 0


class _Nvml:
    def __init__(self) -> None:
        self.lib = None
        self.handle = ctypes.c_void_p()
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() != 0:
                return
            import torch
            index = torch.cuda.current_device() if torch.cuda.is_available() else 0
            if lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.handle)) != 0:
                return
            self.lib = lib
        except (OSError, AttributeError):
            self.lib = None

    def _uint(self, query: str, *args) -> int | None:
        """The unsigned value an NVML device query writes through its last argument."""
        if self.lib is None:
            return None
        v = ctypes.c_uint()
        if getattr(self.lib, query)(self.handle, *args, ctypes.byref(v)) != 0:
            return None
        return int(v.value)

    def sm_mhz(self) -> int | None:
        return self._uint("nvmlDeviceGetClockInfo", _NVML_CLOCK_SM)

    def celsius(self) -> int | None:
        return self._uint("nvmlDeviceGetTemperature", _NVML_TEMPERATURE_GPU)

    def watts(self) -> float | None:
        mw = self._uint("nvmlDeviceGetPowerUsage")
        return None if mw is None else mw / 1000.0


_nvml: _Nvml | None = None


def _get() -> _Nvml:
    global _nvml
    if _nvml is None:
        _nvml = _Nvml()
    return _nvml


_coolest: int | None = None


def rest(max_s: float = 5.0, margin_c: int = 3) -> int | None:
    """Waits, at most max_s seconds, until the GPU's temperature is within margin_c degrees
    of the coolest reading of this process (the first call's, normally: an idle GPU).
    Returns the temperature it leaves at, or None without NVML. (On an H100, 5 s of idle
    brought a kernel that runs at the power limit back to its speed before 3 s of dense
    attention at 700 W.)"""
    global _coolest
    nv = _get()
    t = nv.celsius()
    if t is None:
        return None
    _coolest = t if _coolest is None else min(_coolest, t)
    deadline = time.monotonic() + max_s
    while t > _coolest + margin_c and time.monotonic() < deadline:
        time.sleep(0.1)
        t = nv.celsius()
        if t is None:
            return None
    return t


class ClockSamples:
    """Readings taken between repetitions; median() of each, or None without NVML."""

    def __init__(self) -> None:
        self.mhz: list[int] = []
        self.watts: list[float] = []

    def sample(self) -> None:
        nv = _get()
        mhz, w = nv.sm_mhz(), nv.watts()
        if mhz is not None:
            self.mhz.append(mhz)
        if w is not None:
            self.watts.append(w)

    def median_mhz(self) -> float | None:
        return statistics.median(self.mhz) if self.mhz else None

    def median_watts(self) -> float | None:
        return statistics.median(self.watts) if self.watts else None
