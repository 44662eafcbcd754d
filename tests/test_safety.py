"""Safety for real: an LLM training run needs no network and writes only into its output directory."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.system  # runs the CLI in a fresh process, its Ray workers too

# Loaded into every Python process of the run (driver and Ray workers) through PYTHONPATH: resolving any host name
# other than this machine's own is refused and recorded, so a download attempt fails and shows in the record.
GUARD = '''
import os, socket
_resolve, _local = socket.getaddrinfo, {"localhost", "", None, socket.gethostname()}

def getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name not in _local and not str(name).replace(".", "").isdigit() and ":" not in str(name):
        import traceback
        stack = " ".join(f.filename for f in traceback.extract_stack()[:-1])
        with open(os.environ["NETWORK_ATTEMPTS"], "a") as f:
            f.write(f"{name} from {stack}\\n")
        raise socket.gaierror(f"network access refused by the test: {name}")
    return _resolve(host, *args, **kwargs)

socket.getaddrinfo = getaddrinfo
'''


def files_under(root):
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def test_llm_run_needs_no_network_and_writes_only_its_output_dir(tmp_path, tiny_llm_experiment):
    experiment = tiny_llm_experiment("offline")
    guard, home, work, results = (tmp_path / d for d in ("guard", "home", "work", "results"))
    for d in (guard, home, work):
        d.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    attempts = tmp_path / "network_attempts.txt"
    env = {**os.environ, "HOME": str(home), "NETWORK_ATTEMPTS": str(attempts), "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(guard), os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "rllib_sppo.cli", "train", "file", experiment,
                          "--storage-path", str(results)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["training_iteration"] == 2 and summary["checkpoint"].startswith(str(results))
    # No host name was even looked up, except by Ray's dashboard probing for a cloud provider (usage stats; a
    # failed lookup there is harmless).
    lookups = attempts.read_text().splitlines() if attempts.exists() else []
    assert [line for line in lookups if "ray/_common/usage/usage_lib.py" not in line] == [], lookups
    assert files_under(work) == set()  # nothing in the working directory
    # In HOME only the libraries' own caches and Ray's session token, never the run's outputs.
    assert {path.split(os.sep)[0] for path in files_under(home)} <= {".cache", ".config", ".ray"}, files_under(home)
    assert files_under(results)  # the run's outputs are all under its output directory
