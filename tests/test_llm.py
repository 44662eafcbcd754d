"""The LLM path for real: a tiny Llama the test builds, real transformers, real vLLM, real RLlib."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

import envs  # noqa: F401
from rllib_sppo import SPPOConfig
from rllib_sppo.connectors import CRITIC_MASK, VALUES_OLD, SequenceAdvantage
from rllib_sppo.core import ppo_clip_loss
from rllib_sppo.llm.assets import build_tiny_llama
from rllib_sppo.llm.connectors import TokenBatch
from rllib_sppo.llm.evaluation import heldout_report
from rllib_sppo.llm.runner import LLMEnvRunner
from rllib_sppo.private_api import local_learner
from rllib_sppo.torch.llm_rl_module import SPPOLLMModule

TEXT = gym.spaces.Text(64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=0)


def episode(tok, prompt, response, reward, data_source="arithmetic"):
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return SingleAgentEpisode(
        observations=[prompt, prompt], actions=[response], rewards=[reward], terminated=True,
        infos=[{}, {"data_source": data_source}], len_lookback_buffer=0,
        extra_model_outputs={"prompt_ids": [np.array(p)], "response_ids": [np.array(r)],
                             "engine_logp": [np.zeros(len(r), np.float32)]})


def module_and_batch(tiny, eps, estimator="sppo", module=None, critic_loss="bce"):
    module = module or SPPOLLMModule(observation_space=TEXT, action_space=TEXT, model_config={"policy": tiny})
    rl_module = {DEFAULT_MODULE_ID: module}
    batch = TokenBatch()(rl_module=rl_module, episodes=eps, batch={})
    batch = SequenceAdvantage(estimator=estimator, critic_loss=critic_loss)(rl_module=rl_module, episodes=eps,
                                                                              batch=batch)
    return module, batch[DEFAULT_MODULE_ID]


def test_critic_reads_only_the_prompt(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    eps = [episode(tok, "Q: What is 2+2?\nA: ", r, 1.0) for r in ("\\boxed{4}", "I think it is 5, no, 7")]
    module, batch = module_and_batch(tiny, eps)
    torch.nn.init.normal_(module.value_head.weight)  # a critic that is not constant
    with torch.no_grad():
        values = module.compute_values(batch)
    assert torch.allclose(values[0], values[1], atol=1e-5)  # same prompt, different responses: same value
    prompt_len = len(tok("Q: What is 2+2?\nA: ", add_special_tokens=False)["input_ids"])
    assert batch["critic_attention_mask"].sum(-1).tolist() == [prompt_len, prompt_len]
    other = module_and_batch(tiny, [episode(tok, "Q: What is 9+9?\nA: ", "\\boxed{4}", 0.0)])[1]
    with torch.no_grad():
        assert module.compute_values(other)[0] != values[0]


def test_advantage_is_broadcast_to_response_tokens(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    eps = [episode(tok, "Q: 1+1?\nA: ", "\\boxed{2}", 1.0), episode(tok, "Q: 3+4?\nA: ", "\\boxed{9}", 0.0)]
    module, batch = module_and_batch(tiny, eps)
    # A zero-initialised value head predicts p = 0.5: A = R - 0.5, with no standardisation.
    assert batch[Columns.ADVANTAGES].tolist() == [0.5, -0.5]
    assert batch["response_mask"].sum(-1).tolist() == [10, 10]  # "\boxed{x}" + eos
    # ratio 1 everywhere: the loss is minus the token-mean of the broadcast advantage.
    loss, _ = ppo_clip_loss(batch["old_logp"], batch["old_logp"], batch[Columns.ADVANTAGES],
                            batch["response_mask"])
    assert loss.item() == pytest.approx(-(10 * 0.5 + 10 * -0.5) / 20)
    # The learner's recomputed old log-probs sit exactly on the response tokens.
    assert (batch["old_logp"][batch["response_mask"] == 0] == 0).all()
    assert (batch["old_logp"][batch["response_mask"] == 1] < 0).all()


def test_critic_init_sets_the_first_baseline(tiny):
    from transformers import AutoTokenizer

    from rllib_sppo import SPPOConfig

    tok = AutoTokenizer.from_pretrained(tiny)
    eps = [episode(tok, "Q: 1+1?\nA: ", "\\boxed{2}", 1.0), episode(tok, "Q: 3+4?\nA: ", "\\boxed{9}", 0.0)]
    config = SPPOConfig().training(critic_init=0.2).rl_module(model_config={"policy": tiny})
    module = SPPOLLMModule(observation_space=TEXT, action_space=TEXT, model_config=config.model_config)
    module, batch = module_and_batch(tiny, eps, module=module)
    assert batch[Columns.ADVANTAGES].tolist() == pytest.approx([0.8, -0.2])  # A = R - 0.2, not R - 0.5
    with pytest.raises(ValueError, match="critic_init=1.5 is a probability"):
        SPPOConfig().training(critic_init=1.5).validate()


def word_level_critic(path):
    """A one-layer Llama critic with a word-level tokenizer of its own."""
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "<pad>": 1, **{w: i + 2 for i, w in enumerate("Q: What is 2+2? A:".split())}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>").save_pretrained(path)
    LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           vocab_size=len(words))).save_pretrained(path)
    return str(path)


def test_critic_with_another_tokenizer_retokenises_the_prompt(tiny, tmp_path):
    from transformers import AutoTokenizer

    module = SPPOLLMModule(observation_space=TEXT, action_space=TEXT,
                           model_config={"policy": tiny, "critic": word_level_critic(tmp_path)})
    assert not module.same_tokenizer
    ids = module.critic_inputs(["Q: What is 2+2?\nA: "], [[1, 2, 3]])
    assert ids == [[2, 3, 4, 5, 6]]  # word-level ids of the critic's own tokenizer
    policy_tok = AutoTokenizer.from_pretrained(tiny)
    eps = [episode(policy_tok, "Q: What is 2+2?\nA: ", "\\boxed{4}", 1.0)]
    batch = TokenBatch()(rl_module={DEFAULT_MODULE_ID: module}, episodes=eps, batch={})[DEFAULT_MODULE_ID]
    assert batch["critic_input_ids"].tolist() == [[2, 3, 4, 5, 6]]
    assert module.compute_values(batch).shape == (1,)


def test_token_level_ppo_refuses_a_critic_with_another_tokenizer(tiny, tmp_path):
    with pytest.raises(ValueError, match="another tokenizer than the policy.*cannot be aligned"):
        SPPOLLMModule(observation_space=TEXT, action_space=TEXT,
                      model_config={"policy": tiny, "critic": word_level_critic(tmp_path), "critic_kind": "token"})


def test_token_level_ppo_reads_the_critic_at_every_response_token(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    prompts = ["Q: 1+1?\nA: ", "Q: 3+4?\nA: "]
    eps = [episode(tok, prompts[0], "\\boxed{2}", 1.0), episode(tok, prompts[1], "\\boxed{9}", 0.0)]
    module = SPPOLLMModule(observation_space=TEXT, action_space=TEXT,
                           model_config={"policy": tiny, "critic_kind": "token"})
    torch.nn.init.normal_(module.value_head.weight)  # a critic that is not constant
    module, batch = module_and_batch(tiny, eps, estimator="ppo", module=module, critic_loss="mse")
    mask = batch["response_mask"]
    with torch.no_grad():
        values = module.compute_token_values(batch)
    assert values.shape == mask.shape and torch.equal(batch[CRITIC_MASK], mask)
    assert torch.equal(batch[VALUES_OLD], values * mask)  # the critic before the update, for the clipped loss
    # Causal critic: at the first response position it has read exactly the prompt (as a sequence critic would).
    starts = [len(tok(p, add_special_tokens=False)["input_ids"]) - 1 for p in prompts]
    seq_module = SPPOLLMModule(observation_space=TEXT, action_space=TEXT, model_config={"policy": tiny})
    seq_module.load_state_dict(module.state_dict())
    _, seq_batch = module_and_batch(tiny, eps, module=seq_module)
    with torch.no_grad():
        assert torch.allclose(values[[0, 1], starts], seq_module.compute_values(seq_batch), atol=1e-5)
    # As verl: gamma = lambda = 1, so the GAE advantage is R - V_t on every response token, then whitened over the
    # batch's tokens (mean 0, unbiased std 1), 0 elsewhere; the critic's targets are the returns, R.
    outcome = torch.tensor([[1.0], [0.0]])
    raw = (outcome - values) * mask
    mean = raw.sum() / mask.sum()
    std = (((raw - mean) ** 2 * mask).sum() / (mask.sum() - 1)).sqrt()
    assert torch.allclose(batch[Columns.ADVANTAGES], (raw - mean) / std * mask, atol=1e-5)
    assert torch.allclose(batch[Columns.VALUE_TARGETS], outcome * mask, atol=1e-6)


def llm_config(tiny, engine, **training):
    defaults = dict(lr=1e-3, critic_lr=1e-3, train_batch_size_per_learner=16, minibatch_size=8,
                    max_response_tokens=12)
    return (SPPOConfig().llm(policy=tiny, engine=engine)
            .environment("ReasoningBandit-v0", env_config={"source": "arithmetic", "size": 300, "heldout_size": 20,
                                                           "chat_template_model": tiny})
            .env_runners(num_env_runners=0, num_envs_per_env_runner=16)
            .training(**{**defaults, **training})
            .evaluation(evaluation_interval=2)
            .debugging(seed=0))


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_sppo_iterations_sync_weights_into_the_engine(tiny, engine, ray_session, tmp_path):
    from transformers import AutoModelForCausalLM

    # half_credit pays 1 on the even-numbered problems and 0.5 on the others, whatever the answer: the held-out
    # accuracy (fully correct answers only) is the share of even-numbered held-out problems, known in advance.
    algo = llm_config(tiny, engine).environment(env_config={
        "source": "arithmetic", "size": 300, "heldout_size": 20, "chat_template_model": tiny,
        "reward_fn": "test_llm.half_credit"}).build_algo()
    even = np.mean([r["extra_info"]["index"] % 2 == 0 for r in algo.env_runner.env.splits["heldout"].records])
    results = [algo.train() for _ in range(3)]
    learner = results[-1]["learners"][DEFAULT_MODULE_ID]
    runners = results[-1]["env_runners"]
    assert np.isfinite(learner["policy/loss"]) and np.isfinite(learner["critic/loss"])
    assert learner["policy/approx_kl"] != 0.0  # the policy moved
    # Right after each sync the engine's log-probs match the learner's on the same tokens.
    assert all(r["learners"][DEFAULT_MODULE_ID]["rollout/engine_logp_gap"] < 1e-3 for r in results)
    assert runners["rollout/weight_sync_bytes"] > 1e6 and runners["timing_s/weight_sync"] > 0
    assert runners["rollout/tokens_per_s"] > 0
    evaluation = results[1]["evaluation"]["env_runners"]
    assert evaluation["problems"] == 20 and 0 < even < 1
    assert evaluation["accuracy/avg@4"] == evaluation["accuracy/pass@4"] == pytest.approx(even)
    assert evaluation["reward/avg@4"] == pytest.approx(even + 0.5 * (1 - even))
    # The checkpoint holds the policy as a Hugging Face folder that transformers loads.
    path = algo.save_to_path(str(tmp_path / "ckpt"))
    algo.stop()
    hf = next((tmp_path / "ckpt").rglob("hf_policy"))
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert sum(p.numel() for p in model.parameters()) > 1e6 and path


def test_grpo_builds_and_runs_no_critic(tiny, ray_session):
    """A critic-free estimator's module has no critic (no parameters, no network, no optimizer), so an update cannot
    run one; the learner logs no critic metric. The group baseline centres each prompt's samples."""
    algo = llm_config(tiny, "transformers", advantage_estimator="grpo", samples_per_prompt=4,
                      train_batch_size_per_learner=16).build_algo()
    learner_obj = local_learner(algo.learner_group)
    module = learner_obj.module[DEFAULT_MODULE_ID].unwrapped()
    names = [n for n, _ in module.named_parameters()]
    assert names and all(n.startswith("policy.") for n in names)
    assert module.critic_parameters() == [] and set(module.networks()) == {"policy"}
    assert [name for name, _ in learner_obj.get_optimizers_for_module(DEFAULT_MODULE_ID)] == ["policy"]
    result = algo.train()
    algo.stop()
    learner = result["learners"][DEFAULT_MODULE_ID]
    assert result["env_runners"]["num_env_steps_sampled"] == 16  # 4 prompts x 4 samples
    assert not [k for k in learner if k.startswith("critic/")] and learner["policy/approx_kl"] != 0.0
    assert abs(learner["policy/advantage_mean"]) < 1e-5  # group-centred


def test_token_level_ppo_runs_on_the_same_runner_and_learner(tiny, ray_session):
    from transformers import AutoTokenizer

    # verl's PPO: an mse critic (here starting at V = 0.3, so that it has something to learn from the untrained
    # policy's 0 rewards), its loss clipped 0.5 around the values before the update.
    config = llm_config(tiny, "transformers", advantage_estimator="ppo", critic_init=0.3)
    assert (config.resolved_critic_loss, config.resolved_value_clip) == ("mse", 0.5)
    algo = config.evaluation(evaluation_interval=None).build_algo()
    results = [algo.train() for _ in range(2)]
    learner = results[-1]["learners"][DEFAULT_MODULE_ID]
    assert np.isfinite(learner["policy/loss"]) and np.isfinite(learner["critic/loss"]) and learner["critic/loss"] > 0
    assert learner["policy/approx_kl"] != 0.0  # the policy moved
    # The trained per-token critic gives different advantages to different tokens of one response.
    [module] = [r.get() for r in algo.learner_group.foreach_learner(lambda l: l.module[DEFAULT_MODULE_ID].unwrapped())]
    algo.stop()
    tok = AutoTokenizer.from_pretrained(tiny)
    _, batch = module_and_batch(tiny, [episode(tok, "Q: 1+1?\nA: ", "\\boxed{2}", 1.0)], "ppo", module, "mse")
    adv = batch[Columns.ADVANTAGES][batch["response_mask"] == 1]
    assert len(adv) == 10 and adv.std() > 1e-4, adv


def test_token_level_ppo_config_is_validated(tiny):
    config = llm_config(tiny, "transformers", advantage_estimator="ppo")
    assert config.model_config["critic_kind"] == "token"  # the module is told to build a per-token critic
    with pytest.raises(ValueError, match="SPPOMLPModule has none. For classic control, RLlib's own PPO"):
        SPPOConfig().environment("OutcomeCartPole-v1").training(advantage_estimator="ppo").validate()
    # gamma and lambda_ apply to token-level PPO only
    with pytest.raises(ValueError, match="only advantage_estimator='ppo' discounts"):
        llm_config(tiny, "transformers", gamma=0.99).validate()
    with pytest.raises(ValueError, match="lambda_=0.95: only"):
        llm_config(tiny, "transformers", advantage_estimator="grpo", samples_per_prompt=4, lambda_=0.95).validate()
    llm_config(tiny, "transformers", advantage_estimator="ppo", gamma=0.99, lambda_=0.95).validate()
    with pytest.raises(ValueError, match="need 0 < gamma <= 1"):
        llm_config(tiny, "transformers", advantage_estimator="ppo", lambda_=1.5).validate()


def test_rewards_outside_0_1_name_their_data_source(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    eps = [episode(tok, "Q: 1+1?\nA: ", "\\boxed{2}", -1.0, data_source="my_verifier_pm1")]
    with pytest.raises(ValueError, match=r"outcomes in \[0, 1\], got \[-1.0\].*data_source \['my_verifier_pm1'\]"):
        module_and_batch(tiny, eps)


def test_model_directories_are_checked(tiny, tmp_path):
    from rllib_sppo.llm.models import resolve_model

    assert resolve_model(tiny) == tiny
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        resolve_model(str(tmp_path / "weights_only"))
    with pytest.raises(ValueError, match="builtin:tiny-arith"):
        resolve_model("builtin:gpt5")


def prompts(episodes):
    return [e.get_observations(0) for e in episodes]


def test_each_training_prompt_is_drawn_once_per_epoch(tiny):
    """24 training prompts, 5 per sampling round: an epoch poses each exactly once, the next one reshuffled; two
    EnvRunners draw disjoint shards that together are the epoch."""
    config = (llm_config(tiny, "transformers", max_response_tokens=2)
              .environment(env_config={"source": "arithmetic", "size": 30, "heldout_size": 6,
                                       "chat_template_model": tiny})
              .env_runners(num_envs_per_env_runner=5))
    runner = LLMEnvRunner(config=config)
    train = runner.env.splits["train"].texts
    epoch = prompts(runner.sample(num_episodes=24))
    assert len(train) == 24 and sorted(epoch) == sorted(train)
    assert runner.get_metrics()["rollout/epoch"] == 1.0
    following = prompts(runner.sample(num_episodes=24))
    assert sorted(following) == sorted(train) and following != epoch
    runner.stop()

    config = config.copy(copy_frozen=False).env_runners(num_env_runners=2)
    runners = [LLMEnvRunner(config=config, worker_index=i) for i in (1, 2)]  # remote runners are workers 1, 2
    shards = [prompts(runner.sample(num_episodes=12)) for runner in runners]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == sorted(train)
    for runner in runners:
        runner.stop()
    with pytest.raises(ValueError, match="LLMEnvRunner trains on the train split"):
        LLMEnvRunner(config=config.environment(env_config={"source": "arithmetic", "size": 30, "split": "heldout"}))


def test_sampler_shards_an_uneven_epoch_and_resumes():
    from rllib_sppo.llm.sampler import EpochSampler

    shards = [EpochSampler(7, seed=3, shard=i, num_shards=3) for i in range(3)]
    drawn = [shard.draw(3 - (i > 0)) for i, shard in enumerate(shards)]
    assert [len(d) for d in drawn] == [3, 2, 2] and sorted(sum(drawn, [])) == list(range(7))
    assert [shard.progress for shard in shards] == [1.0, 1.0, 1.0]
    resumed = EpochSampler(7, seed=3, shard=1, num_shards=3)
    resumed.set_state(shards[1].get_state())
    assert resumed.draw(5) == shards[1].draw(5)  # two epochs on, reshuffled each time
    with pytest.raises(ValueError, match="2 training prompts cannot be shared by 3 EnvRunners"):
        EpochSampler(2, num_shards=3)


def half_credit(completions, index, **_):
    """1.0 on the even-numbered arithmetic problems, 0.5 (partial credit) on the others, whatever the answer."""
    return [1.0 if i % 2 == 0 else 0.5 for i in index]


def test_heldout_accuracy_counts_only_fully_correct_answers(tiny):
    config = llm_config(tiny, "transformers", max_response_tokens=2).environment(env_config={
        "source": "arithmetic", "size": 40, "heldout_size": 10, "chat_template_model": tiny,
        "reward_fn": "test_llm.half_credit"})
    runner = LLMEnvRunner(config=config)
    even = np.array([r["extra_info"]["index"] % 2 == 0 for r in runner.env.splits["heldout"].records])
    samples = runner.heldout_samples(3)
    result = heldout_report(samples)
    # the completions: k strings per problem, in the problems' order (half_credit scores by index only, so rescoring
    # them checks that order, not their text)
    completions = samples["completions"]
    assert [len(c) for c in completions] == [3] * 10 and all(isinstance(t, str) for c in completions for t in c)
    rescored, _ = runner.env.score([i for i in range(10) for _ in range(3)], [t for c in completions for t in c],
                                   split="heldout")
    runner.stop()
    assert np.array_equal(np.reshape(rescored, (10, 3)), samples["rewards"])
    assert result["problems"] == 10 and 0 < even.mean() < 1
    assert result["accuracy/avg@3"] == result["accuracy/pass@3"] == pytest.approx(even.mean())
    assert result["reward/avg@3"] == pytest.approx(even.mean() + 0.5 * (1 - even.mean()))


def test_resume_continues_the_data_order_across_an_epoch(tiny, ray_session, tmp_path):
    """1 + 2 iterations straight and 1, save, restore, 2 draw the same prompts: 20 training problems, 16 drawn per
    iteration in rounds of 8; the epoch ends in iteration 2, after the checkpoint, and again in iteration 3."""
    from ray.rllib.algorithms.algorithm import Algorithm

    def place(algo):  # the sampler's epoch, position and this epoch's order
        sampler = algo.env_runner.sampler
        return sampler.epoch, sampler.pos, sampler._order.tolist()

    config = (llm_config(tiny, "transformers").evaluation(evaluation_interval=None)
              .environment(env_config={"source": "arithmetic", "size": 24, "heldout_size": 4,
                                       "chat_template_model": tiny})
              .env_runners(num_envs_per_env_runner=8))
    algo = config.build_algo()
    algo.train()
    path, before = algo.save_to_path(str(tmp_path / "ckpt")), place(algo)
    straight = [(algo.train(), place(algo))[1] for _ in range(2)]
    algo.stop()
    resumed = Algorithm.from_checkpoint(path)
    assert place(resumed) == before
    assert [(resumed.train(), place(resumed))[1] for _ in range(2)] == straight
    resumed.stop()
    assert before[:2] == (0, 16) and [p[:2] for p in straight] == [(1, 12), (2, 8)]  # 48 = 20 + 20 + 8
    assert before[2] != straight[0][2] != straight[1][2]  # every epoch a new order


def test_llm_wires_the_pieces_and_validate_refuses_a_mismatched_set(tiny):
    from rllib_sppo.experiments import build_config, resolve_algorithm
    from rllib_sppo.llm.evaluation import heldout_accuracy

    config = SPPOConfig().environment("ReasoningBandit-v0").llm(policy=tiny, engine="transformers", dtype="bfloat16")
    assert config.env_runner_cls is LLMEnvRunner and config.rl_module_spec.module_class is SPPOLLMModule
    assert config.rl_module_spec.model_config == {"policy": tiny, "dtype": "bfloat16"}
    assert isinstance(config.learner_connector_instance(), TokenBatch)
    assert not config.add_default_connectors_to_learner_pipeline
    assert config.custom_evaluation_function is heldout_accuracy and config.rollout_engine == "transformers"
    config.validate()
    # The same from a YAML's config block, with a key beside it overriding what llm sets.
    yaml_config = build_config(resolve_algorithm("SPPO", "t.yaml"), "ReasoningBandit-v0",
                               {"llm": {"policy": tiny, "engine": "vllm"}, "rollout_engine": "transformers"}, "t.yaml")
    assert yaml_config.env_runner_cls is LLMEnvRunner and yaml_config.rollout_engine == "transformers"
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['dtpye'\]"):
        SPPOConfig().llm(policy=tiny, dtpye="bfloat16")
    fix = r"set them together with \.llm\(policy=\.\.\.\)"
    cases = [
        (SPPOConfig().environment("ReasoningBandit-v0").env_runners(env_runner_cls=LLMEnvRunner),
         "LLMEnvRunner and RLModule SPPOMLPModule do not fit together"),
        (SPPOConfig().llm(policy=tiny).learners(add_default_connectors_to_learner_pipeline=True),
         "TokenBatch learner connector alone"),
        (SPPOConfig().llm(policy=tiny).learners(learner_connector=None), "TokenBatch learner connector alone"),
        (SPPOConfig().llm(policy=tiny).evaluation(evaluation_interval=5, custom_evaluation_function=None),
         "evaluates the held-out split with custom_evaluation_function"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=f"{message}.*{fix}"):
            bad.validate()


def test_bf16_on_a_cpu_without_native_bf16_warns_with_the_fix(tiny, caplog, monkeypatch):
    """A bf16 learner on a CPU whose flags lack AVX512-BF16 and AMX-BF16 says so at build, with the fix (its update ran
    ~20x slower than on a CPU with them); one with either flag, a float32 learner and an unknown CPU say nothing."""
    from rllib_sppo.torch import llm_rl_module, sppo_torch_learner
    from rllib_sppo.torch.llm_rl_module import emulated_bf16

    zen3 = "flags\t\t: fpu sse2 avx avx2 fma bmi2 sha_ni vaes\n"
    assert emulated_bf16(zen3) and not emulated_bf16(zen3 + "flags : avx512f avx512_bf16\n")
    assert not emulated_bf16("flags : amx_bf16 amx_tile\n") and not emulated_bf16(None)

    def warnings_at_build(dtype, cpuinfo):
        monkeypatch.setattr(sppo_torch_learner, "read_cpuinfo", lambda: cpuinfo)
        caplog.clear()
        SPPOConfig().environment("ReasoningBandit-v0").llm(policy=tiny, engine="transformers", dtype=dtype) \
            .build_learner(env=None, spaces={DEFAULT_MODULE_ID: (gym.spaces.Text(8), gym.spaces.Text(8))})
        return [r.getMessage() for r in caplog.records if "native bfloat16" in r.getMessage()]

    assert llm_rl_module.read_cpuinfo() is None or "flags" in llm_rl_module.read_cpuinfo()
    [message] = warnings_at_build("bfloat16", zen3)
    assert "llm: {dtype: float32}" in message
    assert warnings_at_build("bfloat16", zen3 + "flags : avx512_bf16\n") == []
    assert warnings_at_build("float32", zen3) == [] and warnings_at_build("bfloat16", None) == []
