"""selfmod.arch cost model against hand counts, and before/after surgery."""

import torch
from torch import nn

from selfmod import arch, tree


def test_mlp_cost_matches_hand_count():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    c = arch.cost(model, (4,))
    assert c.params == 4 * 3 + 3 + 3 * 2 + 2
    assert c.flops == (2 * 4 * 3 + 3) + (2 * 3 * 2 + 2)
    assert c.activation_bytes == (3 + 3 + 2) * 8  # float64 outputs of the 3 leaves


def test_conv_cost_matches_hand_count():
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(4, 3, 5, bias=False),
        nn.Flatten(),
        nn.Linear(3, 7),
    )
    c = arch.cost(model, (2, 10))
    # conv1: L_out 10, 2*2*3*4 MACs-as-FLOPs per position + 4 bias adds; pool -> L 5
    # conv2: L_out 1, 2*4*5*3 per position, no bias; linear 2*3*7 + 7
    assert c.flops == 10 * (2 * 2 * 3 * 4 + 4) + 1 * (2 * 4 * 5 * 3) + (2 * 3 * 7 + 7)
    assert c.params == (2 * 3 * 4 + 4) + 4 * 5 * 3 + (3 * 7 + 7)
    assert c.activation_bytes == (40 + 40 + 20 + 3 + 3 + 7) * 4


def test_conv2d_and_strides():
    model = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1))
    c = arch.cost(model, (3, 8, 8))
    assert c.flops == 4 * 4 * (2 * 3 * 9 * 5 + 5)


def test_cost_after_pruning_uses_the_new_shapes():
    torch.manual_seed(0)
    model = arch.gated_mlp([10, 8, 6, 2]).double()
    params = tree.clone(dict(model.named_parameters()))
    g0 = arch.sequential_groups(model)[0]
    keep = torch.tensor([True, False] * 4)
    small = arch.apply_params(arch.prune_plan(g0, keep), params)
    before, after = arch.cost(model, (10,)), arch.cost(model, (10,), small)
    assert before.params - after.params == 4 * (10 + 1 + 1 + 6)  # rows, bias, gate, columns
    assert before.flops - after.flops == 4 * (2 * 10 + 1) + 4 * 2 * 6
    assert "params" in arch.compare(before, after) and "x0." in arch.compare(before, after)
    assert "params" in str(after)


def test_gdas_cost_counts_only_the_op_that_runs():
    torch.manual_seed(0)
    model = arch.SearchCNN1d(8, channels=2, cells=2, mode="gdas").eval()
    darts = arch.SearchCNN1d(8, channels=2, cells=2, mode="darts").eval()
    assert arch.cost(model, (8,)).flops < arch.cost(darts, (8,)).flops


def test_a_token_model_is_costed_on_a_real_example():
    """Integer inputs (token ids into an ``nn.Embedding``): the cost model runs the example it
    is given, not zeros in the parameters' dtype, which an embedding cannot index with."""
    model = nn.Sequential(nn.Embedding(11, 4), nn.Flatten(), nn.Linear(3 * 4, 5))
    tokens = torch.tensor([[1, 7, 10]])  # (1, T): one example
    c = arch.cost(model, tokens)
    assert c.params == 11 * 4 + 3 * 4 * 5 + 5
    assert c.flops == 2 * 12 * 5 + 5  # the embedding is a lookup: no FLOPs counted
    float_input = nn.Sequential(nn.Linear(4, 3))
    assert arch.cost(float_input, torch.randn(1, 4)) == arch.cost(float_input, (4,))
