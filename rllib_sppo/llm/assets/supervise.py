"""The builder of the tiny models: supervised training on a task's own training split until the model's held-out exact
accuracy is in a band (able, but with room for RL), with a progress line every 30 s. Used only when a built-in model
is not in the cache yet (``rllib_sppo.llm.assets.tiny``)."""

import copy
import datetime
import json
import logging
import math
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def env_split(env_config: dict) -> tuple[list[dict], list[dict]]:
    """The (train, held-out) records of the RL env ``ReasoningBandit-v0`` with ``env_config``: supervision trains on
    exactly the env's training split, so the held-out problems RL is measured on were never seen before."""
    from envs.reasoning import ReasoningEnv

    env = ReasoningEnv(env_config)
    try:
        return env.splits["train"].records, env.splits["heldout"].records
    finally:
        env.close()


def solution(record: dict) -> str:
    """What a record is supervised to answer: its worked ``solution`` (``extra_info``), else its boxed answer."""
    return record["extra_info"].get("solution") or f"\\boxed{{{record['ground_truth']}}}"


def _prompts(tok, records):
    return [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in records]


def _sft_tensors(tok, records):
    """Padded input ids, attention mask and labels (-100 except on the response, ``solution`` + eos)."""
    prompts = tok(_prompts(tok, records), add_special_tokens=False).input_ids
    answers = tok([solution(r) for r in records], add_special_tokens=False).input_ids
    width = max(len(p) + len(r) for p, r in zip(prompts, answers)) + 1
    ids = torch.full((len(records), width), tok.pad_token_id)
    labels = torch.full((len(records), width), -100)
    for i, (p, r) in enumerate(zip(prompts, answers)):
        seq = p + r + [tok.eos_token_id]
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(p):len(seq)] = torch.tensor(r + [tok.eos_token_id])
    return ids, (ids != tok.pad_token_id).long(), labels


@torch.no_grad()
def sample_answers(model, tok, records, samples=4, temperature=0.6, max_new_tokens=12) -> list[str]:
    """``samples`` answers per record (record by record), sampled at ``temperature``."""
    model.eval()
    enc = tok(_prompts(tok, records), return_tensors="pt", padding=True, padding_side="left",
              add_special_tokens=False)
    out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                         max_new_tokens=max_new_tokens, num_return_sequences=samples, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)


def exact_accuracy(model, tok, records, samples=4, temperature=0.6, max_new_tokens=12, reward_fn="math"):
    """Share of ``samples`` answers per problem, sampled at ``temperature``, that the RL env's reward (``reward_fn``,
    given the records' columns as the env gives them) scores 1.0."""
    from envs.reasoning import reward_columns
    from envs.rewards import get_reward_fn

    texts = sample_answers(model, tok, records, samples, temperature, max_new_tokens)
    rewards = get_reward_fn(reward_fn)(texts, **reward_columns([r for r in records for _ in range(samples)]))
    return sum(reward == 1.0 for reward in rewards) / len(rewards)


def supervise(model_dir, out_dir, train: list[dict], test: list[dict], *, task: str, target=(0.30, 0.60), seed=0,
              max_seconds=1200.0, batch_size=128, lr=1e-3, eval_every=25, eval_samples=4, max_new_tokens=12,
              dtype="float32", reward_fn="math") -> dict:
    """Supervises `model_dir` on `train` (prompt -> ``solution``) until its exact accuracy on `test` (T=0.6,
    ``eval_samples`` each, scored by the env's ``reward_fn``) is in `target`.

    Evaluates every `eval_every` steps; an evaluation above the band rolls back to the previous one and evaluates
    twice as often. Stops in the band or after `max_seconds`, saves model and tokenizer to `out_dir` and returns (and
    writes to sft_log.json) the last accuracy (None if no evaluation ran), steps, seconds and history. ``dtype``
    "bfloat16" computes under autocast (fp32 weights). ``task`` names the task in the progress line.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids, mask, labels = _sft_tensors(tok, train)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    compute = getattr(torch, dtype)
    lo, hi = target
    start, step, history, snapshot, acc = time.monotonic(), 0, [], None, None
    logged = -math.inf  # a progress line at most every 30 s
    while time.monotonic() - start < max_seconds:
        model.train()
        idx = torch.randint(len(ids), (batch_size,))
        with torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32):
            loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % eval_every:
            continue
        acc = exact_accuracy(model, tok, test, samples=eval_samples, max_new_tokens=max_new_tokens, reward_fn=reward_fn)
        history.append({"step": step, "seconds": round(time.monotonic() - start, 1), "loss": round(loss.item(), 4),
                        "accuracy": acc})
        elapsed = time.monotonic() - start
        if elapsed - logged >= 30:
            logged = elapsed
            log.info("supervising the model on %s: step %d, held-out accuracy %.2f (target %.2f-%.2f), %s elapsed, "
                     "at most %s left", task, step, acc, lo, hi, _clock(elapsed), _clock(max_seconds - elapsed))
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
