"""Low-rank factorization of a :class:`~selfmod.arch.factorable.FactorableLinear`: the surgery
that turns its dense ``weight (m, n)`` into ``left (m, r)`` and ``right (r, n)``, in the params
and in the optimizer state.

Its tensors keep their names through the change, so per-tensor learning rates, optimizer state
and checkpoints address them as before; only their shapes change, as in growth and pruning.
:func:`factorized_params` is the truncated SVD ``W ~ U_r S_r V_r^T`` with
``left = U_r S_r^(1/2)`` and ``right = S_r^(1/2) V_r^T`` (the best rank-``r`` approximation in
Frobenius norm, Eckart & Young 1936; at ``r = min(m, n)`` the function is kept exactly, to
rounding). The new factors' optimizer state starts at zero; the emptied weight's goes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from selfmod.arch.factorable import FactorableLinear
from selfmod.arch.surgery import map_state

Params = dict[str, Tensor]


def is_factored(params: Mapping[str, Tensor], prefix: str) -> bool:
    """Whether the :class:`FactorableLinear` at ``prefix`` (``"2"`` for ``"2.weight"``) is
    factored."""
    return params[f"{prefix}.right"].numel() > 0 and params[f"{prefix}.weight"].numel() == 0


def factorized_params(params: Mapping[str, Tensor], prefix: str, rank: int) -> Params:
    """``params`` with the dense layer at ``prefix`` replaced by its best rank-``rank``
    factors (module docstring); ``weight (m, n) -> (m, 0)``, ``left (m, 0) -> (m, r)``,
    ``right (0, n) -> (r, n)``. The SVD runs in float64."""
    w = params[f"{prefix}.weight"]
    if w.numel() == 0:
        raise ValueError(f"{prefix} is already factored")
    m, n = w.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m} x {n} weight (got {rank})")
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    out = dict(params)
    # row-major like every other tensor: LAPACK's factors are column-major, and a checkpoint
    # stores them row-major, so a resumed run would multiply a different layout (on some CPUs,
    # in another order of additions: not bitwise the run it resumes)
    out[f"{prefix}.left"] = (u[:, :rank] * root).to(w.dtype).contiguous()
    out[f"{prefix}.right"] = (root[:, None] * vh[:rank]).to(w.dtype).contiguous()
    out[f"{prefix}.weight"] = w.new_zeros(m, 0)
    return out


def factorized_state(state: Any, params: Mapping[str, Tensor], new: Mapping[str, Tensor],
                     prefix: str) -> Any:  # fmt: skip
    """The selfmod optimizer ``state`` after :func:`factorized_params` (``params`` before,
    ``new`` after): every per-coordinate tensor of the layer's weight, left and right takes its
    new shape, filled with zeros (the factors start without momentum)."""
    keys = [f"{prefix}.{k}" for k in ("weight", "left", "right")]
    shapes = {k: params[k].shape for k in keys}

    def fn(key: str, x: Tensor) -> Tensor:
        return x.new_zeros(new[key].shape)

    return map_state(state, shapes, fn)


def factorable_prefixes(module: nn.Module) -> list[str]:
    """The names of the :class:`FactorableLinear` modules in ``module``, in order."""
    return [n for n, m in module.named_modules() if isinstance(m, FactorableLinear)]
