"""The asset cache: a model built once, then loaded from its folder."""

import os
import shutil
import tempfile
from pathlib import Path


def cache_root(cache_dir=None) -> Path:
    """The asset cache folder: `cache_dir`, else $RLLIB_SPPO_CACHE, else ~/.cache/rllib_sppo."""
    return Path(cache_dir or os.environ.get("RLLIB_SPPO_CACHE") or Path.home() / ".cache" / "rllib_sppo")


def cached(path: Path, build) -> str:
    """`path`, first filling it with `build(tmp_dir)` and moving tmp_dir into place if it does not exist."""
    if path.exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.exists():  # otherwise another process finished first: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)
