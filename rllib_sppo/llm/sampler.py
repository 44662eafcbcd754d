"""Which training prompts an LLM EnvRunner poses: each exactly once per epoch, across all EnvRunners.

Every epoch is one permutation of the training prompts, drawn from ``(seed, epoch)``. With several EnvRunners,
runner ``shard`` of ``num_shards`` poses the positions ``shard, shard + num_shards, ...`` of it: the shards are
disjoint and together are the epoch. The state is where the runner is (epoch, position), a few numbers: a restored
sampler redraws the same orders.
"""

import numpy as np


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
    def progress(self) -> float:
        """Epochs done, as a fraction: 1.25 = one full pass over this runner's shard and a quarter of the next."""
        return self.epoch + self.pos / len(self._order)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shard_order(self.epoch)
