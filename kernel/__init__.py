"""The shared kernel: datasets, models, the one training/evaluation loop, and metrics.

Attacks and defenses are written against this package; the sweep engine (``sweep/``) uses all three.
Nothing here imports ``attacks``, ``defenses`` or ``sweep``.
"""
