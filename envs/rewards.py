"""Verifiable reward functions for reasoning tasks, TRL style.

A reward function is a plain module-level (so picklable) function
``fn(completions: list[str], **columns) -> list[float | None]``. ``columns`` are
dataset columns as lists aligned with ``completions`` (``ground_truth=[...]``,
``data_source=[...]``, ...); a function takes the ones it needs and ignores the rest
via ``**_``. ``None`` means "cannot score" (no answer could be extracted).

Model output is only ever parsed, never evaluated. A ``RewardScorer`` scores a whole
batch in one call on a small pool of worker processes, each sample bounded by a timeout,
so that a verifier that raises or hangs costs that sample and never takes the caller down.
"""

import functools
import inspect
import json
import logging
import multiprocessing
import multiprocessing.connection
import pickle
import re
import signal
import threading
import time
from collections.abc import Sequence
from typing import Callable

from envs.dotted import builtin_or_dotted

RewardFn = Callable[..., list[float | None]]

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def _final_part(text: str) -> str:
    """The text after the last ``</think>`` (the whole text if there is none)."""
    return text.rsplit("</think>", 1)[-1]


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces) after the last ``</think>``."""
    text = _final_part(text)
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for i in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[match.end() : i].strip()
    return None


def final_answer(text: str) -> str | None:
    """The last ``\\boxed{...}`` after the last ``</think>`` unless it is empty, else the last number there (commas
    dropped)."""
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    numbers = _NUMBER.findall(_final_part(text))
    return numbers[-1].replace(",", "") if numbers else None


def _check_answers(answers, ground_truth: list[str]) -> list[float | None]:
    """1.0 where an answer is equivalent to its ground truth (math-verify), 0.0 where it is not, None where there is
    no answer or it cannot be parsed."""
    from math_verify import parse, verify

    rewards: list[float | None] = []
    for answer, gold_text in zip(answers, ground_truth, strict=True):
        if answer is None:
            rewards.append(None)
            continue
        gold_text = str(gold_text)
        if "\\boxed" not in gold_text and "$" not in gold_text:
            gold_text = f"\\boxed{{{gold_text}}}"
        gold = parse(gold_text, parsing_timeout=None)
        if not gold:
            raise ValueError(f"cannot parse ground truth {gold_text!r}")
        pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
        rewards.append(None if not pred else 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0)
    return rewards


def math_reward(completions: list[str], ground_truth: list[str], **_) -> list[float | None]:
    """1.0 if the last boxed answer is equivalent to the ground truth (math-verify), 0.0 if
    it is not, None if there is no boxed answer or it cannot be parsed."""
    return _check_answers([extract_boxed(c) for c in completions], ground_truth)


def final_answer_reward(completions: list[str], ground_truth: list[str], **_) -> list[float | None]:
    """0/1 on the final answer (``final_answer``: the last boxed one, else the last number) checked against the
    ground truth like ``math_reward``; None if the response has neither. Restating the problem earns nothing:
    "7 - 0 = 6" scores 0 for 7."""
    return _check_answers([final_answer(c) for c in completions], ground_truth)


def working_lines(text: str) -> list[str]:
    """The lines before the last boxed answer."""
    return text.rsplit("\\boxed", 1)[0].rstrip("\n").split("\n")


def working_reward(completions: list[str], ground_truth: list[str], solution: list[str | None], **_
                   ) -> list[float | None]:
    """``math_reward``, and 0.0 for a right answer whose working is not the reference ``solution``'s line for line:
    the verifier of a task that writes its working one checkable line a step (``envs.chain``), so that only a fully
    right answer scores, not a right number reached through a slip. ``solution`` is the records' column (their
    ``extra_info``)."""
    if any(s is None for s in solution):
        raise ValueError("reward_fn 'working' needs each record's reference working in a `solution` column "
                         "(extra_info.solution); use 'math' for a task without one")
    return [r if r != 1.0 or working_lines(c) == working_lines(s) else 0.0
            for r, c, s in zip(math_reward(completions, ground_truth), completions, solution, strict=True)]


@functools.lru_cache(maxsize=None)
def _rg_scorer(task: str) -> Callable:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def extract_answer(text: str) -> str | None:
    """Last ``\\boxed{}``, else last ``<answer>...</answer>``, else the last non-empty line."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    text = _final_part(text)
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def reasoning_gym_reward(
    completions: list[str], ground_truth: list[str], metadata: list[dict | str], **_
) -> list[float | None]:
    """Scores with reasoning-gym's own ``score_answer`` for ``metadata["source_dataset"]``.

    ``metadata`` entries may be dicts or JSON strings (as stored in Parquet).
    """
    import reasoning_gym  # noqa: F401  (here, so that a worker's warm-up call does this slow import untimed)

    rewards: list[float | None] = []
    for completion, answer, meta in zip(completions, ground_truth, metadata, strict=True):
        meta = json.loads(meta) if isinstance(meta, str) else meta
        extracted = extract_answer(completion)
        if extracted is None:
            rewards.append(None)
            continue
        score = _rg_scorer(meta["source_dataset"])
        rewards.append(float(score(extracted, {"answer": answer, "metadata": meta})))
    return rewards


REWARD_FNS: dict[str, RewardFn] = {
    "math": math_reward, "final_answer": final_answer_reward, "reasoning_gym": reasoning_gym_reward,
    "working": working_reward}


def get_reward_fn(name: str | RewardFn) -> RewardFn:
    """A registered reward function by name, a ``"pkg.module.fn"`` dotted path, or a callable."""
    return name if callable(name) else builtin_or_dotted("reward_fn", name, REWARD_FNS, callable, "a function")


def required_columns(fn: RewardFn) -> list[str]:
    """The columns ``fn`` cannot score without: its named parameters after the completions that have no default."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


class _Timeout(BaseException):
    """Raised in a worker when one sample's scoring runs past its timeout. A BaseException, so that a verifier's own
    ``except Exception`` cannot swallow it."""


def _on_alarm(signum, frame):
    raise _Timeout


def _warm_up(fn: RewardFn, column_names: list[str]) -> None:
    """Starts a worker: arms the timeout signal and calls ``fn`` on no samples, so its lazy imports happen untimed."""
    signal.signal(signal.SIGALRM, _on_alarm)
    # math-verify warns once per process that its own timeouts are off: here each call is bounded by the timeout signal.
    for logger in ("math_verify.grader", "math_verify.parser"):
        logging.getLogger(logger).addFilter(lambda record: not record.getMessage().startswith("Timeout is disabled"))
    try:
        fn([], **{name: [] for name in column_names})
    except Exception:
        pass  # the timed calls report any real failure


def _one_reward(name: str, rewards) -> tuple[float | None, str | None]:
    if not isinstance(rewards, (list, tuple)) or len(rewards) != 1:
        return None, f"reward fn {name} returned {rewards!r:.200} for 1 completion"
    if rewards[0] is None:
        return None, None
    try:
        return float(rewards[0]), None
    except (TypeError, ValueError) as e:
        return None, f"reward fn {name} returned a non-numeric reward: {e}"


def _score_in_worker(fn: RewardFn, completions: list[str], columns: dict[str, list], timeout_s: float):
    """Runs in a worker: ``fn`` on one sample at a time, each call bounded by ``timeout_s`` (SIGALRM), so a verifier
    that raises or hangs on one sample costs only that sample. Returns ``(reward, error)`` per sample."""
    name = getattr(fn, "__name__", repr(fn))
    results = []
    for i, completion in enumerate(completions):
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                rewards = fn([completion], **{k: [v[i]] for k, v in columns.items()})
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Timeout:
            results.append((None, f"reward fn {name} timed out after {timeout_s}s"))
        except Exception as e:
            results.append((None, f"reward fn {name} raised {type(e).__name__}: {e}"))
        else:
            results.append(_one_reward(name, rewards))
    return results


def _serve(conn, fn: RewardFn, column_names: list[str]) -> None:
    """A scoring worker: warms up, then scores each chunk that arrives on its pipe until the pipe closes."""
    _warm_up(fn, column_names)
    conn.send("ready")
    while True:
        try:
            completions, columns, timeout_s = conn.recv()
        except EOFError:
            return
        conn.send(_score_in_worker(fn, completions, columns, timeout_s))


def _send(conn, payload: bytes) -> None:
    try:
        conn.send_bytes(payload)
    except (OSError, ValueError):  # the worker was ended meanwhile
        pass


class RewardScorer:
    """Scores batches with one reward function on a few worker processes.

    ``scorer(completions, columns)`` scores a whole batch in one call: the batch is dealt to the workers in
    contiguous chunks (one round trip each, on each worker's own pipe), and a worker calls ``fn`` on one sample at a
    time, each call bounded by ``timeout_s``. A sample whose verifier raises, hangs or returns something malformed
    gets reward None and its error; the others are unaffected. A worker that dies, stops, or hangs where the timeout
    signal cannot reach it (inside C code) costs its chunk (``timeout_s`` per sample at most) and the workers are
    replaced (killed with SIGKILL, which also ends a stopped process; no lock is shared between workers, so none can
    be left held). The workers start on the first call (or ``start``), each first running ``fn`` on no samples so that its imports
    are not timed (bounded by ``startup_timeout_s``); ``close()`` ends them.
    """

    startup_timeout_s = 60.0

    def __init__(self, fn: RewardFn, timeout_s: float = 5.0, num_workers: int = 2):
        if num_workers < 1:
            raise ValueError(f"a RewardScorer needs at least one worker, got num_workers={num_workers}")
        try:
            pickle.dumps(fn)
        except Exception as e:
            raise ValueError(f"reward fn {fn!r} runs in worker processes, so it must be a module-level function "
                             f"(picklable): {e}") from e
        self.fn, self.timeout_s, self.num_workers = fn, float(timeout_s), num_workers
        self.name = getattr(fn, "__name__", repr(fn))
        self._workers = []  # (process, connection), started on the first call

    def __call__(self, completions: Sequence[str], columns: dict[str, Sequence]
                 ) -> tuple[list[float | None], list[str | None]]:
        """``fn(completions, **columns)`` sample by sample in the workers: ``(rewards, errors)``, one each per
        completion (error None where the sample was scored)."""
        n = len(completions)
        if n == 0:
            return [], []
        if not self._workers and not self.start(list(columns)):
            return [None] * n, [f"reward fn {self.name}: its workers did not start within {self.startup_timeout_s:g}s"
                                f" (see their error above)"] * n
        size = -(-n // min(n, self.num_workers))
        chunks = [range(start, min(start + size, n)) for start in range(0, n, size)]
        budget = self.timeout_s * size + 1.0
        results, waiting = {}, {}
        for number, ((_, conn), ids) in enumerate(zip(self._workers, chunks)):
            task = ([completions[i] for i in ids], {k: [v[i] for i in ids] for k, v in columns.items()}, self.timeout_s)
            try:
                payload = multiprocessing.reduction.ForkingPickler.dumps(task)
            except Exception as e:  # e.g. columns that cannot be sent to a worker
                results[number] = [(None, f"reward fn {self.name} could not run: {type(e).__name__}: {e}")] * len(ids)
                continue
            # From a thread: writing to a worker that has stopped reading must not block this call past its budget.
            threading.Thread(target=_send, args=(conn, payload), daemon=True).start()
            waiting[conn] = number
        deadline, lost = time.monotonic() + budget, []
        while waiting and time.monotonic() < deadline:
            for conn in multiprocessing.connection.wait(list(waiting), deadline - time.monotonic()):
                number = waiting.pop(conn)
                try:
                    results[number] = conn.recv()
                except (EOFError, OSError):  # the worker died
                    lost.append(number)
        for number in lost + list(waiting.values()):
            results[number] = [(None, f"reward fn {self.name}: its worker did not return {len(chunks[number])} "
                                      f"samples within {budget:.0f}s (stuck or died); replaced")] * len(chunks[number])
        if lost or waiting:
            self.close()
        rewards, errors = zip(*(pair for number in range(len(chunks)) for pair in results[number]))
        return list(rewards), list(errors)

    def start(self, column_names: list[str]) -> bool:
        """Starts the workers and waits, within ``startup_timeout_s``, until each has run its warm-up (the first call
        does this when they have not started); False if they did not start."""
        if self._workers:
            return True
        ctx = multiprocessing.get_context("spawn")
        for _ in range(self.num_workers):
            conn, child = ctx.Pipe()
            process = ctx.Process(target=_serve, args=(child, self.fn, column_names), daemon=True)
            process.start()
            child.close()
            self._workers.append((process, conn))
        deadline = time.monotonic() + self.startup_timeout_s
        for _, conn in self._workers:
            try:
                ready = conn.poll(max(0.0, deadline - time.monotonic())) and conn.recv() == "ready"
            except (EOFError, OSError):  # died while starting
                ready = False
            if not ready:
                self.close()
                return False
        return True

    def close(self) -> None:
        """Ends the worker processes (a later call starts new ones)."""
        for process, conn in self._workers:
            process.kill()
            process.join()
            conn.close()
        self._workers = []
