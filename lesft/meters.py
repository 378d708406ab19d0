"""Measured time and memory per role (never estimated).

Peak memory of a role = bytes of the tensors it holds (weights, adapters, gradients, optimizer state;
each storage counted once) + the largest transient growth measured while it worked:
- CUDA: ``torch.cuda.max_memory_allocated`` during the work minus the allocation before it;
- CPU: the process's resident-set high-water mark (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` before each piece of work) minus the resident set before it.
All roles of a simulation share one process, so the per-role split needs these per-call windows.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from lesft.units import MB  # noqa: F401  (re-exported: lesft.meters.MB)


def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


_process_peak = 0  # bytes: the highest VmHWM seen before RoleMeter reset it


def peak_rss_mb() -> float:
    """Peak resident memory of this whole process so far, in MB (kept across RoleMeter's resets of VmHWM)."""
    return max(_process_peak, _proc_kb("VmHWM") * 1024) / MB


_reset_failed: str | None = None  # why VmHWM could not be reset (then every role's peak includes what came before)


def _reset_cpu_peak() -> bool:
    """Reset the process's VmHWM; the first failure is said once on stderr, and :func:`peak_caveat` says it."""
    global _process_peak, _reset_failed
    _process_peak = max(_process_peak, _proc_kb("VmHWM") * 1024)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError as e:
        if _reset_failed is None:
            _reset_failed = f"/proc/self/clear_refs is not writable here ({e.strerror})"
            print(f"lesft: warning: {_reset_failed}: each role's peak memory includes everything this process "
                  "held before it (model loading too); summary.json says so", file=sys.stderr, flush=True)
        return False


def peak_caveat() -> str | None:
    """None when per-role CPU peaks are measured as documented, else why they are not."""
    return _reset_failed


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def module_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Weights, buffers, gradients and optimizer state held for ``module``."""
    ts = list(module.parameters()) + list(module.buffers()) + [p.grad for p in module.parameters()]
    if optimizer is not None:
        ts += [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(ts)


class RoleMeter:
    """Accumulated seconds and peak transient memory of one role's work (wrap each piece in ``measure``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.peak_transient = 0

    @contextmanager
    def measure(self) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        else:
            _reset_cpu_peak()
            before = _proc_kb("VmRSS") * 1024
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
            else:
                peak = _proc_kb("VmHWM") * 1024
            self.seconds += time.perf_counter() - t0
            self.peak_transient = max(self.peak_transient, peak - before)

    def state(self) -> dict[str, float]:
        return {"seconds": self.seconds, "peak_transient": self.peak_transient}

    def load(self, state: dict[str, float]) -> None:
        self.seconds, self.peak_transient = state["seconds"], int(state["peak_transient"])
