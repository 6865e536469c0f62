"""The node's GPUs, read through NVML (``nvidia-ml-py``, the optional extra ``gpu``).

Where it sits: an I/O edge beside the Podman edge. ``apply.edges.NodeHost`` calls
``discover_gpus`` once per pass; the facts (``core.gpus.GpuFacts``) feed participation and the
GPU fingerprint of the runtimes with devices. It decides nothing about them.

A node without NVIDIA is normal: a missing library, a driver error, no GPU or a driver that
does not answer each give ``source: none`` with a one-line note, logged once per change, and
never fail the pass. NVML calls can hang on a wedged driver, so they run on a daemon thread
and are given ``timeout_s`` in all; while such a call is still hanging, no other is started
(a thread per pass would pile up), and the node is ``none`` with a note saying so.
No ``pynvml`` exception leaves this module.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from dataclasses import replace
from typing import Any

from reconciler.core.gpus import GpuDevice, GpuFacts, discovered, no_gpus

__all__ = ["DEFAULT_TIMEOUT_S", "discover_gpus", "load_nvml"]

log = logging.getLogger("reconciler")

DEFAULT_TIMEOUT_S = 5.0
_MIB = 1024 * 1024

_lock = threading.Lock()
_hung_since: float | None = None  # monotonic time of the NVML call still not answered
_last_logged: GpuFacts | None = None


def load_nvml() -> Any | None:
    """The ``pynvml`` module, or None when ``nvidia-ml-py`` is not installed."""
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


def _text(value: Any) -> str:
    # Older nvidia-ml-py versions return bytes where newer ones return str.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _read(nvml: Any) -> GpuFacts:
    """Every GPU NVML lists, and the driver version. Raises whatever NVML raises."""
    nvml.nvmlInit()
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        devices = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                GpuDevice(
                    index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_mib=int(memory.total) // _MIB,
                )
            )
        return discovered(devices, driver=driver)
    finally:
        nvml.nvmlShutdown()


def _on_thread(nvml: Any, timeout_s: float) -> GpuFacts:
    global _hung_since
    answer: list[GpuFacts] = []

    def run() -> None:
        global _hung_since
        try:
            answer.append(_read(nvml))
        except Exception as exc:  # every NVML failure means "no GPUs": pynvml.NVMLError,
            # and what a broken driver library raises through ctypes (OSError, AttributeError)
            note = f"NVML: {type(exc).__name__}: {exc}"[:300]
            answer.append(replace(no_gpus(note), failed=True))
        finally:
            with _lock:
                _hung_since = None

    with _lock:
        _hung_since = time.monotonic()
    thread = threading.Thread(target=run, name="nvml-discovery", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if answer:
        return answer[0]
    return replace(no_gpus(f"NVML did not answer within {timeout_s:g} s"), failed=True)


def discover_gpus(nvml: Any | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> GpuFacts:
    """The GPUs NVML sees, within ``timeout_s`` (module docstring); ``nvml`` defaults to
    ``pynvml`` and is injected by tests (any object with its functions and ``NVMLError``)."""
    module = nvml if nvml is not None else load_nvml()
    if module is None:
        facts = no_gpus("NVML library not installed (pip extra reconciler[gpu])")
    else:
        with _lock:
            hung = _hung_since is not None
        if hung:
            note = "NVML is still not answering an earlier call (wedged driver?)"
            facts = replace(no_gpus(note), failed=True)
        else:
            facts = _on_thread(module, timeout_s)
    _log_change(facts)
    return facts


def _log_change(facts: GpuFacts) -> None:
    """One line when what the node sees changes, not one per pass."""
    global _last_logged
    if facts == _last_logged:
        return
    _last_logged = facts
    (log.info if facts.source == "nvml" else log.warning)("gpus: %s", facts.summary())
