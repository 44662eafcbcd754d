"""Fail fast instead of hanging: a part of a run that takes longer than its timeout ends the process it runs in.

A call that hangs in this process (an engine generating, a learner update, weights loading into an in-process
engine) cannot be interrupted from Python: the thread running it is inside C code or waiting on another process.
``deadline(part, timeout_s, key)`` watches such a call from a timer thread; past the timeout it logs an error
naming the part and the config key that bounds it, writes every thread's stack to stderr, and exits the process
with ``STUCK_EXIT_CODE``. The exit is what brings the part back: RLlib restarts a remote EnvRunner whose process
died, Tune restarts a trial whose process died from its last checkpoint (``max_failures``), and without either the
run stops with that error instead of hanging.
"""

import faulthandler
import logging
import os
import sys
import threading
from contextlib import contextmanager

log = logging.getLogger(__name__)

#: The exit code of a process that a deadline ended (EX_TEMPFAIL: "try again").
STUCK_EXIT_CODE = 75


def _stuck(part: str, timeout_s: float, key: str) -> None:
    message = (f"stuck: {part} did not finish within {key}={timeout_s:g} s; ending this process (pid {os.getpid()}, "
               f"exit code {STUCK_EXIT_CODE}) so that it is restarted (a remote EnvRunner by RLlib, a trial by Tune "
               f"with max_failures). Raise {key} if this part is only slow. The stacks of its threads follow.")
    log.error(message)
    print(f"ERROR {message}", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(STUCK_EXIT_CODE)


@contextmanager
def deadline(part: str, timeout_s: float, key: str):
    """Runs the ``with`` block; if it has not finished after ``timeout_s`` seconds, ends the process with an error
    naming ``part`` and the config ``key`` that set the timeout."""
    timer = threading.Timer(timeout_s, _stuck, (part, timeout_s, key))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
