"""rllib-sppo: SPPO (Sequence-Level PPO, arXiv 2604.08865) on Ray RLlib's new API stack."""

from ray.tune.registry import register_trainable

from rllib_sppo.config import SPPOConfig
from rllib_sppo.sppo import SPPO

register_trainable("SPPO", SPPO)

__all__ = ["SPPO", "SPPOConfig"]
__version__ = "0.1.0"
