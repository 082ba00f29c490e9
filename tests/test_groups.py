"""param_groups: who is exempt from weight decay and the trust ratio, and that every parameter lands once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchlamb import Lamb, param_groups


class Net(nn.Module):
    """One of everything: convolution, every normalisation, embeddings tied to the output, a custom 1-D tensor."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.batch_norm = nn.BatchNorm1d(8)
        self.instance_norm = nn.InstanceNorm1d(8, affine=True)
        self.group_norm = nn.GroupNorm(2, 8)
        self.layer_norm = nn.LayerNorm(8)
        self.rms_norm = nn.RMSNorm(8)
        self.attention = nn.MultiheadAttention(8, 2)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.scale = nn.Parameter(torch.ones(8))
        self.no_bias_norm = nn.LayerNorm(8, bias=False)
        self.head = nn.Linear(8, 50)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens):
        x = self.embed(tokens).transpose(1, 2)
        x = self.group_norm(self.instance_norm(self.batch_norm(self.conv(x)))).transpose(1, 2)
        x = self.rms_norm(self.layer_norm(x + self.pos_embed)) * self.scale
        x, _ = self.attention(x, x, x)
        return self.head(self.no_bias_norm(x))


def names(groups, adapt):
    return {name for g in groups if g["adapt"] == adapt for name in g["param_names"]}


def test_exempt_parameters_get_no_decay_and_no_adaptation():
    groups = param_groups(Net(), weight_decay=0.05)
    assert names(groups, True) == {"embed.weight", "conv.weight", "attention.in_proj_weight",
                                   "attention.out_proj.weight", "pos_embed"}
    for group in groups:
        assert group["weight_decay"] == (0.05 if group["adapt"] else 0.0)
    exempt = names(groups, False)
    assert {"conv.bias", "head.bias", "attention.in_proj_bias", "attention.out_proj.bias", "scale"} <= exempt
    for norm in ("batch_norm", "instance_norm", "group_norm", "layer_norm"):
        assert {f"{norm}.weight", f"{norm}.bias"} <= exempt
    assert {"rms_norm.weight", "no_bias_norm.weight"} <= exempt


def test_every_parameter_lands_in_exactly_one_group_tied_included():
    model = Net()
    groups = param_groups(model)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    assert all(len(g["params"]) == len(g["param_names"]) for g in groups)
    assert "head.weight" not in names(groups, True) | names(groups, False)  # tied: listed once, as embed.weight


def test_exclude_patterns_and_a_two_dimensional_norm_weight():
    class WeirdNorm(nn.LayerNorm):  # a subclass of a norm module is still a norm module
        pass

    model = nn.Sequential(nn.Linear(4, 4), WeirdNorm(4))
    model[1].weight = nn.Parameter(torch.ones(2, 2))  # a 2-D parameter of a norm module stays exempt
    groups = param_groups(model, exclude=["0.*"])
    assert names(groups, True) == set()
    assert names(groups, False) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    with pytest.raises(TypeError, match="exclude"):
        param_groups(model, exclude="0.*")


def test_groups_work_with_lamb_and_with_torch_optimizers():
    model = Net()
    tokens = torch.randint(0, 50, (3, 5))
    for optimizer in (Lamb(param_groups(model)), torch.optim.AdamW(param_groups(model))):
        optimizer.zero_grad()
        model(tokens).sum().backward()
        optimizer.step()
    frozen_model = nn.Linear(3, 3)
    frozen_model.bias.requires_grad_(False)
    assert len([p for g in param_groups(frozen_model) for p in g["params"]]) == 2  # frozen ones are listed too


def test_empty_groups_are_left_out():
    assert [g["adapt"] for g in param_groups(nn.LayerNorm(3))] == [False]
    assert [g["adapt"] for g in param_groups(nn.Linear(3, 3, bias=False))] == [True]


def test_a_two_dimensional_parameter_named_bias_is_exempt():
    """The name rule on its own: a 2-D relative-position bias is neither 1-D nor in a norm module."""

    class RelativeBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4, bias=False)
            self.rel_bias = nn.Parameter(torch.zeros(4, 4))

    groups = param_groups(RelativeBias(), weight_decay=0.1)
    assert names(groups, False) == {"rel_bias"}
    assert names(groups, True) == {"proj.weight"}
    exempt = next(g for g in groups if "rel_bias" in g["param_names"])
    assert exempt["weight_decay"] == 0.0 and exempt["adapt"] is False
