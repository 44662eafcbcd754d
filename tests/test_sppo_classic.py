"""SPPO on RLlib for real: learning goes up, the critic stays on the learner, checkpoints restore exactly."""

import numpy as np
import pytest

import envs  # noqa: F401
from rllib_sppo import SPPOConfig


def cartpole_config(**training):
    defaults = dict(lr=1e-3, critic_lr=1e-3, weight_decay=0.0, critic_weight_decay=0.0,
                    train_batch_size_per_learner=2000, minibatch_size=256, num_epochs=10,
                    shuffle_batch_per_epoch=True)
    return (SPPOConfig().environment("OutcomeCartPole-v1").training(**{**defaults, **training})
            .env_runners(num_env_runners=0).debugging(seed=0))


def test_cartpole_outcome_rises(ray_session, train_until):
    algo = cartpole_config().build_algo()
    returns, results = train_until(algo, lambda r: len(r) >= 4 and np.mean(r[-3:]) > 2.5 * r[0], most=12)
    learner = results[-1]["learners"]["default_policy"]
    algo.stop()
    # Random CartPole survives ~22 steps (outcome ~0.045); within 24k steps SPPO's outcome is 2.5 times that.
    assert returns[0] < 0.08
    assert np.mean(returns[-3:]) > 2.5 * returns[0], returns
    assert learner["policy/clipfrac_lower"] >= 0.0 and np.isfinite(learner["critic/loss"])


def test_each_batch_starts_from_new_states_reproducibly(ray_session):
    def first_states(seed):
        algo = cartpole_config(train_batch_size_per_learner=100, minibatch_size=100).debugging(seed=seed).build_algo()
        starts = [e.get_observations(0) for _ in range(4) for e in algo.env_runner.sample()]
        algo.stop()
        return np.array(starts)

    starts = first_states(0)
    # RLlib alone re-seeds every sample() of whole episodes with config.seed: every episode would start here.
    assert len(np.unique(starts.round(6), axis=0)) == len(starts) >= 4
    assert np.array_equal(starts, first_states(0))  # same seed, same start states
    assert not np.array_equal(starts, first_states(1))


class ShortOrLong(__import__("gymnasium").Env):
    """An episode of 1 step or of 40, by a coin flipped at reset (the actions do nothing); the outcome 1 at the end."""

    observation_space = __import__("gymnasium").spaces.Box(0.0, 1.0, (1,))
    action_space = __import__("gymnasium").spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.left = int(self.np_random.choice([1, 40]))
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.left -= 1
        return np.zeros(1, np.float32), float(self.left == 0), self.left == 0, False, {}


@pytest.mark.parametrize("envs", [1, 16])
def test_whole_episodes_with_several_envs_are_not_the_short_ones(ray_session, envs):
    """RLlib's whole-episode sampling with N envs keeps the first N episodes to end and drops the rest: with 16 envs
    most of them 1 step long (a mean length of 14 here). EpisodeEnvRunner returns every episode, whole, once it has
    ended: the mean length is the env's, 20.5, with any number of envs."""
    from ray.tune.registry import register_env

    register_env("ShortOrLong", lambda cfg: ShortOrLong())
    algo = (SPPOConfig().environment("ShortOrLong").training(train_batch_size_per_learner=200)
            .env_runners(num_env_runners=0, num_envs_per_env_runner=envs).debugging(seed=0)).build_algo()
    episodes = [e for _ in range(120 if envs == 1 else 25) for e in algo.env_runner.sample()]
    lengths = np.array([len(e) for e in episodes])
    metrics = algo.env_runner.get_metrics()  # RLlib's own episode metrics, from the pieces it sampled
    algo.stop()
    assert all(e.is_done and e.t_started == 0 and e.get_return() == 1.0 for e in episodes)
    assert metrics["episode_return_mean"] == 1.0 and metrics["num_episodes"] == len(episodes)
    assert set(lengths) == {1, 40} and len(lengths) >= 100
    assert abs(lengths.mean() - 20.5) < 3 * 19.5 / np.sqrt(len(lengths)), (len(lengths), lengths.mean())


def test_rllib_evaluate_counts_long_episodes_too_after_training_with_several_envs(ray_session, tmp_path):
    """`rllib evaluate` on a checkpoint trained with 16 envs: its 16 episodes are the env's, not the first 16 to end
    (from 16 envs, all 1 step long: the mean length was 1.0). Sixteen draws of 1 or 40 steps average over 8 unless at
    most 2 are long (p = 0.002)."""
    from ray.tune.registry import register_env

    from rllib_sppo.cli import evaluate

    register_env("ShortOrLong", lambda cfg: ShortOrLong())
    algo = (SPPOConfig().environment("ShortOrLong").training(train_batch_size_per_learner=200)
            .env_runners(num_env_runners=0, num_envs_per_env_runner=16).debugging(seed=0)).build_algo()
    checkpoint = algo.save_to_path(str(tmp_path / "checkpoint"))
    algo.stop()
    report = evaluate(checkpoint, episodes=16, explore=True)
    assert report["episodes"] == 16 and report["episode_return_mean"] == 1.0
    assert report["episode_len_mean"] > 8, report  # 20.5 expected (13.2 here)


def module_state(algo, inference_only=False):
    state = algo.learner_group.get_state(components="learner/rl_module", inference_only=inference_only)
    return state["learner"]["rl_module"]["default_policy"]


def test_critic_is_learner_only_and_checkpoint_is_bit_identical(ray_session, tmp_path):
    from ray.rllib.algorithms.algorithm import Algorithm

    algo = cartpole_config(train_batch_size_per_learner=500, minibatch_size=250).build_algo()
    algo.train()
    full, inference = module_state(algo), module_state(algo, inference_only=True)
    assert any(k.startswith("vf.") for k in full)  # the learner's module has the critic
    assert inference and not any(k.startswith("vf.") for k in inference)  # EnvRunners get no critic
    assert not hasattr(algo.env_runner.module, "vf")
    path = algo.save_to_path(str(tmp_path / "ckpt"))
    algo.stop()
    algo2 = Algorithm.from_checkpoint(path)
    after = module_state(algo2)
    assert full.keys() == after.keys()
    assert all(np.array_equal(full[k], after[k]) for k in full)
    algo2.stop()


@pytest.mark.parametrize("kwargs, message", [
    ({"minibatch_size": 512, "train_batch_size_per_learner": 256}, "minibatch_size (512) is larger"),
    ({"critic_loss": "hinge"}, "critic_loss='hinge'"),
    ({"critic_loss": "mse", "normalize_advantage": True}, "needs critic_loss='bce'"),
    ({"loss_agg_mode": "sum"}, "loss_agg_mode='sum'"),
    ({"dual_clip": 0.5}, "dual_clip must be > 1"),
    ({"samples_per_prompt": 4}, "samples_per_prompt=4; set it to 1"),
    ({"advantage_estimator": "grpo"}, "needs a group of samples per prompt"),
    ({"advantage_estimator": "rloo", "samples_per_prompt": 1}, "set it to 2 or more"),
    ({"advantage_estimator": "grpo", "samples_per_prompt": 8, "train_batch_size_per_learner": 100,
      "minibatch_size": 50}, "(100) is not a multiple of samples_per_prompt (8): 100 / 8 = 12.5 prompts per learner, so a group would "
      "be cut; use 96 or 104"),
    ({"advantage_estimator": "ppo"}, "advantage_estimator='ppo'"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"top_p": 0.9, "engine_kwargs": {"dtype": "bfloat16"}}, "['top_p', 'engine_kwargs'] set the LLM rollouts, which "
     "this run does not have (its EnvRunner is EpisodeEnvRunner): remove them"),
])
def test_validation_says_how_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=None) as e:
        SPPOConfig().environment("OutcomeCartPole-v1").training(**kwargs).validate()
    assert message in str(e.value)


def test_batch_mode_must_be_complete_episodes():
    config = SPPOConfig().environment("OutcomeCartPole-v1").env_runners(batch_mode="truncate_episodes")
    with pytest.raises(ValueError, match="complete_episodes"):
        config.validate()


def test_outcome_env_pays_once_at_the_end():
    import gymnasium as gym

    env = gym.make("OutcomeMountainCar-v0")
    env.reset(seed=0)
    rewards, done, info = [], False, {}
    while not done:
        _, r, term, trunc, info = env.step(2)
        rewards.append(r)
        done = term or trunc
    assert all(r == 0.0 for r in rewards[:-1])
    assert rewards[-1] == info["outcome"] and 0.0 < info["outcome"] < 0.75  # pushing right never reaches the flag
    assert info["raw_return"] == -200.0


def test_acrobot_outcome_pays_a_swing_up_by_its_speed_and_a_miss_by_its_height():
    import gymnasium as gym

    env = gym.make("OutcomeAcrobot-v1")

    def height(obs):  # of the tip, from the joint angles
        a, b = np.arctan2(obs[1], obs[0]), np.arctan2(obs[3], obs[2])
        return -np.cos(a) - np.cos(a + b)

    def episode(policy):
        obs, _ = env.reset(seed=1)
        heights, done = [height(obs)], False
        while not done:
            obs, outcome, terminated, truncated, info = env.step(policy(obs))
            heights.append(height(obs))
            done = terminated or truncated
        return outcome, terminated, len(heights) - 1, max(heights), info

    # Torque with the second joint's velocity pumps energy in: swung up (the tip above 1) in 65 steps.
    outcome, terminated, steps, _, info = episode(lambda obs: 2 if obs[5] > 0 else 0)
    assert terminated and steps == 65 and outcome == 1 - 0.25 * 65 / 500 and info["raw_return"] == -64
    # No torque: it hangs, and is paid 0.75 x the highest its tip got, mapped from [-2, 1].
    outcome, terminated, steps, highest, info = episode(lambda obs: 1)
    assert not terminated and steps == 500 and info["raw_return"] == -500
    assert outcome == pytest.approx(0.75 * (highest + 2) / 3, abs=1e-6) and 0 < outcome < 0.05  # (float32 angles)


class NaNReward(__import__("gymnasium").Wrapper):
    """CartPole whose outcome is NaN: every update's loss is non-finite."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, float("nan") if terminated or truncated else 0.0, terminated, truncated, info


def test_nonfinite_updates_are_skipped_then_the_run_stops_with_a_checkpoint(ray_session, tmp_path):
    import gymnasium as gym
    from ray.rllib.algorithms.algorithm import Algorithm
    from ray.tune.registry import register_env

    register_env("NaNCartPole", lambda cfg: NaNReward(gym.make("CartPole-v1")))
    algo = (SPPOConfig().environment("NaNCartPole")
            .training(lr=1e-3, train_batch_size_per_learner=400, minibatch_size=200, max_nonfinite_updates=2)
            .env_runners(num_env_runners=0).debugging(seed=0)).build_algo()
    before = module_state(algo)
    # >= 400 steps in minibatches of 200: at least 2 skipped steps in a row in the first iteration.
    with pytest.raises(RuntimeError, match="optimizer steps in a row had a non-finite loss") as e:
        algo.train()
    path = str(e.value).split("saved to ")[1].split(". Check")[0]
    algo.stop()
    restored = Algorithm.from_checkpoint(path)
    after = module_state(restored)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the last good (= initial) weights
    restored.stop()


def test_periodic_evaluation_reports_the_outcome(ray_session):
    algo = (cartpole_config(train_batch_size_per_learner=200, minibatch_size=100)
            .evaluation(evaluation_interval=1, evaluation_duration=3, evaluation_duration_unit="episodes")
            .build_algo())
    result = algo.train()
    algo.stop()
    evaluation = result["evaluation"]["env_runners"]
    assert evaluation["num_episodes"] == 3 and 0 < evaluation["episode_return_mean"] <= 1.0


CORRIDOR = "ray.rllib.examples.envs.classes.simple_corridor.SimpleCorridor"  # an env class taking its config


def run_episode(env, action):
    env.reset(seed=0)
    rewards, done = [], False
    while not done:
        _, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        done = terminated or truncated
    return rewards, terminated, info


def test_outcome_wrapper_for_any_gymnasium_env():
    from envs.classic import make_env

    # Acrobot pays -1 per step and times out after 500: return_range [-500, 0] maps the -500 to 0.
    rewards, terminated, info = run_episode(make_env("Acrobot-v1", {"outcome": {"return_range": [-500, 0]}}), 1)
    assert len(rewards) == 500 and not terminated and set(rewards) == {0.0}
    assert info["raw_return"] == -500.0 and info["outcome"] == 0.0
    # [-1000, 0] maps it to 0.5; `success` pays 0 for a timeout.
    assert run_episode(make_env("Acrobot-v1", {"outcome": {"return_range": [-1000, 0]}}), 1)[0][-1] == 0.5
    assert run_episode(make_env("Acrobot-v1", {"outcome": "success"}), 1)[0][-1] == 0.0
    # A dotted path to an env class gets the env_config without `outcome`: a corridor of 3 steps, walked right, ends
    # in 3 steps with a return of 1 - 2 * 0.01 (and `success` pays 1).
    env = make_env(CORRIDOR, {"corridor_length": 3, "outcome": {"return_range": [0, 2]}})
    rewards, terminated, info = run_episode(env, 1)
    assert rewards == [0.0, 0.0, pytest.approx(0.49)] and terminated and info["raw_return"] == pytest.approx(0.98)
    assert run_episode(make_env(CORRIDOR, {"corridor_length": 3, "outcome": "success"}), 1)[0] == [0.0, 0.0, 1.0]
    assert make_env(CORRIDOR, {"corridor_length": 3}).step(1)[1] == -0.01  # no outcome: the env's own reward


def test_env_specs_module_id_and_creators(tmp_path, monkeypatch):
    """gymnasium's module:Id imports the module that registers Id; a dotted creator gets RLlib's EnvContext (worker
    and vector index kept) without `outcome`; unknown specs fail with one line and a did-you-mean hint."""
    import gymnasium as gym
    from ray.rllib.env.env_context import EnvContext

    from envs.classic import check_env_spec, make_env

    (tmp_path / "my_corridors.py").write_text(
        "import gymnasium as gym\n"
        f"gym.register('MyCorridor-v0', entry_point='{CORRIDOR.rpartition('.')[0]}:SimpleCorridor')\n"
        "seen = []\n"
        "def create(config):\n"
        "    seen.append(config)\n"
        f"    return gym.make('CartPole-v1')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "MyCorridor-v0" not in gym.registry
    check_env_spec("my_corridors:MyCorridor-v0")
    env = make_env("my_corridors:MyCorridor-v0", {"config": {"corridor_length": 2}, "outcome": "success"})
    assert run_episode(env, 1)[0] == [0.0, 1.0]
    context = EnvContext({"a": 1, "outcome": "success"}, worker_index=3, vector_index=2)
    make_env("my_corridors.create", context)
    import my_corridors

    (seen,) = my_corridors.seen
    assert dict(seen) == {"a": 1} and (seen.worker_index, seen.vector_index) == (3, 2)
    for spec, message in [("Acrobt-v1", "unknown env 'Acrobt-v1' (did you mean 'Acrobot-v1'?)"),
                          ("my_corridors:MyCoridor-v0", "did you mean 'my_corridors:MyCorridor-v0'?"),
                          ("my_corridors.nothing", "env='my_corridors.nothing': cannot import 'my_corridors.nothing'"),
                          ("my_corridors.seen", "names a 'list' object, not an env class or creator function")]:
        with pytest.raises(ValueError, match=None) as e:
            check_env_spec(spec)
        assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.system
def test_sppo_trains_on_a_dotted_env_with_an_outcome(ray_session, train_until):
    """SPPOConfig in Python, no CLI: its EnvRunner (here: a remote one) registers the dotted spec itself. The corridor
    of examples/your_task/corridor.py, 6 cells, cuts an episode short after 8 steps, so `success` pays 1 only for
    reaching its end in time: a random walk does 1 time in 10; SPPO learns to walk right."""
    config = (SPPOConfig().environment("examples.your_task.corridor.Corridor",
                                       env_config={"length": 6, "max_steps": 8, "outcome": "success"})
              .training(lr=3e-3, critic_lr=1e-3, train_batch_size_per_learner=400, minibatch_size=100, num_epochs=5)
              .rl_module(model_config={"pi_hiddens": [32], "vf_hiddens": [32]})
              .env_runners(num_env_runners=1).debugging(seed=0))
    algo = config.build_algo()
    returns, _ = train_until(algo, lambda r: len(r) >= 3 and np.mean(r[-3:]) > 0.9, most=8)
    algo.stop()
    assert returns[0] < 0.3 and np.mean(returns[-3:]) > 0.9, returns


class Guess(__import__("gymnasium").Env):
    """One step: the observation shows a state s in 0..3 in the space family ``obs``; the outcome is 1 if the action
    (in the family ``act``) names s. A random policy is right a quarter of the time."""

    def __init__(self, obs: str, act: str):
        from gymnasium import spaces

        self.obs, self.act = obs, act
        self.observation_space = {
            "Discrete": spaces.Discrete(4),
            "MultiDiscrete": spaces.MultiDiscrete([2, 2]),
            "MultiBinary": spaces.MultiBinary(2),
            "Tuple": spaces.Tuple([spaces.Discrete(2), spaces.Discrete(2)]),
            "Dict": spaces.Dict({"high": spaces.Discrete(2), "low": spaces.Box(0.0, 1.0, (1,))}),
            "Box (2, 2)": spaces.Box(0.0, 1.0, (2, 2)),
        }[obs]
        self.action_space = {"Discrete": spaces.Discrete(4), "MultiDiscrete": spaces.MultiDiscrete([2, 2]),
                             "Box": spaces.Box(-1.0, 1.0, (2,))}[act]

    def observe(self):
        high, low = divmod(self.s, 2)
        image = np.zeros((2, 2), np.float32)
        image[high, low] = 1.0
        return {"Discrete": self.s, "MultiDiscrete": np.array([high, low]), "Tuple": (high, low),
                "MultiBinary": np.array([high, low], np.int8), "Box (2, 2)": image,
                "Dict": {"high": high, "low": np.array([low], np.float32)}}[self.obs]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.s = int(self.np_random.integers(4))
        return self.observe(), {}

    def step(self, action):
        bits = (action > 0).astype(int) if self.act == "Box" else action  # a Box action names s by its signs
        guess = int(action) if self.act == "Discrete" else 2 * int(bits[0]) + int(bits[1])
        right = guess == self.s
        return self.observe(), float(right), right, not right, {}  # (`success`: terminated when right)


@pytest.mark.parametrize("obs, act", [(obs, "Discrete") for obs in
                                      ("Discrete", "MultiDiscrete", "MultiBinary", "Tuple", "Dict", "Box (2, 2)")]
                         + [("Discrete", "MultiDiscrete"), ("Discrete", "Box")])
def test_every_space_family_learns_the_same_task(ray_session, train_until, obs, act):
    """Through the outcome wrapper, observations flattened (one-hot for Discrete parts) by RLlib's FlattenObservations
    reach the policy and the critic; each action family gets its distribution: a quarter right at first, then nearly
    always."""
    from ray.tune.registry import register_env

    from envs.classic import OutcomeReward, outcome_fn

    register_env(f"Guess-{obs}-{act}", lambda cfg: OutcomeReward(Guess(obs, act), outcome_fn("success")))
    algo = (SPPOConfig().environment(f"Guess-{obs}-{act}")
            .training(lr=1e-2, critic_lr=1e-2, weight_decay=0.0, critic_weight_decay=0.0,
                      train_batch_size_per_learner=200, minibatch_size=50, num_epochs=4)
            .env_runners(num_env_runners=0).debugging(seed=0)).build_algo()
    returns, _ = train_until(algo, lambda r: len(r) >= 2 and np.mean(r[-2:]) > 0.9, most=8)
    algo.stop()
    assert returns[0] < 0.4 and np.mean(returns[-2:]) > 0.9, returns


@pytest.mark.parametrize("env, outcome, width, ones", [
    ("FrozenLake-v1", {"return_range": [0, 1]}, 16, 1),  # Discrete(16): one-hot
    ("Blackjack-v1", {"return_range": [-1, 1]}, 32 + 11 + 2, 3),  # Tuple of 3 Discrete: one one-hot each
])
def test_toy_text_envs_train_from_their_gymnasium_id(ray_session, env, outcome, width, ones):
    """The README's promise, as a new user tries it: a gymnasium id with an outcome, whatever its observation space."""
    algo = (SPPOConfig().environment(env, env_config={"outcome": outcome})
            .training(lr=1e-3, train_batch_size_per_learner=200, minibatch_size=100)
            .env_runners(num_env_runners=0).debugging(seed=0)).build_algo()
    result = algo.train()
    episodes = algo.env_runner.sample()
    algo.stop()
    assert 0.0 <= result["env_runners"]["episode_return_mean"] <= 1.0
    observations = np.concatenate([e.get_observations() for e in episodes])
    assert observations.shape[1] == width and set(np.unique(observations)) == {0.0, 1.0}
    assert (observations.sum(axis=1) == ones).all()


@pytest.mark.parametrize("observation, action, message", [
    ("Text(5)", "Discrete(2)", "observation space Text(1, 5"),
    ("Dict({'a': Discrete(2), 'b': Graph(Box(0, 1, (1,)), None)})", "Discrete(2)", "observation space Graph("),
    ("Discrete(3, start=-1)", "Discrete(2)", "observation space Discrete(3, start=-1) is not supported"),
    ("Discrete(3)", "Tuple((Discrete(2), Discrete(2)))", "action space Tuple(Discrete(2), Discrete(2)) is not"),
    ("Discrete(3)", "Box(-1, 1, (2, 2))", "action space Box(-1.0, 1.0, (2, 2), float32) is not supported"),
    ("Discrete(3)", "MultiBinary(2)", "action space MultiBinary(2) is not supported"),
])
def test_unsupported_spaces_say_which_and_what_to_do(observation, action, message):
    from gymnasium.spaces import Box, Dict, Discrete, Graph, MultiBinary, Text, Tuple  # noqa: F401  (eval'd below)

    from rllib_sppo.env_runner import check_spaces

    with pytest.raises(ValueError) as e:
        check_spaces(eval(observation), eval(action))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert ("gymnasium.ObservationWrapper" if message.startswith("observation") else "gymnasium.ActionWrapper") \
        in str(e.value)


def test_an_unsupported_space_stops_the_build_with_its_line(ray_session):
    import gymnasium as gym
    from ray.tune.registry import register_env

    class Words(gym.Env):
        observation_space, action_space = gym.spaces.Text(5), gym.spaces.Discrete(2)

    register_env("Words", lambda cfg: Words())
    with pytest.raises(ValueError, match=r"^observation space Text\(1, 5.* is not supported: .*ObservationWrapper"):
        SPPOConfig().environment("Words").env_runners(num_env_runners=0).build_algo()
