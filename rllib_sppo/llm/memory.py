"""The memory rule of thumb of docs/scale.md, from a model's shapes (a transformers config; nothing is allocated).

Per parameter, policy and critic alike: the torch learner with bf16 compute keeps fp32 weights 4 + fp32 gradients 4 +
AdamW's moments 8 bytes, and autocast's bf16 copies of the network running 2; the DeepSpeed learner in bf16 keeps bf16
weights and gradients 2 + 2 and fp32 masters and moments 12, divided over the learners by ZeRO-3 (ZeRO-2 divides the
12 and the gradients). Activations of a micro-batch of T tokens with gradient checkpointing: each layer's input, kept
in fp32 (autocast leaves the residual stream fp32) = layers x hidden x 4 bytes a token; the layer being recomputed,
about 36 x hidden + 8 x intermediate bytes a token (measured on Llama and Qwen2 layers under bf16 autocast,
``tests/test_reference_scale.py``); and one chunk of the LM head, about 5 fp32 copies of its logits (the logits, their
softmax and the gradients), 5 x 4 x chunk x vocabulary bytes.
"""

from __future__ import annotations


def parameter_count(config, lm_head: bool) -> int:
    """Parameters of ``config``'s model: the causal LM (``lm_head``: with its LM head, counted once if tied to the
    embedding) or the backbone alone (what the critic uses), built on the meta device."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        model = (AutoModelForCausalLM if lm_head else AutoModel).from_config(config)
    return sum(p.numel() for p in model.parameters())


def learner_state_bytes(parameters: int, *, deepspeed: dict | None = None, num_learners: int = 1) -> dict:
    """Bytes per learner: ``resident`` between updates (gradients freed after the step) and ``update`` during one."""
    if deepspeed is None:  # the torch learner: fp32 weights and moments, fp32 gradients during the update
        return {"resident": 12 * parameters, "update": 18 * parameters}
    n = max(num_learners, 1) if deepspeed.get("zero_stage", 2) == 3 else 1
    master = 0 if deepspeed.get("offload_optimizer") else 12 * parameters / max(num_learners, 1)
    weights = 2 * parameters / n
    gradients = 2 * parameters / max(num_learners, 1)
    return {"resident": weights + master, "update": weights + master + gradients}


def activation_bytes(config, tokens: int, chunk: int = 1024) -> float:
    """Peak activation bytes of one micro-batch of ``tokens`` tokens of ``config``'s model with gradient checkpointing
    (see the module's docstring)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    kept = layers * hidden * 4 * tokens
    recomputed = (36 * hidden + 8 * config.intermediate_size) * tokens
    head = 5 * 4 * min(chunk, tokens) * config.vocab_size
    return kept + recomputed + head


def rule_of_thumb(policy_config, critic_config, *, tokens: int, deepspeed: dict | None = None,
                  num_learners: int = 1, chunk: int = 1024) -> dict:
    """The learner's memory of one run: parameter counts, and bytes per learner between and during updates."""
    policy = parameter_count(policy_config, lm_head=True)
    critic = parameter_count(critic_config, lm_head=False) + critic_config.hidden_size + 1  # + the value head
    state = learner_state_bytes(policy + critic, deepspeed=deepspeed, num_learners=num_learners)
    activations = activation_bytes(policy_config, tokens, chunk)
    return {"policy_parameters": policy, "critic_parameters": critic, "parameters": policy + critic,
            "resident_bytes": state["resident"], "activation_bytes": activations,
            "update_bytes": state["update"] + activations}
