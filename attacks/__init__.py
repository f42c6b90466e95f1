"""Backdoor attacks, one file each, registered by name in ``ATTACKS``."""
from kernel.registry import Registry

ATTACKS: Registry = Registry("attack")

from attacks import badnets, blend, none  # noqa: E402,F401  (registration side effects)
from attacks.base import Attack, AttackParams, PoisonParams  # noqa: E402,F401
