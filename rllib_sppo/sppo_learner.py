"""Framework-agnostic SPPO learner: installs the sequence-advantage connector."""

from ray.rllib.core.learner.learner import Learner
from ray.rllib.core.rl_module.apis import ValueFunctionAPI

from rllib_sppo.apis import TokenLogpAPI
from rllib_sppo.connectors import SequenceAdvantage
from rllib_sppo.private_api import learner_pipeline, optimizer_lr_schedules, set_optimizer_lr


NONFINITE_SKIPPED = "numerics/skipped_updates"  # optimizer steps skipped for a non-finite loss/gradient
NONFINITE_STREAK = "numerics/nonfinite_streak"  # how many of the last steps in a row were skipped


class SPPOLearner(Learner):
    def build(self) -> None:
        super().build()
        # The advantage is SPPO itself, so it is appended even to a custom pipeline.
        if learner_pipeline(self) is not None:
            learner_pipeline(self).append(
                SequenceAdvantage(estimator=self.config.advantage_estimator,
                                  critic_loss=self.config.resolved_critic_loss,
                                  normalize=self.config.normalize_advantage,
                                  gamma=self.config.gamma, lambda_=self.config.lambda_))

    def set_state(self, state) -> None:
        super().set_state(state)
        # A restored optimizer holds the learning rate it was saved with, and RLlib sets the config's only after the
        # next update: a trial that PBT continues from another's checkpoint with a mutated lr would train one update
        # with the old one. A fixed lr applies at once (a scheduled one as in RLlib, after the next update).
        for optimizer, schedule in optimizer_lr_schedules(self).items():
            if not schedule.use_schedule:
                set_optimizer_lr(self, optimizer, float(schedule.get_current_value()))

    @classmethod
    def rl_module_required_apis(cls) -> list[type]:
        return [ValueFunctionAPI, TokenLogpAPI]
