"""Prompt sources, the train/held-out split and the one-step reasoning env on real data."""

import json
import pickle
import re
import subprocess
import sys

import gymnasium as gym
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from envs.reasoning import (ArithmeticSource, DatasetError, ParquetSource, ReasoningEnv, ReasoningGymSource,
                            register_reasoning, split_indices)

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
ROWS = {
    "data_source": ["lighteval/MATH", "lighteval/MATH"],
    "prompt": [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 1/2 + 0."}],
        [{"role": "user", "content": "What is the square root of 2?"}],
    ],
    "ability": ["math", "math"],
    "reward_model": [{"ground_truth": r"\frac{1}{2}", "style": "rule"}, {"ground_truth": r"\sqrt{2}", "style": "rule"}],
    "extra_info": [{"index": 0, "split": "train"}, {"index": 1, "split": "train"}],
}
TYPES = {
    "data_source": pa.string(),
    "prompt": pa.list_(MESSAGE),
    "ability": pa.string(),
    "reward_model": pa.struct([("ground_truth", pa.string()), ("style", pa.string())]),
    "extra_info": pa.struct([("index", pa.int64()), ("split", pa.string())]),
}


def raising_reward(completions, **_):
    raise RuntimeError("verifier crashed")


def write_verl(path, rows=ROWS, types=TYPES):
    pq.write_table(pa.table({k: pa.array(v, type=types[k]) for k, v in rows.items()}), path)
    return str(path)


def test_parquet_source_reads_verl_format(tmp_path):
    source = ParquetSource([write_verl(tmp_path / "a.parquet"), write_verl(tmp_path / "b.parquet")])
    assert len(source) == 4
    assert source[0] == {
        "prompt": ROWS["prompt"][0],
        "ground_truth": r"\frac{1}{2}",
        "data_source": "lighteval/MATH",
        "extra_info": {"index": 0, "split": "train"},
    }
    assert source[3]["ground_truth"] == r"\sqrt{2}"


def test_parquet_source_integer_ground_truth_and_no_extra_info(tmp_path):
    rows = {k: ROWS[k] for k in ("data_source", "prompt")} | {"reward_model": [{"ground_truth": 3}, {"ground_truth": 4}]}
    types = TYPES | {"reward_model": pa.struct([("ground_truth", pa.int64())])}
    records = list(ParquetSource(write_verl(tmp_path / "t.parquet", rows, types)))
    assert [r["ground_truth"] for r in records] == ["3", "4"] and records[0]["extra_info"] == {}


def _without(column):
    return {k: v for k, v in ROWS.items() if k != column}


@pytest.mark.parametrize("rows, types, column, problem", [
    (_without("prompt"), TYPES, "prompt", "is missing"),
    (_without("data_source"), TYPES, "data_source", "is missing"),
    (_without("reward_model"), TYPES, "reward_model.ground_truth", "is missing"),
    (ROWS | {"prompt": ["1+1?", "2+2?"]}, TYPES | {"prompt": pa.string()}, "prompt", "must be a list"),
    (ROWS | {"reward_model": [{"style": "rule"}] * 2}, TYPES | {"reward_model": pa.struct([("style", pa.string())])},
     "reward_model.ground_truth", "must be a struct with a string ground_truth"),
    (ROWS | {"data_source": [1, 2]}, TYPES | {"data_source": pa.int64()}, "data_source", "must be a string"),
    (ROWS | {"extra_info": ["{}", "{}"]}, TYPES | {"extra_info": pa.string()}, "extra_info", "must be a struct"),
    (ROWS | {"reward_model": [{"ground_truth": None, "style": "rule"}] * 2}, TYPES,
     "reward_model.ground_truth", "has 2 null values"),
])
def test_parquet_errors_name_file_and_column(tmp_path, rows, types, column, problem):
    path = write_verl(tmp_path / "train.parquet", rows, types)
    with pytest.raises(DatasetError) as err:
        ParquetSource(path)
    assert str(err.value).startswith(f"{path}: column '{column}' {problem}"), err.value


def test_parquet_missing_and_empty_files(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path}/nope.parquet: file not found")):
        ParquetSource(str(tmp_path / "nope.parquet"))
    empty = write_verl(tmp_path / "empty.parquet", {k: [] for k in ROWS})
    with pytest.raises(DatasetError, match=re.escape(f"{empty}: file has no rows")):
        ParquetSource(empty)
    (tmp_path / "zero.parquet").write_bytes(b"")
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path}/zero.parquet: not a readable Parquet file")):
        ParquetSource(str(tmp_path / "zero.parquet"))
    assert issubclass(DatasetError, ValueError)


def test_reasoning_gym_source():
    source = ReasoningGymSource("basic_arithmetic", size=5, seed=3)
    again = ReasoningGymSource("basic_arithmetic", size=5, seed=3)
    assert len(source) == 5 and list(source) == list(again)
    record = source[0]
    assert record["data_source"] == "reasoning_gym/basic_arithmetic"
    assert record["prompt"][0]["role"] == "user" and record["prompt"][0]["content"].endswith(r"within \boxed{}.")
    assert record["extra_info"]["metadata"]["source_dataset"] == "basic_arithmetic"
    # metadata is kept as reasoning-gym made it (its scorer reads it), and stays JSON-able and picklable
    assert json.dumps(record) and pickle.loads(pickle.dumps(record)) == record


def test_arithmetic_source_problems_are_distinct_and_correct():
    source = ArithmeticSource(size=300, seed=1, max_operand=20, ops="+-*")
    assert list(source) == list(ArithmeticSource(size=300, seed=1, max_operand=20, ops="+-*"))
    questions = [r["prompt"][0]["content"] for r in source]
    assert len(set(questions)) == 300 and {r["data_source"] for r in source} == {"arithmetic"}
    for question, record in zip(questions, source):
        a, op, b = re.fullmatch(r"What is (\d+)([-+*])(\d+)\?", question).groups()
        assert 0 <= int(a) <= 20 and 0 <= int(b) <= 20
        assert record["ground_truth"] == str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    with pytest.raises(ValueError, match="only 4 distinct"):
        ArithmeticSource(size=5, max_operand=1)
    with pytest.raises(ValueError, match="ops"):
        ArithmeticSource(size=5, ops="/")


def test_split_is_deterministic_disjoint_and_dedupes():
    texts = [r["prompt"][0]["content"] for r in ArithmeticSource(size=40, seed=0)]
    texts += texts[:10]  # the same problems again
    train, heldout = split_indices(texts, heldout_size=8, seed=5)
    assert (train, heldout) == split_indices(texts, heldout_size=8, seed=5)
    assert heldout != split_indices(texts, heldout_size=8, seed=6)[1]
    assert len(heldout) == 8 and len(train) == 32 and not {texts[i] for i in train} & {texts[i] for i in heldout}
    assert max(train + heldout) < 40  # first occurrence kept
    train, heldout = split_indices(texts, heldout_fraction=0.25, seed=0)
    assert (len(train), len(heldout)) == (30, 10)
    with pytest.raises(ValueError, match="no training data"):
        split_indices(texts, heldout_size=40)
    with pytest.raises(ValueError, match="exactly one"):
        split_indices(texts)


def test_env_round_trip_and_rewards():
    env = ReasoningEnv({"source": "arithmetic", "size": 20, "seed": 0})
    obs, info = env.reset(seed=0)
    record = env.records[info["index"]]
    assert obs == record["prompt"][0]["content"] and info["messages"] == record["prompt"]
    assert info["data_source"] == "arithmetic"
    gt = record["ground_truth"]
    obs2, reward, terminated, truncated, step_info = env.step(rf"<think>easy</think>\boxed{{{gt}}}")
    assert (obs2, reward, terminated, truncated) == (obs, 1.0, True, False)
    assert step_info == {"ground_truth": gt, "data_source": "arithmetic", "parsed": True, "reward_error": None}

    gt = env.records[env.reset()[1]["index"]]["ground_truth"]
    assert env.step(rf"\boxed{{{int(gt) + 1}}}")[1:3] == (0.0, True)
    env.reset()
    _, reward, _, _, step_info = env.step("I don't know")
    assert reward == 0.0 and step_info["parsed"] is False and step_info["reward_error"] is None
    with pytest.raises(RuntimeError, match="reset"):
        env.step(r"\boxed{1}")


def test_env_reasoning_gym_with_its_scorer():
    env = ReasoningEnv({"source": "reasoning_gym", "task": "chain_sum", "size": 6, "seed": 2,
                        "reward_fn": "reasoning_gym"})
    _, info = env.reset()
    gt = env.records[info["index"]]["ground_truth"]
    _, reward, _, _, step_info = env.step(rf"\boxed{{{gt}}}")
    assert reward == 1.0 and step_info["data_source"] == "reasoning_gym/chain_sum"


def test_a_reward_fn_needing_a_column_the_records_lack_is_refused_at_once():
    """``working`` reads each record's reference ``solution``: on a source without one, the env says so when it is
    made, naming the column, instead of every response's reward failing in the workers."""
    with pytest.raises(ValueError, match=r"reward_fn 'working' needs the column\(s\) \['solution'\], which this source's "
                                         r"records lack \(they have \['data_source', 'extra_info', 'ground_truth', "
                                         r"'index'\]\)"):
        ReasoningEnv({"source": "arithmetic", "size": 5, "reward_fn": "working"})
    env = ReasoningEnv({"source": "chain", "steps": 2, "size": 5, "reward_fn": "working"})
    _, info = env.reset()
    solution = env.records[info["index"]]["extra_info"]["solution"]
    assert env.step(solution)[1] == 1.0
    env.close()


def test_env_verifier_error_never_raises():
    env = ReasoningEnv({"source": "arithmetic", "size": 5, "reward_fn": "test_reasoning_env.raising_reward"})
    env.reset()
    _, reward, terminated, _, info = env.step(r"\boxed{1}")
    assert (reward, terminated, info["parsed"]) == (0.0, True, False)
    assert info["reward_error"] == "reward fn raising_reward raised RuntimeError: verifier crashed"


def test_env_draws_are_seeded():
    env = ReasoningEnv({"source": "arithmetic", "size": 7, "seed": 1})
    first = [env.reset(seed=3)[1]["index"]] + [env.reset()[1]["index"] for _ in range(13)]
    assert set(first) <= set(range(7)) and len(set(first)) > 1
    assert first == [env.reset(seed=3)[1]["index"]] + [env.reset()[1]["index"] for _ in range(13)]
    fresh = lambda: ReasoningEnv({"source": "arithmetic", "size": 7, "seed": 1})  # noqa: E731
    a, b = fresh(), fresh()  # without reset(seed=...), seeded by the env_config seed
    assert [a.reset()[1]["index"] for _ in range(8)] == [b.reset()[1]["index"] for _ in range(8)]


def test_env_train_and_heldout_splits_are_disjoint():
    cfg = {"source": "arithmetic", "size": 30, "seed": 4, "heldout_size": 6}
    train, heldout = ReasoningEnv(cfg | {"split": "train"}), ReasoningEnv(cfg | {"split": "heldout"})
    assert len(train.texts) == 24 and len(heldout.texts) == 6 and not set(train.texts) & set(heldout.texts)
    with pytest.raises(DatasetError, match="heldout split is empty"):
        ReasoningEnv({"source": "arithmetic", "size": 5, "split": "heldout"})


def test_env_long_prompts_drop_or_error():
    env = ReasoningEnv({"source": "arithmetic", "size": 200, "max_operand": 99, "max_prompt_chars": 13})
    assert len(env.texts) + env.splits["train"].num_dropped == 200 and env.splits["train"].num_dropped > 0
    assert max(map(len, env.texts)) <= 13 and env.observation_space.max_length == 13
    with pytest.raises(DatasetError, match="max_prompt_chars=13"):
        ReasoningEnv({"source": "arithmetic", "size": 200, "max_prompt_chars": 13, "on_long_prompt": "error"})


def chat_template_folder(path, template):
    """A character-level tokenizer with the given chat template, saved in ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(m["content"] for p in ROWS["prompt"] for m in p)) | set("<|>\n"))
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<unk>"] + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return str(path)


def test_env_parquet_with_chat_template(tmp_path):
    tok = chat_template_folder(tmp_path / "tok", "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                                                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    cfg = {"source": "parquet", "paths": [write_verl(tmp_path / "d.parquet")], "seed": 0}

    env = ReasoningEnv(cfg | {"chat_template_model": tok})
    assert env.texts[0] == "<|system|>Be brief.\n<|user|>Compute 1/2 + 0.\n<|assistant|>"
    assert ReasoningEnv(cfg).texts == ["Compute 1/2 + 0.", "What is the square root of 2?"]
    obs, info = env.reset()
    answer = {0: "0.5", 1: r"2^{1/2}"}[info["index"]]
    assert env.step(rf"\boxed{{{answer}}}")[1] == 1.0
    with pytest.raises(ValueError, match=r"'builtin:tiny-arith' names a built-in model.*resolve_model"):
        ReasoningEnv(cfg | {"chat_template_model": "builtin:tiny-arith"})


def test_split_dedupes_by_the_rendered_prompt(tmp_path):
    """Two rows that differ only in a system message the chat template drops are one prompt: never on both sides."""
    question = ROWS["prompt"][0][1]
    rows = {k: [v[0]] * 6 for k, v in ROWS.items()}
    rows["prompt"] = [[ROWS["prompt"][0][0], question], [question]] + [
        [{"role": "user", "content": f"Compute 1/2 + {i}."}] for i in range(1, 5)]
    path = write_verl(tmp_path / "d.parquet", rows)
    tok = chat_template_folder(tmp_path / "tok", "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>"
                                                 "{{ m['content'] }}\n{% endif %}{% endfor %}<|assistant|>")
    for seed in range(6):  # whichever side the problem lands on, it is there once
        env = ReasoningEnv({"source": "parquet", "paths": [path], "chat_template_model": tok, "heldout_size": 1,
                            "seed": seed})
        texts = env.splits["train"].texts + env.splits["heldout"].texts
        assert len(texts) == 5 and texts.count("<|user|>Compute 1/2 + 0.\n<|assistant|>") == 1


def test_env_scores_many_responses_in_one_call():
    env = ReasoningEnv({"source": "arithmetic", "size": 10, "heldout_size": 3, "reward_workers": 2})
    truth = [r["ground_truth"] for r in env.splits["heldout"].records]
    rewards, infos = env.score([0, 0, 1, 2], [rf"\boxed{{{truth[0]}}}", "no answer", r"\boxed{-1}",
                                              rf"\boxed{{{truth[2]}}}"], split="heldout")
    assert rewards == [1.0, 0.0, 0.0, 1.0]
    assert [i["parsed"] for i in infos] == [True, False, True, True]
    assert [i["ground_truth"] for i in infos] == [truth[0], truth[0], truth[1], truth[2]]
    assert env.reset(options={"index": 2, "split": "heldout"})[0] == env.splits["heldout"].texts[2]
    assert env.step(rf"\boxed{{{truth[2]}}}")[1] == 1.0
    env.close()


@pytest.mark.system
def test_envs_import_nothing_from_rllib_sppo():
    code = "import envs, envs.rewards, sys; print(sorted(m for m in sys.modules if m.startswith('rllib_sppo')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_registered_id_and_bad_config():
    register_reasoning()
    env = gym.make("ReasoningBandit-v0", env_config={"source": "arithmetic", "size": 4})
    obs, _ = env.reset(seed=0)
    assert obs.startswith("What is ")
    with pytest.raises(ValueError, match="unknown env_config keys \\['sizes'\\]"):
        ReasoningEnv({"source": "arithmetic", "sizes": 4})
    with pytest.raises(ValueError, match="unknown source 'gsm8k'"):
        ReasoningEnv({"source": "gsm8k"})
