"""Per-token routing: a linear layer whose weight depends on each token's route (DAMC, MMER's expansion).

A :class:`RoutedLinear` computes, for a token x on route r,

    y = x W^T + b + x dW_r^T           (dW_r = 0 for routes without a delta)

A delta is dense (``dW``), low-rank (``B A``, as LoRA) or masked (``m * W``, as MMER's
masks over a task vector). Two ways to run a batch, both exact:

- additive (training, and deltas kept apart): the shared ``x W^T + b`` over all tokens,
  then each route's delta once over that route's tokens only (gathered, multiplied,
  added back): one plain linear plus the routed tokens' share of each delta;
- grouped (composition, ``route_linears(..., merge=True)``): each route's weight
  ``W_r = W + dW_r`` is formed once; the rows are sorted by route, each route's rows
  run one matmul with its own weight, and the rows are put back in order: the flops
  of one plain linear plus a gather per input and per output. A per-token block (the
  MLP: gate, up, down) is grouped as a whole (:func:`group_per_token`): one gather in,
  one out, the block run once per route on that route's rows; q, k and v share the
  gather of their common input.

A merged model runs a batch grouped when at least :data:`GROUPED_SHARE` of its rows lie
outside the largest route, additively otherwise (bench/routing.py, 2 threads: with 7% of
the rows routed, additive 1.12-1.17x a plain forward and grouped 1.21-1.24x; with 45%,
additive 1.29x and grouped 0.85x).

Every routed linear of a model reads the batch's route ids from one
:class:`RouteState`, which :meth:`mckit.models.mllm.MLLM.forward` sets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from torch import nn

#: The seven linears of a Llama-family decoder layer, routed by :func:`route_linears`.
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Share of a batch's rows outside its largest route from which merged models run it grouped (module doc).
GROUPED_SHARE = 0.25


class RouteState:
    """The route id of every position of the batch being run, and its rows grouped by route (computed once).

    ``single``: inside a grouped block, the one route every row it is given is on. ``grouped``: whether
    merged linears and per-token blocks may run grouped (off: every linear runs additively, as a reference).
    """

    def __init__(self):
        self.routes: torch.Tensor | None = None
        self.single: int | None = None
        self.grouped = True
        self._groups: dict[int, torch.Tensor] | None = None
        self._sorted: Sorted | None = None
        self._last: tuple[torch.Tensor, int, torch.Tensor] | None = None

    @contextlib.contextmanager
    def active(self, routes: torch.Tensor) -> Iterator[None]:
        """Routes (B, L) of the positions the LLM is about to run, for the duration of one forward."""
        previous, self.routes = self.routes, routes
        self._groups = self._sorted = self._last = None
        try:
            yield
        finally:
            self.routes, self._groups, self._sorted, self._last = previous, None, None, None

    @contextlib.contextmanager
    def only(self, route: int) -> Iterator[None]:
        """Every row run inside is on ``route`` (a grouped block's share of the batch)."""
        previous, self.single = self.single, route
        try:
            yield
        finally:
            self.single = previous

    def groups(self) -> dict[int, torch.Tensor]:
        """route id -> flat indices (into B * L) of its positions."""
        if self._groups is None:
            flat = self.routes.reshape(-1)
            ids, counts = torch.unique(flat, sorted=True, return_counts=True)
            order = torch.argsort(flat, stable=True)
            self._groups = dict(zip(ids.tolist(), torch.split(order, counts.tolist())))
        return self._groups

    def sorted(self) -> "Sorted":
        """The flat positions sorted by route: ``order``, its inverse, and each route's slice of the sorted rows."""
        if self._sorted is None:
            groups = self.groups()
            order = torch.cat(list(groups.values()))
            bounds, start = [], 0
            for route, index in groups.items():
                bounds.append((route, start, start + len(index)))
                start += len(index)
            share = 1 - max(len(index) for index in groups.values()) / len(order)
            self._sorted = Sorted(order, torch.argsort(order), bounds, share)
        return self._sorted

    def run_grouped(self) -> bool:
        """Whether this batch runs grouped: allowed, and enough of its rows outside the largest route."""
        return self.grouped and self.single is None and self.sorted().share >= GROUPED_SHARE

    def sorted_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x`` (B, L, d) as (B * L, d) sorted by route; the last one is kept, since q, k and v
        project the same input."""
        if self.routes.shape != x.shape[:-1]:
            raise ValueError(f"routes have shape {tuple(self.routes.shape)} but the tokens {tuple(x.shape[:-1])}")
        last = self._last
        if last is None or last[0] is not x or last[1] != x._version:
            rows = x.reshape(-1, x.shape[-1]).index_select(0, self.sorted().order)
            self._last = last = (x, x._version, rows)
        return last[2]

    def unsort(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Rows sorted by route (B * L, d') back in the order of ``like`` (B, L, d): (B, L, d')."""
        return rows.index_select(0, self.sorted().inverse).reshape(*like.shape[:-1], rows.shape[-1])


class Sorted(NamedTuple):
    """Flat positions sorted by route: ``rows[inverse]`` undoes ``rows[order]``; ``bounds``: (route, start, end);
    ``share``: the share of rows outside the largest route."""

    order: torch.Tensor
    inverse: torch.Tensor
    bounds: list[tuple[int, int, int]]
    share: float


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


class SumDelta(nn.Module):
    """x -> sum_k delta_k(x): a route's delta made of several terms (e.g. low-rank products), which several routes
    may share (one tensor in memory)."""

    def __init__(self, terms):
        super().__init__()
        self.terms = nn.ModuleList(terms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(term(x) for term in self.terms)

    def dense(self) -> torch.Tensor:
        return sum(term.dense() for term in self.terms)


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
    """``base``'s linear plus a delta per route: y = x W^T + b + x dW_route^T (module doc).

    ``merge``: form each route's weight W + dW_r once (deltas with a dense form) and run the batch grouped.
    """

    def __init__(self, base: nn.Linear, deltas: Mapping[int, nn.Module], state: RouteState, merge: bool = False):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self.deltas = nn.ModuleDict({str(int(r)): d for r, d in deltas.items()})
        self.state = state
        self.merged: set[int] = set()
        if merge:
            with torch.no_grad():
                for r, delta in deltas.items():
                    merged = (self.weight.float() + delta.dense().float()).to(self.weight.dtype)
                    self.register_buffer(f"merged_{int(r)}", merged, persistent=False)
                    self.merged.add(int(r))

    def route_forward(self, x: torch.Tensor, route: int) -> torch.Tensor:
        """Every row of ``x`` on ``route``: x W_route^T + b."""
        if route in self.merged:
            return nn.functional.linear(x, getattr(self, f"merged_{route}"), self.bias)
        out = nn.functional.linear(x, self.weight, self.bias)
        delta = self.deltas[str(route)] if str(route) in self.deltas else None
        return out if delta is None else out + delta(x).to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.routes is None or not len(self.deltas):
            return nn.functional.linear(x, self.weight, self.bias)
        if state.single is not None:
            return self.route_forward(x, state.single)
        if self.merged and state.run_grouped():
            return self._grouped(x)
        return self._additive(x)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """Rows sorted by route, one matmul per route with its merged weight, rows put back."""
        rows, bounds = self.state.sorted_rows(x), self.state.sorted().bounds
        out = torch.cat([self.route_forward(rows[start:end], route) for route, start, end in bounds])
        return self.state.unsort(out, x)

    def _additive(self, x: torch.Tensor) -> torch.Tensor:
        """The shared linear over all tokens, each route's delta over its own tokens added back."""
        out = nn.functional.linear(x, self.weight, self.bias)
        routes = self.state.routes
        if routes.shape != x.shape[:-1]:
            raise ValueError(f"routes have shape {tuple(routes.shape)} but the tokens {tuple(x.shape[:-1])}")
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        for route, index in self.state.groups().items():
            delta = self.deltas[str(route)] if str(route) in self.deltas else None
            if delta is not None:    # positions of a route are unique: index_put_ without accumulate (fast on CPU)
                rows = flat_out.index_select(0, index) + delta(flat_x.index_select(0, index)).to(out.dtype)
                flat_out.index_put_((index,), rows)
        return out


def group_per_token(block: nn.Module, state: RouteState) -> None:
    """Run ``block`` (a module that maps each position on its own, as an MLP) grouped by route, in place:
    its input's rows sorted by route, the block run once per route on that route's rows (its routed linears
    then use that route's weight directly), the rows put back. Its names and parameters are unchanged."""
    forward = block.forward

    def grouped(x: torch.Tensor) -> torch.Tensor:
        if state.routes is None or not state.run_grouped():
            return forward(x)
        rows, parts = state.sorted_rows(x), []
        for route, start, end in state.sorted().bounds:
            with state.only(route):
                parts.append(forward(rows[start:end]))
        return state.unsort(torch.cat(parts), x)

    block.forward = grouped


def route_linears(llm: nn.Module, deltas: Mapping[int, Mapping[str, nn.Module]], state: RouteState,
                  linears: tuple[str, ...] = LINEARS, merge: bool = False) -> list[str]:
    """Replace every ``linears`` module of ``llm`` that has a delta by a :class:`RoutedLinear`, in place.

    ``deltas[route][module_name]``: the delta module of route ``route`` for the linear called
    ``module_name`` (as in ``llm.named_modules()``, e.g. ``model.layers.0.self_attn.q_proj``).
    ``merge``: each route's weight formed once and the batch run grouped (module doc), every ``mlp``
    whose linears are all routed grouped as a whole; for frozen deltas with a dense form.
    Returns the names of the routed modules. Works on any ``transformers`` causal LM whose
    linears carry these names.
    """
    wanted = {name for per_route in deltas.values() for name in per_route}
    routed = []
    for name, module in list(llm.named_modules()):
        if name in wanted and name.rsplit(".", 1)[-1] in linears and isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            mine = {r: per_route[name] for r, per_route in deltas.items() if name in per_route}
            setattr(llm.get_submodule(parent_name), child, RoutedLinear(module, mine, state, merge))
            routed.append(name)
    missing = wanted - set(routed)
    if missing:
        raise ValueError(f"no routable linear called {sorted(missing)[0]} in the LLM")
    if merge:
        for name, module in llm.named_modules():
            linear_children = [m for m in module.children() if isinstance(m, (nn.Linear, RoutedLinear))]
            if name.endswith("mlp") and linear_children and all(isinstance(m, RoutedLinear) for m in linear_children):
                group_per_token(module, state)
    return routed


def naive_routed_forward(layer: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
    """The slow reference: every route's delta over the whole sequence, then masked to its tokens."""
    out = nn.functional.linear(x, layer.weight, layer.bias)
    for route, delta in layer.deltas.items():
        keep = (layer.state.routes == int(route)).unsqueeze(-1).to(x.dtype)
        out = out + delta(x) * keep
    return out
