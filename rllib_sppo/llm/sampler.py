"""Which training prompts an LLM EnvRunner poses: each exactly once per epoch, across all EnvRunners.

Every epoch is one permutation of the training prompts, drawn from ``(seed, epoch)``. With several EnvRunners,
runner ``shard`` of ``num_shards`` poses the positions ``shard, shard + num_shards, ...`` of it: the shards are
disjoint and together are the epoch. The state is where the runner is (epoch, position), a few numbers: a restored
sampler redraws the same orders.

``PromptPool`` puts critic-guided selection on top (``SPPOConfig.prompt_selection``); see its docstring.
"""

import numpy as np
import torch

from rllib_sppo.core import selection_weights


class EpochSampler:
    def __init__(self, size: int, seed: int = 0, shard: int = 0, num_shards: int = 1):
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not one of the {num_shards} shards")
        if size < num_shards:
            raise ValueError(f"{size} training prompts cannot be shared by {num_shards} EnvRunners (each needs one); "
                             f"use fewer env runners or more data")
        self.size, self.seed, self.shard, self.num_shards = size, seed, shard, num_shards
        self.epoch, self.pos = 0, 0
        self._order = self._shard_order(0)

    def _shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)[self.shard::self.num_shards]

    def draw(self, k: int) -> list[int]:
        """The next ``k`` prompt indices; an epoch that runs out continues in the next one, reshuffled."""
        drawn = []
        while len(drawn) < k:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shard_order(self.epoch)
            take = self._order[self.pos:self.pos + k - len(drawn)]
            drawn += take.tolist()
            self.pos += len(take)
        return drawn

    @property
    def shard_size(self) -> int:
        """How many prompts this runner poses per epoch."""
        return len(self._order)

    @property
    def progress(self) -> float:
        """Epochs done, as a fraction: 1.25 = one full pass over this runner's shard and a quarter of the next."""
        return self.epoch + self.pos / len(self._order)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shard_order(self.epoch)


class PromptPool:
    """Critic-guided prompt selection (``SPPOConfig.prompt_selection``): which of the sampler's prompts to pose now.

    The pool holds the prompts drawn from the ``EpochSampler`` and not posed yet. Before each ``sample()`` it is
    topped up to ``pool`` x n candidates for n prompts (``candidates``): with fresh prompts in the epoch's order, a
    prompt still waiting from an earlier epoch not added twice. The learner's critic scores them (``score``: its
    logit z, from the prompt alone), and ``take(k)`` poses k of them, drawn without replacement with probability
    proportional to p (1 - p) + ``floor``, p = sigmoid(z). The others stay in the pool: candidates again at the next
    scoring, each with at least the floor's chance. Nothing drawn is lost: drawn = posed + pooled, and in steady
    state one fresh prompt enters the pool per prompt posed, so the epochs advance as fast as without selection,
    the pool ((pool - 1) x n prompts) lagging behind. A candidate not scored (drawn after the scoring, e.g. in a
    second ``sample()`` of one iteration) weighs the mean of the scored ones (all equal when none is scored).
    """

    def __init__(self, sampler: EpochSampler, pool: int, floor: float, seed):
        self.sampler, self.pool, self.floor = sampler, pool, floor
        self.rng = np.random.default_rng(seed)
        self.pending: dict[int, int] = {}  # prompt index -> the scoring round it entered the pool in
        self.logits: dict[int, float] = {}  # the latest scores of pooled prompts
        self.round = 0
        self._posed: list[tuple[int, float | None]] = []  # since the last metrics(): (index, logit or None)

    def candidates(self, n: int) -> list[int]:
        """Tops the pool up for ``n`` prompts (to ``pool`` x n, at most this runner's share of an epoch) and returns
        it: the prompts to score. Scores of an earlier round are dropped (the critic has changed since)."""
        self.round += 1
        self.logits = {}
        self._top_up(min(self.pool * n, self.sampler.shard_size))
        return list(self.pending)

    def _top_up(self, size: int) -> None:
        # (Terminates: size <= the shard's size, and each epoch's shard holds that many distinct prompts.)
        while len(self.pending) < size:
            for i in self.sampler.draw(size - len(self.pending)):
                self.pending.setdefault(i, self.round)

    def score(self, indices: list[int], logits) -> None:
        """The critic's logits of the candidates ``indices``; those no longer pooled are ignored."""
        self.logits.update((i, float(z)) for i, z in zip(indices, logits) if i in self.pending)

    def take(self, k: int) -> list[int]:
        """Up to ``k`` prompts to pose now (fewer only when this runner's share of an epoch is smaller than k),
        chosen among the pooled ones with probability proportional to p (1 - p) + floor."""
        if len(self.pending) < k:
            self._top_up(min(k, self.sampler.shard_size))
        indices = list(self.pending)
        scored = np.array([i in self.logits for i in indices])
        weights = selection_weights(torch.tensor([self.logits.get(i, 0.0) for i in indices]), self.floor).numpy()
        weights[~scored] = weights[scored].mean() if scored.any() else 1.0
        chosen = [indices[c] for c in self.rng.choice(len(indices), size=min(k, len(indices)), replace=False,
                                                       p=weights / weights.sum())]
        for i in chosen:
            del self.pending[i]
            self._posed.append((i, self.logits.pop(i, None)))
        return chosen

    def metrics(self) -> dict:
        """What the selection did since the last call: the scored pool's and the posed prompts' mean outcome
        variance p (1 - p) (selection works when the second is larger), the pool's spread of p, prompts posed
        without a score, and what waits in the pool (``prompts_deferred``) and for how many rounds at most."""
        variance = lambda z: float((selection_weights(torch.tensor(z), 0.0)).mean()) if z else float("nan")  # noqa
        pool = list(self.logits.values()) + [z for _, z in self._posed if z is not None]
        p = torch.sigmoid(torch.tensor(pool, dtype=torch.float64))
        out = {"rollout/pool_outcome_variance": variance(pool),
               "rollout/selected_outcome_variance": variance([z for _, z in self._posed if z is not None]),
               "rollout/pool_p_mean": float(p.mean()) if pool else float("nan"),
               "rollout/pool_p_std": float(p.std(correction=0)) if pool else float("nan"),
               "rollout/prompts_unscored": sum(z is None for _, z in self._posed),
               "rollout/prompts_deferred": len(self.pending),
               "rollout/deferred_rounds_max": max((self.round - r for r in self.pending.values()), default=0)}
        self._posed = []
        return out

    def get_state(self) -> dict:
        return {"pending": [[i, r] for i, r in self.pending.items()], "round": self.round,
                "rng": self.rng.bit_generator.state}

    def set_state(self, state: dict) -> None:
        self.pending = {i: r for i, r in state["pending"]}
        self.round, self.logits, self._posed = state["round"], {}, []
        self.rng.bit_generator.state = state["rng"]
