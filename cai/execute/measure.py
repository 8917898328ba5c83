"""What a step's manifest measures of it besides its counts: the threads it ran with,
its memory peaks and the versions of the packages that produced it."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path

from cai.training.memory import resident_bytes


class Measurement:
    """A step's measurements, from its start (threads set, memory sampled) to its end."""

    def __init__(self, run):
        from cai.models import set_hub_kernels, set_threads

        self.threads = set_threads(run.threads)
        self.device = run.device
        set_hub_kernels(run.hub_kernels)
        self.constitution_sha256 = file_sha256(run.constitution_path())
        self.memory = StagePeak()
        self.started = time.time()

    def abort(self) -> None:
        self.memory.stop()

    def stop(self, work=None) -> dict:
        """What the manifest records: start, seconds, peaks, threads, versions, processes,
        and the `work` (cai.work.Work) the stage's models did, as a rate and a share of the
        machine's matmul peak."""
        from cai import distributed

        seconds = time.time() - self.started
        record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
                  "seconds": round(seconds, 2), "versions": versions(), "threads": self.threads,
                  "peak_memory": self.memory.stop()}
        if work is not None and work.kinds:
            from cai.models import matmul_peak

            record["work"] = work.record(seconds, *matmul_peak(self.threads, self.device))
        if distributed.distributed():
            record["processes"] = distributed.world_size()
        return record


def summary(record: dict, counts: dict) -> str:
    """A step's last console line: its time in words, its counts, its peak memory
    (`done in 1 min 5 s: 8 prompts, 16 rounds, train loss 6.24; peak memory 0.41 GiB`).
    The manifest keeps every count."""
    peak = record["peak_memory"]
    memory = f"peak memory {peak['rss_bytes'] / 2**30:.2f} GiB" + (
        f", CUDA {peak['cuda_max_allocated_bytes'] / 2**30:.2f} GiB" if "cuda_max_allocated_bytes" in peak else "")
    shown = counts_text(counts)
    return f"done in {duration_text(record['seconds'])}" + (f": {shown}" if shown else "") + f"; {memory}"


def duration_text(seconds: float) -> str:
    """`0.4 s`, `12 s`, `3 min 5 s`, `2 h 14 min`."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def counts_text(counts: dict) -> str:
    """A step's counts in words: each non-zero count (`16 kept rounds`) and each figure
    (`train loss 6.24`); timings, settings and nested records stay in the manifest."""
    parts = []
    for key, value in counts.items():
        if isinstance(value, bool) or "second" in key or key.endswith("_this_session"):
            continue
        words = key.replace("_", " ")
        if isinstance(value, int) and value:
            parts.append(f"{value} {words}")
        elif isinstance(value, float):
            parts.append(f"{words} {value:.3g}")
    return ", ".join(parts)


def utilisation_words(record: dict) -> str:
    """`, 1.2 TFLOP at 41 % of the matmul peak (2 threads), 18 % padding`: the step's
    last line's phrase (empty when no model worked in this process)."""
    work = record.get("work")
    if not work:
        return ""
    flop = work["flop"]
    scale, unit = next(((s, u) for s, u in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")) if flop >= s),
                       (1, "FLOP"))
    words = f", {flop / scale:.3g} {unit}"
    if work.get("share_of_peak") is not None:
        threads = record["threads"]["threads"]
        words += (f" at {100 * work['share_of_peak']:.0f} % of the matmul peak"
                  + ("" if work["peak"].startswith("bf16") else f" ({threads} thread{'s' if threads > 1 else ''})"))
    if work.get("padding_share") is not None:
        words += f", {100 * work['padding_share']:.0f} % padding"
    return words


def file_sha256(path: Path) -> str | None:
    """A file's digest, recorded (the report shows the constitution's), never hashed: the
    fingerprint has the parts of it each stage uses."""
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def versions() -> dict:
    """The versions a manifest records and `cai --version` prints."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for package in ("cai", "torch", "transformers", "trl", "datasets", "accelerate"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[package] = md.version(package)
    return out


def device_text() -> str:
    """The device `device: auto` picks here, in words, for `cai --version`."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"cuda: {torch.cuda.get_device_name(0)}" + (f" (and {count - 1} more)" if count > 1 else "")
    if torch.backends.mps.is_available():
        return "mps"
    return f"cpu, {os.cpu_count()} cores"


def version_text() -> str:
    """`cai --version`: cai's version, the libraries it runs on, and the device."""
    found = versions()
    libraries = ", ".join(f"{name} {found[name]}" for name in ("torch", "transformers", "trl", "accelerate")
                          if name in found)
    return f"cai {found.get('cai', '?')} (python {found['python']}; {libraries})\ndevice: {device_text()}"


class StagePeak:
    """A stage's peak memory, without resetting the process's high-water mark (which
    `/usr/bin/time -v` and `ru_maxrss` report for the whole run, so they stay the run's
    true peak). A thread samples the resident set size every `interval` seconds; when the
    process's peak (VmHWM) rises during the stage, the stage set it and VmHWM is its exact
    peak (`rss_scope: stage`), else the highest sample is (`rss_scope: sampled`: a spike
    shorter than the interval can be missed). Without /proc: the process's peak since it
    started (`rss_scope: process`). On a GPU, torch's CUDA peak, reset per stage."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="cai-stage-peak", daemon=True)
        self.start_hwm = status_kib("VmHWM")
        self.sampled = resident_bytes() or 0
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        if self.start_hwm is not None:
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.sampled = max(self.sampled, resident_bytes() or 0)

    def stop(self) -> dict:
        """What the manifest records of the stage's memory (see the class)."""
        import resource

        import torch

        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        self.sampled = max(self.sampled, resident_bytes() or 0)
        hwm = status_kib("VmHWM")
        if hwm is not None and self.start_hwm is not None:
            peak = ({"rss_bytes": hwm * 1024, "rss_scope": "stage"} if hwm > self.start_hwm
                    else {"rss_bytes": self.sampled, "rss_scope": "sampled"})
        else:
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            peak = {"rss_bytes": kib if platform.system() == "Darwin" else kib * 1024, "rss_scope": "process"}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        return peak


def status_kib(field: str) -> int | None:
    """A /proc/self/status figure in KiB (VmHWM: the process's peak resident set size)."""
    import re

    try:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None
