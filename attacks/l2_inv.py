"""``l2_inv``: the "L2-invisible" trigger of the I-BAU evaluation (Zeng et al., ICLR 2022; after Li et al.,
"Invisible backdoor attacks on deep neural networks via steganography and regularization", 2020): a
full-image perturbation of small L2 norm, *added* to the input and clipped to [0, 1] (I-BAU's
``patching``: ``clip(x + trigger)``); poisoned training samples are relabelled to the target.

Defaults: ``target`` 0 (the released model ``l2_inv_0_02``), ``poison_rate`` 0.1 (this project's
convention; I-BAU poisons 20%), and ``image`` the authors' released ``triggers/l2_inv.png`` when it is
on disk (``attacks.base.released_trigger``); elsewhere the file must be given. The perturbation is an
optimised image, so there is no parametric stand-in for it.
"""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from attacks import ATTACKS
from attacks.base import Attack, ReleasedTriggerParams, add_and_clip


class L2InvParams(ReleasedTriggerParams):
    image: Optional[str] = Field(None, description="the additive trigger image (I-BAU: triggers/l2_inv.png)",
                                 json_schema_extra={"file": "image", "release": "l2_inv.png"},
                                 validate_default=True)


@ATTACKS.register("l2_inv")
class L2Invisible(Attack):
    name = "l2_inv"
    Params = L2InvParams

    def apply_trigger(self, x):
        return add_and_clip(x, self.files["image"])
