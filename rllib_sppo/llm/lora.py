"""LoRA policies: ``model_config: {lora: {r, alpha, target_modules, dropout}}`` (PEFT: ``rllib-sppo[lora]``).

The learner's policy wears LoRA adapters (transformers' PEFT integration, ``add_adapter``): only they train (the base
weights are frozen, the policy optimizer holds the adapters alone) and only they are synced to the EnvRunners, whose
engines hold the same frozen base: vLLM serves them as a LoRA adapter (``enable_lora``, in its CPU build too), the
transformers engine wears the same adapters. The critic stays a full network. The checkpoint's ``hf_policy/`` is the
adapter folder (PEFT's format; its base is the ``policy`` folder, named in its ``adapter_config.json``), which
``AutoModelForCausalLM.from_pretrained`` loads with its base, and vLLM serves as a ``LoRARequest``.
"""

#: The keys of ``model_config["lora"]`` and their defaults (``target_modules``: PEFT's "all-linear", every linear
#: layer but the LM head; or a list of module names such as ["q_proj", "v_proj"]).
LORA_DEFAULTS = {"r": 8, "alpha": 16, "target_modules": "all-linear", "dropout": 0.0}
#: The ranks vLLM serves (``max_lora_rank``): an adapter of rank r needs the smallest one >= r.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def resolve_lora(spec: dict | None) -> dict | None:
    """``model_config["lora"]`` with its defaults filled in, checked; None: no LoRA (full fine-tuning)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"model_config lora must be a dict such as {{'r': 8, 'alpha': 16}} (or unset), got {spec!r}")
    unknown = sorted(set(spec) - set(LORA_DEFAULTS))
    if unknown:
        raise ValueError(f"model_config lora has unknown key(s) {unknown}; its keys are {sorted(LORA_DEFAULTS)}")
    lora = {**LORA_DEFAULTS, **spec}
    if not (isinstance(lora["r"], int) and 1 <= lora["r"] <= VLLM_LORA_RANKS[-1]):
        raise ValueError(f"model_config lora r={lora['r']!r}: an integer rank in [1, {VLLM_LORA_RANKS[-1]}]")
    if not lora["alpha"] > 0 or not 0 <= lora["dropout"] < 1:
        raise ValueError(f"model_config lora needs alpha > 0 and 0 <= dropout < 1, got {lora['alpha']}, "
                         f"{lora['dropout']}")
    modules = lora["target_modules"]
    if not (isinstance(modules, str) or (isinstance(modules, list) and modules and all(
            isinstance(m, str) for m in modules))):
        raise ValueError(f"model_config lora target_modules={modules!r}: 'all-linear' or a list of module names")
    return lora


def peft_config(lora: dict):
    """PEFT's ``LoraConfig`` of a resolved ``model_config["lora"]``."""
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError("model_config lora needs PEFT, which is not installed: pip install 'rllib-sppo[lora]'") from e
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=lora["target_modules"],
                      lora_dropout=lora["dropout"])
