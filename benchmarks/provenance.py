"""The stamp every benchmark result carries: the command, the versions and the machine that produced it."""

import importlib
import platform
import subprocess
import sys
import time


def provenance(packages=("ray", "torch")) -> list[str]:
    """Markdown lines (ending with a blank one) naming the command, package versions and machine."""
    import torch

    versions = ", ".join(f"{name} {importlib.import_module(name).__version__}" for name in packages)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return [f"Command: `{' '.join(['python'] + sys.argv)}`  ",
            f"Versions: {versions}, python {platform.python_version()}; {platform.machine()}, "
            f"{subprocess.getoutput('nproc')} cores, {gpu}; {time.strftime('%Y-%m-%d')}", ""]


def settled_load(busy: float = 1.0, max_wait_s: float = 150.0) -> float:
    """The 1-minute load average once it is below ``busy``, waiting at most ``max_wait_s``: a run that follows another
    of the same benchmark would otherwise record that run's own decaying load (about 3 on 2 cores, a minute to fall
    below 1) as load from elsewhere. What it returns above ``busy`` is other work on the machine."""
    import os

    deadline = time.monotonic() + max_wait_s
    while os.getloadavg()[0] > busy and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


#: A run is marked as taken under load when the 1-minute load average before it exceeds this (2 cores, idle: < 0.5).
BUSY = 1.0


def under_load(runs: list, name=lambda r: f"{r['label']} seed {r['seed']}") -> list[str]:
    """The results-table line naming the runs taken under load (load average above ``BUSY`` before the run)."""
    busy = [f"{name(r)} (load {r['load_before']} before, {r['load_after']} after)" for r in runs
            if r["load_before"] > BUSY]
    return ["", f"Runs taken under load (1-minute load average above {BUSY} before the run; 2 cores): "
                f"{', '.join(busy) if busy else 'none'}."]
