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
