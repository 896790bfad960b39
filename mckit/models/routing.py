"""Per-token routing: a linear layer whose weight depends on each token's route (DAMC, MMER's expansion).

A :class:`RoutedLinear` computes, for a token x on route r,

    y = x W^T + b + x dW_r^T           (dW_r = 0 for routes without a delta)

by running the shared ``x W^T + b`` over all tokens and each route's delta
once over that route's tokens only (gathered, multiplied, added back): the cost
is one plain linear plus the routed tokens' share of each delta, never every
route over the whole sequence followed by a mask. A delta is dense (``dW``),
low-rank (``B A``, as LoRA) or masked (``m * W``, as MMER's masks over a task
vector). Every routed linear of a model reads the batch's route ids from one
:class:`RouteState`, which :meth:`mckit.models.mllm.MLLM.forward` sets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

#: The seven linears of a Llama-family decoder layer, routed by :func:`route_linears`.
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RouteState:
    """The route id of every position of the batch being run, and its tokens grouped by route (computed once)."""

    def __init__(self):
        self.routes: torch.Tensor | None = None
        self._groups: dict[int, torch.Tensor] | None = None

    @contextlib.contextmanager
    def active(self, routes: torch.Tensor) -> Iterator[None]:
        """Routes (B, L) of the positions the LLM is about to run, for the duration of one forward."""
        previous, self.routes, self._groups = self.routes, routes, None
        try:
            yield
        finally:
            self.routes, self._groups = previous, None

    def groups(self) -> dict[int, torch.Tensor]:
        """route id -> flat indices (into B * L) of its positions."""
        if self._groups is None:
            flat = self.routes.reshape(-1)
            ids, counts = torch.unique(flat, sorted=True, return_counts=True)
            order = torch.argsort(flat, stable=True)
            self._groups = dict(zip(ids.tolist(), torch.split(order, counts.tolist())))
        return self._groups


class DenseDelta(nn.Module):
    """x -> x dW^T; dW (out, in)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T

    def dense(self) -> torch.Tensor:
        return self.weight


class LowRankDelta(nn.Module):
    """x -> scale * (x A^T) B^T, i.e. dW = scale * B A; A (r, in), B (out, r)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0):
        super().__init__()
        if B.shape[1] != A.shape[0]:
            raise ValueError(f"low-rank delta: B {tuple(B.shape)} @ A {tuple(A.shape)} do not chain")
        self.A = nn.Parameter(A, requires_grad=False)
        self.B = nn.Parameter(B, requires_grad=False)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.T) @ self.B.T * self.scale

    def dense(self) -> torch.Tensor:
        return self.B @ self.A * self.scale


class MaskedDelta(nn.Module):
    """x -> x (m * W)^T; m a 0/1 (or any) mask of W's shape, W (out, in) (e.g. a merged task vector)."""

    def __init__(self, mask: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        if mask.shape != weight.shape:
            raise ValueError(f"masked delta: mask {tuple(mask.shape)} and weight {tuple(weight.shape)} differ")
        self.register_buffer("mask", mask)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.mask * self.weight).T

    def dense(self) -> torch.Tensor:
        return self.mask * self.weight


class PackedMaskDelta(nn.Module):
    """x -> x ((m_i - mean_j m_j) * tau*)^T: route i of MMER's expansion over a weight already holding
    theta_0 + mean_j(m_j) tau*, so route i runs theta_0 + m_i tau*.

    ``tau_star`` (out, in) and ``packed`` (N, ceil(out * in / 8)) uint8, the N modalities' masks 8 entries per
    byte (big-endian, numpy ``packbits``), are shared by the N routes of one linear and unpacked per call on
    their device (N x out x in bytes of temporaries): the masks stay at one bit per entry between calls.
    """

    def __init__(self, tau_star: torch.Tensor, packed: torch.Tensor, index: int):
        super().__init__()
        self.register_buffer("tau_star", tau_star, persistent=False)
        self.register_buffer("packed", packed, persistent=False)
        self.index = index

    def weight(self) -> torch.Tensor:
        """(m_i - mean_j m_j) * tau*, computed in float32."""
        shifts = torch.arange(7, -1, -1, device=self.packed.device, dtype=torch.uint8)
        bits = (self.packed.unsqueeze(-1) >> shifts) & 1
        masks = bits.reshape(len(self.packed), -1)[:, :self.tau_star.numel()].float()
        return ((masks[self.index] - masks.mean(0)).reshape(self.tau_star.shape) * self.tau_star.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight().to(x.dtype))


class RoutedLinear(nn.Module):
    """``base``'s linear plus a delta per route: y = x W^T + b + x dW_route^T, each route's tokens run once."""

    def __init__(self, base: nn.Linear, deltas: Mapping[int, nn.Module], state: RouteState):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self.deltas = nn.ModuleDict({str(int(r)): d for r, d in deltas.items()})
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight, self.bias)
        routes = self.state.routes
        if routes is None or not len(self.deltas):
            return out
        if routes.shape != x.shape[:-1]:
            raise ValueError(f"routes have shape {tuple(routes.shape)} but the tokens {tuple(x.shape[:-1])}")
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        for route, index in self.state.groups().items():
            delta = self.deltas[str(route)] if str(route) in self.deltas else None
            if delta is not None:    # positions of a route are unique: index_put_ without accumulate (fast on CPU)
                rows = flat_out.index_select(0, index) + delta(flat_x.index_select(0, index)).to(out.dtype)
                flat_out.index_put_((index,), rows)
        return out


def route_linears(llm: nn.Module, deltas: Mapping[int, Mapping[str, nn.Module]], state: RouteState,
                  linears: tuple[str, ...] = LINEARS) -> list[str]:
    """Replace every ``linears`` module of ``llm`` that has a delta by a :class:`RoutedLinear`, in place.

    ``deltas[route][module_name]``: the delta module of route ``route`` for the linear called
    ``module_name`` (as in ``llm.named_modules()``, e.g. ``model.layers.0.self_attn.q_proj``).
    Returns the names of the routed modules. Works on any ``transformers`` causal LM whose
    linears carry these names.
    """
    wanted = {name for per_route in deltas.values() for name in per_route}
    routed = []
    for name, module in list(llm.named_modules()):
        if name in wanted and name.rsplit(".", 1)[-1] in linears and isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            mine = {r: per_route[name] for r, per_route in deltas.items() if name in per_route}
            setattr(llm.get_submodule(parent_name), child, RoutedLinear(module, mine, state))
            routed.append(name)
    missing = wanted - set(routed)
    if missing:
        raise ValueError(f"no routable linear called {sorted(missing)[0]} in the LLM")
    return routed


def naive_routed_forward(layer: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
    """The slow reference: every route's delta over the whole sequence, then masked to its tokens."""
    out = nn.functional.linear(x, layer.weight, layer.bias)
    for route, delta in layer.deltas.items():
        keep = (layer.state.routes == int(route)).unsqueeze(-1).to(x.dtype)
        out = out + delta(x) * keep
    return out
