"""Backdoor attacks, one file each, registered by name in ``ATTACKS``."""
from kernel.registry import Registry

ATTACKS: Registry = Registry("attack")

from attacks import (  # noqa: E402,F401  (registration side effects)
    badnets, blend, cba, dfst, fc, input_aware, l0_inv, l2_inv, lba, lc, lf, multi_target, none, sig, trojan_sq,
    trojan_wm, trojannn, wanet)
from attacks.base import Attack, AttackParams, PoisonParams  # noqa: E402,F401
