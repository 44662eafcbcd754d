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
