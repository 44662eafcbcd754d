"""One-step reasoning episodes: a contextual bandit over prompts with a verifiable reward.

``reset`` poses a problem and returns its prompt text; ``step(response_text)`` scores
the whole response with a reward function from ``envs.rewards`` and ends the episode;
``score`` scores many responses in one call. Nothing here imports ``rllib_sppo``: a
built-in model's folder for the chat template is resolved by the caller.

Prompt sources yield records ``{"prompt": [{"role", "content"}, ...], "ground_truth": str,
"data_source": str, "extra_info": dict}``: verl-format Parquet files, reasoning-gym
tasks, generated "What is a+b?" problems, or chains of operations on a running value (``envs.chain``).
"""

import random
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from envs.chain import HORIZONS, chain_records
from envs.rewards import RewardScorer, get_reward_fn, required_columns

BOXED_INSTRUCTION = "Put your final answer within \\boxed{}."
VERL_COLUMNS = "verl format needs data_source, prompt, reward_model.ground_truth"


class DatasetError(ValueError):
    """A prompt dataset that cannot be used; the message names the file and column."""


class Source(Sequence):
    """A list of prompt records."""

    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _struct_fields(t: pa.DataType) -> dict[str, pa.DataType]:
    return {t.field(i).name: t.field(i).type for i in range(t.num_fields)} if pa.types.is_struct(t) else {}


def _read_verl(path: str) -> list[dict]:
    if not Path(path).is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: not a readable Parquet file ({e})") from e
    if table.num_rows == 0:
        raise DatasetError(f"{path}: file has no rows")

    def check(column: str, ok: bool, expected: str) -> None:
        if column.split(".")[0] not in table.column_names:
            raise DatasetError(f"{path}: column {column!r} is missing ({VERL_COLUMNS})")
        if not ok:
            actual = table.schema.field(column.split(".")[0]).type
            raise DatasetError(f"{path}: column {column!r} must be {expected}, got {actual} ({VERL_COLUMNS})")

    schema = {f.name: f.type for f in table.schema}
    check("data_source", _is_text(schema.get("data_source", pa.null())), "a string")
    prompt_type = schema.get("prompt", pa.null())
    messages = prompt_type.value_type if pa.types.is_list(prompt_type) or pa.types.is_large_list(prompt_type) else None
    message_fields = _struct_fields(messages) if messages is not None else {}
    check(
        "prompt",
        all(_is_text(message_fields.get(k, pa.null())) for k in ("role", "content")),
        "a list of {role: string, content: string} structs",
    )
    gt_type = _struct_fields(schema.get("reward_model", pa.null())).get("ground_truth", pa.null())
    check(
        "reward_model.ground_truth",
        _is_text(gt_type) or pa.types.is_integer(gt_type) or pa.types.is_floating(gt_type),
        "a struct with a string ground_truth field",
    )
    if "extra_info" in schema:
        check("extra_info", pa.types.is_struct(schema["extra_info"]), "a struct")

    ground_truth = table.column("reward_model").combine_chunks().field("ground_truth")
    for column, values in [
        ("data_source", table.column("data_source")),
        ("prompt", table.column("prompt")),
        ("reward_model.ground_truth", ground_truth),
    ]:
        if values.null_count:
            raise DatasetError(f"{path}: column {column!r} has {values.null_count} null values")
    extra = table.column("extra_info").to_pylist() if "extra_info" in schema else [None] * table.num_rows
    return [
        {"prompt": prompt, "ground_truth": str(gt), "data_source": source, "extra_info": info or {}}
        for source, prompt, gt, info in zip(
            table.column("data_source").to_pylist(), table.column("prompt").to_pylist(), ground_truth.to_pylist(), extra
        )
    ]


class ParquetSource(Source):
    """Records from verl-format Parquet files (``data_source``, ``prompt``, ``reward_model``, ``extra_info``)."""

    def __init__(self, paths: str | Sequence[str]):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise DatasetError("no Parquet paths given")
        super().__init__([record for path in paths for record in _read_verl(str(path))])


class ReasoningGymSource(Source):
    """Problems of one reasoning-gym task; its metadata goes to ``extra_info["metadata"]``."""

    def __init__(self, task: str, size: int = 1000, seed: int = 0, task_config: dict | None = None):
        import reasoning_gym

        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **(task_config or {}))
        super().__init__(
            [
                {
                    "prompt": [{"role": "user", "content": f"{item['question']}\n\n{BOXED_INSTRUCTION}"}],
                    "ground_truth": str(item["answer"]),
                    "data_source": f"reasoning_gym/{task}",
                    "extra_info": {"index": i, "metadata": item["metadata"]},
                }
                for i, item in enumerate(dataset)
            ]
        )


class ArithmeticSource(Source):
    """``size`` distinct "What is a+b?" problems with operands in [0, max_operand] and ops from "+-*"."""

    def __init__(self, size: int = 1000, seed: int = 0, max_operand: int = 99, ops: str = "+"):
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty string of '+', '-', '*', got {ops!r}")
        n = max_operand + 1
        if size > n * n * len(ops):
            raise ValueError(f"only {n * n * len(ops)} distinct problems exist, asked for {size}")
        records = []
        for i, code in enumerate(random.Random(seed).sample(range(n * n * len(ops)), size)):
            a, b, op = code // (n * len(ops)), code // len(ops) % n, ops[code % len(ops)]
            answer = {"+": a + b, "-": a - b, "*": a * b}[op]
            records.append(
                {
                    "prompt": [{"role": "user", "content": f"What is {a}{op}{b}?"}],
                    "ground_truth": str(answer),
                    "data_source": "arithmetic",
                    "extra_info": {"index": i},
                }
            )
        super().__init__(records)


def split_indices(
    texts: Sequence[str], heldout_fraction: float | None = None, heldout_size: int | None = None, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Deterministic train/held-out split of prompt texts, as (train, heldout) indices into ``texts``: identical
    texts count once (the first is kept), so no prompt lands on both sides. Give exactly one of
    ``heldout_fraction``, ``heldout_size``."""
    if (heldout_fraction is None) == (heldout_size is None):
        raise ValueError("give exactly one of heldout_fraction and heldout_size")
    unique = list({text: i for i, text in reversed(list(enumerate(texts)))}.values())[::-1]
    if heldout_size is None:
        heldout_size = round(heldout_fraction * len(unique))
    if not 0 <= heldout_size < len(unique):
        raise ValueError(f"heldout_size {heldout_size} leaves no training data ({len(unique)} unique prompts)")
    heldout_ids = set(random.Random(seed).sample(range(len(unique)), heldout_size))
    train = [i for j, i in enumerate(unique) if j not in heldout_ids]
    heldout = [i for j, i in enumerate(unique) if j in heldout_ids]
    return train, heldout


def _make_source(cfg: dict) -> Source:
    kind = cfg.get("source", "arithmetic")
    seed = cfg.get("seed", 0)
    if kind == "parquet":
        return ParquetSource(cfg["paths"])
    if kind == "reasoning_gym":
        return ReasoningGymSource(cfg["task"], size=cfg.get("size", 1000), seed=seed,
                                  task_config=cfg.get("task_config"))
    if kind == "arithmetic":
        return ArithmeticSource(
            cfg.get("size", 1000), seed, max_operand=cfg.get("max_operand", 99), ops=cfg.get("ops", "+")
        )
    if kind == "chain":
        return Source(chain_records(cfg.get("size", 1000), cfg.get("steps", HORIZONS["long"]), seed))
    raise ValueError(f"unknown source {kind!r}; choose one of 'parquet', 'reasoning_gym', 'arithmetic', 'chain'")


@dataclass
class PromptSplit:
    """The problems of one split: records and their rendered prompt texts (aligned); ``num_dropped`` prompts were
    left out as longer than ``max_prompt_chars``."""

    records: list[dict]
    texts: list[str]
    num_dropped: int = 0


def _plain_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def chat_renderer(model_dir: str | None) -> Callable[[list[dict]], str]:
    """messages -> prompt text: the chat template of the tokenizer in the local folder ``model_dir`` (with the
    generation prompt), or without a folder the user messages' contents joined by newlines."""
    if model_dir is None:
        return _plain_text
    if str(model_dir).startswith("builtin:"):
        raise ValueError(f"chat_template_model {model_dir!r} names a built-in model, which envs cannot build; give "
                         f"its folder, rllib_sppo.llm.models.resolve_model({model_dir!r}) (LLMEnvRunner does this)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def reward_columns(records: list[dict]) -> dict[str, list]:
    """What a reward function gets of each record besides the completion: its columns and ``extra_info``'s, as lists
    aligned with ``records`` (a column a record lacks is None there)."""
    columns = [{**r["extra_info"], **{k: v for k, v in r.items() if k != "prompt"}} for r in records]
    names = {k: None for c in columns for k in c}  # every record's columns, in order
    return {k: [c.get(k) for c in columns] for k in names}


class ReasoningEnv(gym.Env):
    """A contextual bandit: observation = prompt text, action = the whole response text.

    The env loads its source once, renders every prompt once, de-duplicates by the rendered text and splits it into
    ``splits["train"]`` and ``splits["heldout"]``. ``reset()`` draws a problem of its ``split`` at random;
    ``reset(options={"index": i, "split": s})`` poses a given one. ``step(response)`` scores the response;
    ``score(indices, responses)`` scores many in one call (one round trip to the reward workers).

    ``env_config`` keys (all optional except the source's own):
      source: "parquet" (``paths``) | "reasoning_gym" (``task``, ``size``, ``seed``, ``task_config``:
        the generator's own options) |
        "arithmetic" (``size``, ``seed``, ``max_operand``, ``ops``) | "chain" (``size``, ``seed``, ``steps``: a
        running value through ``steps`` written-out additions, ~29 tokens a step, ``envs.chain``); default
        "arithmetic".
      split: "train" | "heldout" (what ``reset()`` draws from); heldout_size: problems held out (default 0), split
        with ``seed``.
      reward_fn: registered name or "pkg.module.fn" (default "math"); reward_timeout_s: seconds one response's
        scoring may take (default 5); reward_workers: worker processes that score (default 2).
      chat_template_model: local model folder whose tokenizer's chat template renders the prompt;
        without it the prompt text is the user messages' contents joined by newlines.
      max_prompt_chars, on_long_prompt: "drop" (skip and count in ``num_dropped``) | "error".
    """

    metadata = {"render_modes": []}
    CONFIG_KEYS = {
        "source", "paths", "task", "task_config", "size", "seed", "max_operand", "ops", "steps", "split", "heldout_size",
        "reward_fn", "reward_timeout_s", "reward_workers", "chat_template_model", "max_prompt_chars",
        "on_long_prompt",
    }  # fmt: skip

    def __init__(self, env_config: dict | None = None, **kwargs):
        cfg = {**(env_config or {}), **kwargs}
        unknown = set(cfg) - self.CONFIG_KEYS
        if unknown:
            raise ValueError(f"unknown env_config keys {sorted(unknown)}; known: {sorted(self.CONFIG_KEYS)}")
        self.split = cfg.get("split", "train")
        if self.split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {self.split!r}")
        on_long = cfg.get("on_long_prompt", "drop")
        if on_long not in ("drop", "error"):
            raise ValueError(f"on_long_prompt must be 'drop' or 'error', got {on_long!r}")

        records = _make_source(cfg)
        render = chat_renderer(cfg.get("chat_template_model"))
        texts = [render(record["prompt"]) for record in records]
        ids = split_indices(texts, heldout_size=cfg.get("heldout_size", 0), seed=cfg.get("seed", 0))
        max_chars = cfg.get("max_prompt_chars")
        self.splits = {}
        for name, split_ids in zip(("train", "heldout"), ids):
            split = self.splits[name] = PromptSplit([], [])
            for i in split_ids:
                if max_chars is not None and len(texts[i]) > max_chars:
                    if on_long == "error":
                        raise DatasetError(f"prompt {len(split.records) + split.num_dropped} of the {name} split has "
                                           f"{len(texts[i])} chars > max_prompt_chars={max_chars}")
                    split.num_dropped += 1
                    continue
                split.records.append(records[i])
                split.texts.append(texts[i])
        if not self.splits[self.split].records:
            raise DatasetError(f"the {self.split} split is empty "
                               f"({self.splits[self.split].num_dropped} prompts dropped as too long)")

        reward_fn = get_reward_fn(cfg.get("reward_fn", "math"))
        columns = reward_columns(records)
        missing = [name for name in required_columns(reward_fn) if name not in columns]
        if missing:
            raise ValueError(f"reward_fn {cfg.get('reward_fn', 'math')!r} needs the column(s) {missing}, which this "
                             f"source's records lack (they have {sorted(columns)}): choose a reward_fn that scores "
                             f"without them, or add them to the records (extra_info)")
        self.scorer = RewardScorer(reward_fn,
                                   timeout_s=cfg.get("reward_timeout_s", 5.0), num_workers=cfg.get("reward_workers", 2))
        # ASCII only: a full-unicode charset makes each space several MB when pickled.
        charset = string.printable
        longest = max(len(t) for split in self.splits.values() for t in split.texts)
        self.observation_space = gym.spaces.Text(max_length=longest, charset=charset)
        self.action_space = gym.spaces.Text(max_length=1 << 16, charset=charset)
        self.np_random = np.random.default_rng(cfg.get("seed", 0))
        self._current: tuple[str, int] | None = None

    @property
    def records(self) -> list[dict]:
        """The records of this env's split."""
        return self.splits[self.split].records

    @property
    def texts(self) -> list[str]:
        """The prompt texts of this env's split."""
        return self.splits[self.split].texts

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        split = options.get("split", self.split)
        index = options["index"] if "index" in options else self.np_random.integers(len(self.splits[split].records))
        self._current = split, int(index)
        record = self.splits[split].records[int(index)]
        return self.splits[split].texts[int(index)], {
            "messages": record["prompt"],
            "data_source": record["data_source"],
            "index": int(index),
        }

    def step(self, action: str):
        if self._current is None:
            raise RuntimeError("call reset() before step()")
        split, index = self._current
        self._current = None
        [reward], [info] = self.score([index], [action], split)
        return self.splits[split].texts[index], reward, True, False, info

    def start_scoring(self) -> None:
        """Starts the reward workers now rather than at the first ``score`` (an LLM EnvRunner does this when it is
        created, so that its first sample is not also its start-up)."""
        if not self.scorer.start(list(reward_columns(self.records[:1]))):
            raise RuntimeError(f"the reward workers of {self.scorer.name} did not start within "
                               f"{self.scorer.startup_timeout_s:g}s (see their error above)")

    def score(self, indices: Sequence[int], responses: Sequence[str], split: str | None = None
              ) -> tuple[list[float], list[dict]]:
        """Rewards and step infos of many responses in one call: ``responses[j]`` answers problem ``indices[j]`` of
        ``split`` (default: this env's). A response that cannot be scored gets 0.0, with ``parsed`` False."""
        records = [self.splits[split or self.split].records[i] for i in indices]
        rewards, errors = self.scorer(list(responses), reward_columns(records))
        infos = [{"ground_truth": r["ground_truth"], "data_source": r["data_source"], "parsed": reward is not None,
                  "reward_error": error} for r, reward, error in zip(records, rewards, errors)]
        return [0.0 if reward is None else reward for reward in rewards], infos

    def close(self) -> None:
        self.scorer.close()
        super().close()


def register_reasoning() -> None:
    """Registers ``ReasoningBandit-v0`` with gymnasium and with Tune (so remote EnvRunners find it)."""
    from ray.tune.registry import register_env

    if "ReasoningBandit-v0" not in gym.registry:
        gym.register("ReasoningBandit-v0", entry_point=ReasoningEnv)
    register_env("ReasoningBandit-v0", lambda cfg: ReasoningEnv(cfg))
