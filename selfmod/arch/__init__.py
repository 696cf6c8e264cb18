"""Self-modifying architecture: gates that prune, growth that adds units, mixed operations
that choose, surgery that keeps the function and the optimizer state, and a controller that
drives the expected parameter count to a budget.

    groups = arch.sequential_groups(model)                  # where each layer's units live
    keep = ~model[2].closed()                               # gates that stayed open
    plan = arch.prune_plan(groups[0], keep)
    params = arch.apply_params(plan, params)                # functional
    state = arch.apply_state(plan, state, old_params)       # selfmod.optim state
    arch.operate(model, [plan], [torch_optimizer])          # stateful modules and torch.optim
"""

from selfmod.arch.budget import (
    BudgetState,
    budget_init,
    budget_penalty,
    budget_update,
    expected_mlp_params,
    gated_mlp_expected_params,
    ramp,
)
from selfmod.arch.choice import Choice, choice_sites, commit_params, resolve
from selfmod.arch.cost import Cost, compare, cost
from selfmod.arch.dropout import ConcreteDropout, concrete_dropout
from selfmod.arch.factorable import FactorableLinear, factorable_linear
from selfmod.arch.gates import (
    HardConcreteGate,
    StraightThroughGate,
    apply_gate,
    expected_l0,
    hard_concrete_eval,
    hard_concrete_sample,
    prob_nonzero,
    straight_through_mask,
)
from selfmod.arch.growth import (
    GrowthDecision,
    LayerSignals,
    gradmax_directions,
    gradmax_fan_in_plan,
    gradmax_plan,
    growth_criterion,
    linear_signals,
    split_plan,
    zero_plan,
)
from selfmod.arch.lowrank import (
    factorable_prefixes,
    factorized_params,
    factorized_state,
    is_factored,
)
from selfmod.arch.mixed import (
    CollapseReport,
    Connections,
    MixedOp,
    Pick,
    Zero,
    architecture_params,
    collapse_report,
    discretise,
    diversity_penalty,
    entropy,
    entropy_penalty,
    mixture_weights,
    rename_params,
)
from selfmod.arch.models import GrowReLU, gated_cnn1d, gated_mlp
from selfmod.arch.search import OPS, SearchCNN1d, candidate_op
from selfmod.arch.surgery import (
    Slot,
    Surgery,
    UnitGroup,
    apply_params,
    apply_state,
    apply_torch_optimizer,
    drop_torch_params,
    grow_plan,
    map_state,
    operate,
    prune_plan,
    rename_state,
    sequential_groups,
    swap_torch_params,
    take_units,
)

__all__ = [
    "OPS",
    "BudgetState",
    "Choice",
    "CollapseReport",
    "ConcreteDropout",
    "Connections",
    "Cost",
    "FactorableLinear",
    "GrowReLU",
    "GrowthDecision",
    "HardConcreteGate",
    "LayerSignals",
    "MixedOp",
    "Pick",
    "SearchCNN1d",
    "Slot",
    "StraightThroughGate",
    "Surgery",
    "UnitGroup",
    "Zero",
    "apply_gate",
    "apply_params",
    "apply_state",
    "apply_torch_optimizer",
    "architecture_params",
    "budget_init",
    "budget_penalty",
    "budget_update",
    "candidate_op",
    "choice_sites",
    "collapse_report",
    "commit_params",
    "compare",
    "concrete_dropout",
    "cost",
    "discretise",
    "diversity_penalty",
    "drop_torch_params",
    "entropy",
    "entropy_penalty",
    "expected_l0",
    "expected_mlp_params",
    "factorable_linear",
    "factorable_prefixes",
    "factorized_params",
    "factorized_state",
    "gated_cnn1d",
    "gated_mlp",
    "gated_mlp_expected_params",
    "gradmax_directions",
    "gradmax_fan_in_plan",
    "gradmax_plan",
    "grow_plan",
    "growth_criterion",
    "hard_concrete_eval",
    "hard_concrete_sample",
    "is_factored",
    "linear_signals",
    "map_state",
    "mixture_weights",
    "operate",
    "prob_nonzero",
    "prune_plan",
    "ramp",
    "rename_params",
    "rename_state",
    "resolve",
    "sequential_groups",
    "split_plan",
    "straight_through_mask",
    "swap_torch_params",
    "take_units",
    "zero_plan",
]
