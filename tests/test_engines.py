"""One contract, both engines (vLLM's offline engine and transformers generate), on a tiny model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rllib_sppo.llm.assets import build_tiny_llama
from rllib_sppo import SPPOConfig
from rllib_sppo.llm.engines import ENGINES, Engine, GenerationConfig, make_engine
from rllib_sppo.torch.llm_rl_module import PolicyModel

PROMPTS = ["Q: What is 1+2?\nA: ", "Q: What is 33+44?\nA: "]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=1)


#: engine_kwargs the fixture's engines get (vLLM's go to vllm.LLM as they are; the transformers engine takes dtype).
ENGINE_KWARGS = {"transformers": {"dtype": "float32"}, "vllm": {"override_generation_config": {"top_k": 7}}}


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def engine(request, tiny):
    engine = make_engine(request.param, tiny, seed=0, **ENGINE_KWARGS[request.param])  # vLLM: the model's 256 positions
    yield engine
    del engine


def learner_logp(model, sample, temperature):
    """The learner's log-probs of the response tokens (its LM head on the response positions, 3 at a time)."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    scored = torch.zeros(1, ids.shape[1] - 1)
    scored[0, len(sample.prompt_ids) - 1:] = 1
    with torch.no_grad():
        logp, _ = PolicyModel(model, temperature, chunk=3, dtype=torch.float32)(ids, torch.ones_like(ids), scored)
    return logp[0, len(sample.prompt_ids) - 1:]


def test_samples_per_prompt_and_token_bookkeeping(engine, tiny):
    assert isinstance(engine, Engine) and ENGINES[engine.name] is type(engine)
    tok = AutoTokenizer.from_pretrained(tiny)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    groups = engine.generate(prompts, GenerationConfig(temperature=0.6, max_tokens=10, n=3))
    assert [len(g) for g in groups] == [3, 3]
    for prompt, group in zip(prompts, groups):
        for s in group:
            assert s.prompt_ids == prompt
            assert 1 <= len(s.response_ids) <= 10 and len(s.logp) == len(s.response_ids)
            assert tok.eos_token_id not in s.response_ids[:-1]  # nothing after the end of sequence
            assert s.text == tok.decode(s.response_ids, skip_special_tokens=True)
            assert all(lp <= 0 for lp in s.logp)


def test_engine_logp_is_the_learners_at_the_temperature(engine, tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    for temperature in (0.6, 1.0):
        for group in engine.generate(prompts, GenerationConfig(temperature=temperature, max_tokens=8)):
            s = group[0]
            assert torch.allclose(torch.tensor(s.logp), learner_logp(model, s, temperature), atol=2e-3)


def test_weights_update_in_place(engine, tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    prompts = [tok(PROMPTS[0], add_special_tokens=False)["input_ids"]]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    changed = {k: v + 0.05 * torch.randn_like(v) if v.dim() == 2 else v for k, v in original.items()}
    engine.update_weights(changed.items())
    model.load_state_dict(changed)
    s = engine.generate(prompts, GenerationConfig(max_tokens=8))[0][0]
    assert torch.allclose(torch.tensor(s.logp), learner_logp(model, s, 0.6), atol=2e-3)
    engine.update_weights(original.items())
    model.load_state_dict(original)
    s = engine.generate(prompts, GenerationConfig(max_tokens=8))[0][0]
    assert torch.allclose(torch.tensor(s.logp), learner_logp(model, s, 0.6), atol=2e-3)


def test_an_unknown_rollout_engine_is_refused_at_config_time_with_the_valid_names():
    with pytest.raises(ValueError, match=r"rollout_engine='vlm'; choose one of \['transformers', 'vllm'\]"):
        SPPOConfig().environment("OutcomeCartPole-v1").training(rollout_engine="vlm").validate()


def test_enforce_eager_is_a_config_key_off_on_gpus_and_on_on_cpus():
    """vLLM captures CUDA graphs on a GPU unless enforce_eager is set; on a CPU it runs eagerly; one place sets it."""
    from rllib_sppo.llm.engines import eager

    assert eager(None, cuda=True) is False and eager(None, cuda=False) is True
    assert eager(True, cuda=True) is True and eager(False, cuda=True) is False
    config = SPPOConfig().environment("OutcomeCartPole-v1")
    with pytest.raises(ValueError, match="engine_kwargs sets enforce_eager: set the config key enforce_eager"):
        config.copy().training(engine_kwargs={"enforce_eager": False}).validate()
    with pytest.raises(ValueError, match="enforce_eager='yes': True, False or None"):
        config.copy().training(enforce_eager="yes").validate()


def test_engine_kwargs_reach_the_engine_and_a_name_it_does_not_take_is_refused(engine, tiny):
    """vLLM gets engine_kwargs as they are (the fixture's default top_k, which the engine's explicit sampling
    parameters override) and refuses a name it does not have; the transformers engine takes dtype alone, and a config
    giving it another key (vLLM's max_model_len) is refused when it is validated. Keys the runner sets from config keys
    are refused in engine_kwargs for either engine."""
    config = SPPOConfig().llm(policy=tiny, engine=engine.name).environment(
        "ReasoningBandit-v0", env_config={"source": "arithmetic", "chat_template_model": tiny})
    config.copy().training(engine_kwargs=ENGINE_KWARGS[engine.name]).validate()
    if engine.name == "vllm":
        assert engine.llm.get_default_sampling_params().top_k == 7
        with pytest.raises(TypeError, match="max_num_seqz"):
            make_engine("vllm", tiny, max_num_seqz=4)
    else:
        with pytest.raises(ValueError, match=r"engine_kwargs sets \['max_model_len'\], which the transformers engine "
                                             r"does not take \(it takes \['dtype'\]\): remove them"):
            config.copy().training(engine_kwargs={"max_model_len": 256}).validate()
        with pytest.raises(ValueError, match="gpu_memory_utilization=0.5 is vLLM's; the transformers engine has none"):
            config.copy().training(gpu_memory_utilization=0.5).validate()
    with pytest.raises(ValueError, match="engine_kwargs sets seed: set the config key seed instead"):
        config.copy().training(engine_kwargs={"seed": 3}).validate()
