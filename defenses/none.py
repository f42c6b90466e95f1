"""``none``: no defense; the trial reports the backdoored model as it is."""
from defenses import DEFENSES
from defenses.base import Defense, DefenseParams


@DEFENSES.register("none")
class NoDefense(Defense):
    name = "none"
    Params = DefenseParams

    def apply(self, model, ctx):
        return model
