"""CA, ASR, RA and DER on hand-built predictions."""
import torch
from torch import nn

from kernel.metrics import TriggeredSet, accuracy, der, evaluate


class Fixed(nn.Module):
    """Predicts class 7 when the top-left pixel is 1, else the value of pixel (0, 1) * 10."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        trig = x[:, 0, 0, 0] > 0.99
        lab = torch.where(trig, torch.full_like(trig, 7, dtype=torch.long), (x[:, 0, 0, 1] * 10).round().long())
        return nn.functional.one_hot(lab, 10).float() + 0 * self.w


def test_accuracy():
    assert accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0])) == 0.5


def test_evaluate_ca_asr_ra():
    y = torch.tensor([0, 1, 2, 3])
    x = torch.zeros(4, 3, 4, 4)
    x[:, 0, 0, 1] = y.float() / 10
    x[3, 0, 0, 1] = 0.5  # one clean mistake
    trig = x.clone()
    trig[:2, 0, 0, 0] = 1.0  # two triggered inputs hit the target, two do not
    r = evaluate(Fixed(), x, y, TriggeredSet(trig, y, torch.full_like(y, 7)))
    assert r["clean_acc"] == 0.75
    assert r["asr"] == 0.5
    assert r["robust_acc"] == 0.25  # input 2 keeps its label; input 3 is misclassified
    assert evaluate(Fixed(), x, y, None)["asr"] is None


def test_der_follows_the_paper_sign():
    assert der(1.0, 0.0, 0.9, 0.9) == 1.0
    assert der(1.0, 1.0, 0.9, 0.5) == 0.3
    assert der(0.5, 0.9, 0.8, 0.9) == 0.5  # worse ASR or better CA count as zero change
