"""An LLM run's pieces and how they fit: ``wire`` sets them together (``SPPOConfig.llm``), ``wiring_problems`` says
what in a hand-written set does not fit (``SPPOConfig.validate``), each with its fix."""

from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rllib_sppo.llm.connectors import TokenBatch
from rllib_sppo.llm.evaluation import heldout_accuracy
from rllib_sppo.llm.lora import resolve_lora
from rllib_sppo.llm.runner import LLMEnvRunner
from rllib_sppo.torch.llm_rl_module import MODEL_CONFIG_KEYS, SPPOLLMModule

FIX = "set them together with .llm(policy=...) (YAML: llm: {policy: ...})"
#: The config keys only an LLM run reads (its EnvRunner, engine, module and held-out evaluation).
LLM_KEYS = ("temperature", "top_p", "max_response_tokens", "rollout_engine", "engine_kwargs", "gpu_memory_utilization",
            "engine_sleep_level", "enforce_eager", "eval_samples_per_prompt", "generation_timeout_s")


def wire(config, policy: str, critic: str | None, engine: str | None, model_config: dict) -> None:
    """The LLM EnvRunner, the LLM RLModule (``policy``, ``critic`` and its other ``model_config`` keys), the token-batch
    learner connector in place of RLlib's default pipeline, the held-out evaluation, and the engine."""
    unknown = sorted(set(model_config) - MODEL_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"llm() got unknown key(s) {unknown}; the LLM module's keys are {sorted(MODEL_CONFIG_KEYS)}")
    module_config = {"policy": policy, **({"critic": critic} if critic else {}), **model_config}
    config.env_runners(env_runner_cls=LLMEnvRunner)
    config.rl_module(rl_module_spec=RLModuleSpec(module_class=SPPOLLMModule, model_config=module_config))
    config.learners(learner_connector=TokenBatch, add_default_connectors_to_learner_pipeline=False)
    config.evaluation(custom_evaluation_function=heldout_accuracy)
    if engine is not None:
        config.rollout_engine = engine


def is_llm_runner(runner_cls) -> bool:
    """Whether ``runner_cls`` is the LLM EnvRunner (chunked weight sync, one-call batches, a place in the data)."""
    return isinstance(runner_cls, type) and issubclass(runner_cls, LLMEnvRunner)


def wiring_problems(config):
    """What does not fit: an LLM EnvRunner without the LLM module (or the reverse), RLlib's default connectors,
    evaluation without the held-out function, unknown module keys; and a LoRA policy's settings."""
    runner, module_class = config.env_runner_cls, getattr(config.rl_module_spec, "module_class", None)
    llm_module = isinstance(module_class, type) and issubclass(module_class, SPPOLLMModule)
    if is_llm_runner(runner) != llm_module:
        yield (f"env_runner_cls {getattr(runner, '__name__', runner)} and RLModule "
               f"{getattr(module_class, '__name__', module_class)} do not fit together: an LLM run needs "
               f"LLMEnvRunner with SPPOLLMModule; {FIX}.")
    try:
        lora = resolve_lora(config.module_config.get("lora"))
    except ValueError as e:
        yield str(e)
        return
    if lora and config.deepspeed is not None:
        yield ("model_config lora trains a few adapter weights: the torch learner suffices and the DeepSpeed learner "
               "does not take LoRA policies yet; unset deepspeed.")
    if lora and config.engine_sleep_level == 2:
        yield ("engine_sleep_level=2 frees the engine's weights, and a LoRA policy's sync sends only its adapters, "
               "never the base again: use engine_sleep_level 1 (or 0).")
    if not is_llm_runner(runner):
        defaults = type(config)()
        if changed := [key for key in LLM_KEYS if getattr(config, key) != getattr(defaults, key)]:
            yield (f"{changed} set the LLM rollouts, which this run does not have (its EnvRunner is "
                   f"{getattr(runner, '__name__', runner)}): remove them, or make it an LLM run: {FIX}.")
        return
    unknown = sorted(set(getattr(config.rl_module_spec, "model_config", None) or {}) - MODEL_CONFIG_KEYS)
    if unknown:
        yield f"the LLM module's model_config has unknown key(s) {unknown}; its keys are {sorted(MODEL_CONFIG_KEYS)}."
    if not isinstance(config.learner_connector_instance(), TokenBatch) or \
            config.add_default_connectors_to_learner_pipeline:
        yield (f"an LLM run builds its batches with the TokenBatch learner connector alone (learner_connector="
               f"TokenBatch, add_default_connectors_to_learner_pipeline=False); {FIX}.")
    if config.evaluation_interval and config.custom_evaluation_function is not heldout_accuracy:
        yield (f"evaluation_interval={config.evaluation_interval} on an LLM run evaluates the held-out split with "
               f"custom_evaluation_function=rllib_sppo.llm.evaluation.heldout_accuracy; {FIX}.")
