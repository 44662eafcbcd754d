"""Verifiable reward functions for reasoning tasks, TRL style.

A reward function is a plain module-level (so picklable) function
``fn(completions: list[str], **columns) -> list[float | None]``. ``columns`` are
dataset columns as lists aligned with ``completions`` (``ground_truth=[...]``,
``data_source=[...]``, ...); a function takes the ones it needs and ignores the rest
via ``**_``. ``None`` means "cannot score" (no answer could be extracted).

Model output is only ever parsed, never evaluated. ``score_with_timeout`` runs a
reward function in a worker process so that a verifier that raises or hangs costs
at most ``timeout_s`` and never takes the caller down.
"""

import functools
import importlib
import json
import multiprocessing
import re
from typing import Callable

RewardFn = Callable[..., list[float | None]]

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


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


def math_reward(completions: list[str], ground_truth: list[str], **_) -> list[float | None]:
    """1.0 if the last boxed answer is equivalent to the ground truth (math-verify), 0.0 if
    it is not, None if there is no boxed answer or it cannot be parsed."""
    from math_verify import parse, verify

    rewards: list[float | None] = []
    for completion, gold_text in zip(completions, ground_truth, strict=True):
        answer = extract_boxed(completion)
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
        if not pred:
            rewards.append(None)
            continue
        rewards.append(1.0 if verify(gold, pred, timeout_seconds=None) else 0.0)
    return rewards


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


REWARD_FNS: dict[str, RewardFn] = {"math": math_reward, "reasoning_gym": reasoning_gym_reward}


def get_reward_fn(name: str | RewardFn) -> RewardFn:
    """A registered reward function by name, a ``"pkg.module.fn"`` dotted path, or a callable."""
    if callable(name):
        return name
    if name in REWARD_FNS:
        return REWARD_FNS[name]
    if "." in name:
        module_name, attr = name.rsplit(".", 1)
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward fn {name!r} cannot be imported: {e}") from e
        if not callable(fn):
            raise ValueError(f"reward fn {name!r} is not callable")
        return fn
    raise ValueError(
        f"unknown reward fn {name!r}; choose one of {sorted(REWARD_FNS)} or a dotted path 'pkg.module.fn'"
    )


_pool = None  # one spawned worker process, created on first use and replaced after a hang
_warm: set[str] = set()  # reward fns the worker has already run once
_STARTUP_TIMEOUT_S = 60.0


def _warm_up(fn: RewardFn, column_names: list[str]) -> None:
    """Runs in the worker: calls ``fn`` on no samples so its lazy imports happen untimed."""
    try:
        fn([], **{name: [] for name in column_names})
    except Exception:
        pass  # the timed call reports any real failure


def _kill_pool() -> None:
    global _pool
    if _pool is not None:
        _pool.terminate()
        _pool = None
        _warm.clear()


def score_with_timeout(
    fn: RewardFn, completions: list[str], columns: dict[str, list], timeout_s: float = 5.0
) -> tuple[list[float | None], list[str]]:
    """Runs ``fn(completions, **columns)`` in a worker process, bounded by ``timeout_s``.

    Returns ``(rewards, errors)``. If the call raises, times out or returns something
    malformed, every reward is None and ``errors`` says why; a hung worker is killed and
    replaced. Starting the worker and ``fn``'s first (empty) call, which does its
    imports, are bounded separately by ``_STARTUP_TIMEOUT_S``.
    """
    global _pool
    name = getattr(fn, "__name__", repr(fn))
    failed = [None] * len(completions)
    if _pool is None:
        _pool = multiprocessing.get_context("spawn").Pool(1)
    key = f"{fn.__module__}.{getattr(fn, '__qualname__', name)}"
    limit = _STARTUP_TIMEOUT_S
    try:
        if key not in _warm:
            _pool.apply_async(_warm_up, (fn, list(columns))).get(limit)
            _warm.add(key)
        limit = timeout_s
        rewards = _pool.apply_async(fn, (list(completions),), dict(columns)).get(limit)
    except multiprocessing.TimeoutError:
        _kill_pool()
        return failed, [f"reward fn {name} timed out after {limit}s"]
    except Exception as e:
        return failed, [f"reward fn {name} raised {type(e).__name__}: {e}"]
    if not isinstance(rewards, (list, tuple)) or len(rewards) != len(completions):
        return failed, [f"reward fn {name} returned {rewards!r:.200} for {len(completions)} completions"]
    try:
        return [None if r is None else float(r) for r in rewards], []
    except (TypeError, ValueError) as e:
        return failed, [f"reward fn {name} returned a non-numeric reward: {e}"]
