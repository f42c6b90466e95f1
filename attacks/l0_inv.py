"""``l0_inv``: the "L0-invisible" trigger of the I-BAU evaluation (Zeng et al., ICLR 2022; after Li et al.,
"Invisible backdoor attacks on deep neural networks via steganography and regularization", 2020): a
few pixels (an L0-small mask) are replaced by a pattern. I-BAU's ``patching``:
``clip(x · (1 − mask) + pattern)``, the mask a (C, H, W) array in {0, 1} and the pattern an image that is
zero off the mask; poisoned training samples are relabelled to the target.

Defaults: ``target`` 0 (the released model ``l0_inv_0_02``), ``poison_rate`` 0.1 (this project's
convention; I-BAU poisons 20%), ``image`` and ``mask`` the authors' released ``triggers/l0_inv.png``
and ``triggers/mask.npy`` when they are on disk (``attacks.base.released_trigger``); elsewhere both
files must be given (the mask as a .npy array of the image's shape, or as an image).
"""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from attacks import ATTACKS
from attacks.base import Attack, ReleasedTriggerParams, add_and_clip


class L0InvParams(ReleasedTriggerParams):
    image: Optional[str] = Field(None, description="the pattern image (I-BAU: triggers/l0_inv.png)",
                                 json_schema_extra={"file": "image", "release": "l0_inv.png"},
                                 validate_default=True)
    mask: Optional[str] = Field(None, description="the pixels replaced, 1 where the pattern goes: a .npy array "
                                                  "(C, H, W) or an image (I-BAU: triggers/mask.npy)",
                                json_schema_extra={"file": "array", "release": "mask.npy"}, validate_default=True)


@ATTACKS.register("l0_inv")
class L0Invisible(Attack):
    name = "l0_inv"
    Params = L0InvParams

    def apply_trigger(self, x):
        return add_and_clip(x, self.files["image"], 1 - self.files["mask"])
