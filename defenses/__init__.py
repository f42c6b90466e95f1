"""Backdoor defenses, one file each, registered by name in ``DEFENSES``."""
from kernel.registry import Registry

DEFENSES: Registry = Registry("defense")

from defenses import finetune, none  # noqa: E402,F401  (registration side effects)
from defenses import awm, ibau  # noqa: E402,F401  (registration side effects)
from defenses import abl, baerase  # noqa: E402,F401  (registration side effects)
from defenses import fine_pruning, nad, neural_cleanse  # noqa: E402,F401  (registration side effects)
from defenses import anp, clp, mcr, sau  # noqa: E402,F401  (registration side effects)
from defenses.base import CleanSetParams, Defense, DefenseContext, DefenseParams  # noqa: E402,F401
