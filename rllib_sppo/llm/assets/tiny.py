"""Tiny character-level Llamas for CPU-scale RL, and the built-in ones the package supervises on its own tasks.

``tiny-arith`` ("What is a+b?") and ``tiny-chain-<horizon>`` (a running value through 1, 5 or 15 written-out additions,
``envs.chain``) are each supervised until their held-out exact accuracy is in a band (able, with room for RL). The
package ships the folders its builders produced (``SHIPPED``), so a first run loads them at once; ``build=True`` builds
one instead (once, then loaded from the cache, ``rllib_sppo.llm.assets.cache``), which is also how the shipped ones
are made again: ``python -m rllib_sppo.llm.assets tiny-chain-long``.
"""

import logging
import shutil
import string
from functools import partial
from pathlib import Path

import torch

from rllib_sppo.llm.assets.cache import cache_root, cached

log = logging.getLogger(__name__)

CHARSET = string.digits + string.ascii_letters + string.punctuation + " \n"
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}A: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
)
TINY_ARITH = "tiny_arith_v2"
#: The chain models' cache folder, per horizon name (``envs.chain.HORIZONS``).
TINY_CHAIN = "tiny_chain_{}_v2"
#: The held-out exact-accuracy band each builder supervises into (able, with room for RL).
ARITH_BAND = (0.30, 0.60)
CHAIN_BAND = (0.20, 0.50)
#: The built models the package ships, one folder each under its cache name (model, tokenizer, sft_log.json).
SHIPPED = Path(__file__).parent / "shipped"


def build_char_tokenizer(out_dir=None, max_length=256):
    """A character-level tokenizer (one token per character) with a "Q: ...\\nA: " chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *CHARSET])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  unk_token=UNK, chat_template=CHAT_TEMPLATE, model_max_length=max_length,
                                  clean_up_tokenization_spaces=False)
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


def build_tiny_llama(out_dir, seed=0, intermediate_size=512, max_positions=256) -> str:
    """A randomly initialised Llama with the char tokenizer (1.8M parameters at the default MLP width), saved as a
    HF model folder; ``max_positions`` tokens of prompt and response at most."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_char_tokenizer(out_dir, max_length=max_positions)
    config = LlamaConfig(hidden_size=192, intermediate_size=intermediate_size, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=True,
                         max_position_embeddings=max_positions, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out_dir)
    return str(out_dir)


#: The RL env of each built-in tiny model (its tuned examples use the same ``env_config``): the model is supervised
#: on its training split and measured on its held-out split.
ARITH_ENV = {"source": "arithmetic", "size": 10000, "seed": 0, "heldout_size": 500}


def chain_env(horizon: str) -> dict:
    from envs.chain import HORIZONS, PROBLEMS

    if horizon not in HORIZONS:
        raise ValueError(f"unknown chain horizon {horizon!r}; choose one of {sorted(HORIZONS)}")
    return {"source": "chain", "steps": HORIZONS[horizon], "size": PROBLEMS, "seed": 0, "heldout_size": 128,
            "reward_fn": "working"}


def _built(name: str, cache_dir, build, rebuild: bool) -> str:
    """The shipped folder ``name``; with ``rebuild`` (or none shipped), the cached one, built by ``build`` if missing."""
    if (SHIPPED / name).is_dir() and not rebuild:
        return str(SHIPPED / name)
    return cached(cache_root(cache_dir) / name, build)


def tiny_arith_model(cache_dir=None, max_seconds=1200.0, build=False) -> str:
    """Path of the tiny Llama supervised on a+b into the 30-60% band: the shipped one, or with ``build`` the builder's
    (trained once, then cached)."""
    def make(tmp):
        from rllib_sppo.llm.assets import supervise  # the builder's loop, loaded only to build

        log.info("building the tiny arithmetic model once (cached in %s): supervising it until its held-out accuracy "
                 "is in 30-60%%, at most %s", cache_root(cache_dir) / TINY_ARITH, supervise._clock(max_seconds))
        build_tiny_llama(tmp / "init")
        train, test = supervise.env_split(ARITH_ENV)
        supervise.supervise(tmp / "init", tmp, train, test, task="a+b", target=ARITH_BAND, max_seconds=max_seconds)
        shutil.rmtree(tmp / "init")

    return _built(TINY_ARITH, cache_dir, make, build)


def tiny_chain_model(horizon: str, cache_dir=None, max_seconds=5400.0, build=False) -> str:
    """Path of the tiny Llama supervised on ``horizon``'s chains (``envs.chain``) into the 20-50% band of held-out
    exact accuracy (the ``working`` reward: the answer and every line right; 64 held-out problems x 2 samples each
    evaluation): the shipped one, or with ``build`` the builder's (trained once, then cached)."""
    env = chain_env(horizon)
    folder = cache_root(cache_dir) / TINY_CHAIN.format(horizon)

    def make(tmp):
        from rllib_sppo.llm.assets import supervise  # the builder's loop, loaded only to build

        log.info("building the tiny chain model for the %s horizon (%d steps) once (cached in %s): supervising it until "
                 "its held-out accuracy is in 20-50%%, at most %s", horizon, env["steps"], folder,
                 supervise._clock(max_seconds))
        build_tiny_llama(tmp / "init", max_positions=1024)
        train, test = supervise.env_split(env)
        supervise.supervise(tmp / "init", tmp, train, test[:64], task=f"{env['steps']}-step chains",
                            target=CHAIN_BAND, max_seconds=max_seconds, batch_size=32, eval_every=100, eval_samples=2,
                            max_new_tokens=max(len(supervise.solution(r)) for r in test) + 8, dtype="bfloat16",
                            reward_fn=env["reward_fn"])
        shutil.rmtree(tmp / "init")

    return _built(TINY_CHAIN.format(horizon), cache_dir, make, build)


def _chain_models() -> dict:
    from envs.chain import HORIZONS

    return {f"tiny-chain-{horizon}": partial(tiny_chain_model, horizon) for horizon in HORIZONS}


#: The built-in tiny models by name (``builtin:NAME``): each a function (cache_dir=None, max_seconds=..., build=False)
#: -> its folder.
TINY_MODELS = {"tiny-arith": tiny_arith_model, **_chain_models()}
