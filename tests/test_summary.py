"""`summary` numbers against independent code: model.parameters(), torchinfo, FlopCounterMode on a plain forward."""
import pytest
import torch
import torchinfo
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from reportgen.analyses.summary import count_parameters, profile_modules
from tests.tiny_models import TiedNet, TinyNet


def flop_counter_total(model, x):
    """Stock FlopCounterMode on a grad-enabled forward (so no fused MHA fast path) with the math attention kernel
    (which decomposes into bmm): every op that runs has one of its own formulas."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    return counter.get_total_flops()


def test_tied_weights_counted_once():
    model = TiedNet()
    total, trainable = count_parameters(model)
    assert total == trainable == sum(p.numel() for p in model.parameters()) == 12 * 12 + 12 + 12 + 12 * 3 + 3
    # torchinfo counts the tied 12x12 weight twice (351): it is an oracle for untied models only
    assert torchinfo.summary(model, input_size=(1, 3, 8, 8), verbose=0).total_params == total + 144


def test_parameter_counts_equal_torchinfo_on_resnet18():
    model = torchvision.models.resnet18(weights=None)
    stats = torchinfo.summary(model, input_size=(1, 3, 64, 64), verbose=0)
    assert count_parameters(model) == (stats.total_params, stats.trainable_params)
    for param in model.layer1.parameters():
        param.requires_grad_(False)
    stats = torchinfo.summary(model, input_size=(1, 3, 64, 64), verbose=0)
    assert count_parameters(model) == (stats.total_params, stats.trainable_params)


def test_reused_module_gets_one_row_per_call_with_exact_flops():
    model = TinyNet().eval()
    x = torch.rand(1, 3, 4, 4)
    rows, total, uncounted = profile_modules(model, x)
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["conv", "act", "shared", "shared#2", "pool", "fc"] and uncounted == {}
    # 1x1 conv 2->2 on 4x4: 2 FLOPs per multiply-add, 2*2*16 multiply-adds
    assert by_name["shared"]["flops"] == by_name["shared#2"]["flops"] == 2 * 2 * 2 * 16
    assert by_name["conv"]["flops"] == 2 * 3 * 2 * 16  # bias adds are not counted by FlopCounterMode
    assert by_name["fc"]["flops"] == 2 * 2 * 3
    assert total == flop_counter_total(model, x) == sum(r["flops"] for r in rows)
    assert by_name["shared#2"]["params"] == 4 and by_name["shared"]["input_shape"] == "1×2×4×4"


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "vit_b_16"])
def test_torchvision_totals_equal_parameters_and_flop_counter(arch):
    model = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.rand(1, 3, 224, 224)
    rows, total, uncounted = profile_modules(model, x)
    assert total == flop_counter_total(model, x) and uncounted == {}
    assert count_parameters(model)[0] == sum(p.numel() for p in model.parameters())
    if arch == "vit_b_16":  # projections and attention matmuls: 17.56 GMACs (torchinfo reports 0.17 GMACs)
        assert total == pytest.approx(torchvision.models.ViT_B_16_Weights.DEFAULT.meta["_ops"] * 2e9, rel=1e-3)
        return
    top_level = [r for r in rows if r["depth"] == 1]
    assert sum(r["flops"] for r in top_level) == total  # children add up to the whole for these sequential nets


class TupleDictNet(torch.nn.Module):
    """A block returning a tuple and a head returning a dict: shapes come from the first tensor inside."""

    class Split(torch.nn.Module):
        def forward(self, x):
            return x[:, :2], x[:, 2:]

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 4)

        def forward(self, x):
            return {"logits": self.fc(x), "features": x}

    def __init__(self):
        super().__init__()
        self.split = self.Split()
        self.head = self.Head()

    def forward(self, x):
        a, _ = self.split(x.mean(dim=(2, 3)))
        return self.head(a)["logits"]


def test_tuple_and_dict_outputs_get_shapes_and_flops():
    model = TupleDictNet().eval()
    rows, total, _ = profile_modules(model, torch.rand(1, 3, 4, 4))
    by_name = {r["name"]: r for r in rows}
    assert by_name["split"]["output_shape"] == "1×2" and by_name["head"]["output_shape"] == "1×4"
    assert by_name["head.fc"]["flops"] == by_name["head"]["flops"] == total == 2 * 2 * 4
    assert by_name["split"]["output_bytes"] == 2 * 4 + 1 * 4  # both tuple members counted (float32)
