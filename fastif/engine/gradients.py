"""Per-example gradients and directional derivatives over a parameter selection.

Three ways to get grad L(z_j) for every example of a batch, fastest first:

* ``hooks``: one forward and one backward of the summed loss; the gradient of each
  selected Linear / LayerNorm / Embedding parameter is assembled per example from the
  layer's saved input and the gradient at its output (the same identity Opacus uses).
  It works on any model, Hugging Face ones included, whose selected parameters all
  belong to such layers, and costs about one forward + backward pass.
* ``vmap``: ``torch.func.vmap(grad(...))`` over examples; general, but refuses models
  with data-dependent control flow (Hugging Face BERT's mask checks).
* ``jvp``: no per-example gradient at all; one forward-mode JVP per direction gives
  grad L(z_j) . v for every example j of the batch at once. Any differentiable model.

``per_example_gradients`` returns (B, P); ``directional_derivatives`` returns (B, T)
for T directions and picks the cheapest strategy that applies.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._pytree import tree_map

from fastif.engine.data import LossFn
from fastif.engine.params import ParameterSelection, requires_grad_only

STRATEGIES = ("auto", "hooks", "vmap", "jvp")
# Up to this many directions, hooks score layer by layer instead of forming (B, P) gradients.
_FEW_DIRECTIONS = 2
_HOOKABLE = (nn.Linear, nn.LayerNorm, nn.Embedding)


class _LossModule(nn.Module):
    """Wraps (model, loss_fn) so torch.func.functional_call can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _functional_losses(model: nn.Module, loss_fn: LossFn, selection: ParameterSelection, flat: torch.Tensor, batch: Any) -> torch.Tensor:
    params = {"model." + n: t for n, t in zip(selection.names, selection.unflatten(flat))}
    return functional_call(_LossModule(model, loss_fn), params, (batch,), strict=False)


def hookable(model: nn.Module, selection: ParameterSelection) -> bool:
    """Whether every selected parameter is the weight or bias of a Linear, LayerNorm or Embedding."""
    modules = dict(model.named_modules())
    for name in selection.names:
        owner, _, attr = name.rpartition(".")
        if not isinstance(modules.get(owner), _HOOKABLE) or attr not in ("weight", "bias"):
            return False
    return True


class SharedAcrossBatchError(RuntimeError):
    """A hooked layer's input has no batch dimension; its per-example gradient cannot be split."""


def _layer_per_example_grads(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-example gradients of one call of a layer, from its input x and output gradient dy."""
    b = x.shape[0]
    if isinstance(module, nn.Linear):
        x2 = x.reshape(b, -1, x.shape[-1])
        dy2 = dy.reshape(b, -1, dy.shape[-1])
        out = {"weight": torch.bmm(dy2.transpose(1, 2), x2)}
        if module.bias is not None:
            out["bias"] = dy2.sum(1)
        return out
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, keepdim=True, unbiased=False)
        x_hat = (x - mean) / torch.sqrt(var + module.eps)
        lead = tuple(range(1, x.dim() - len(module.normalized_shape)))
        out = {}
        if module.weight is not None:
            out["weight"] = (dy * x_hat).sum(dim=lead) if lead else dy * x_hat
        if module.bias is not None:
            out["bias"] = dy.sum(dim=lead) if lead else dy
        return out
    if isinstance(module, nn.Embedding):
        idx = x.reshape(b, -1)
        dy2 = dy.reshape(b, idx.shape[1], -1)
        g = torch.zeros(b, module.num_embeddings, dy2.shape[-1], dtype=dy.dtype, device=dy.device)
        g.scatter_add_(1, idx.unsqueeze(-1).expand_as(dy2), dy2)
        if module.padding_idx is not None:
            g[:, module.padding_idx] = 0
        return {"weight": g}
    raise TypeError(f"no per-example rule for {type(module).__name__}")


def _capture_layer_calls(model: nn.Module, loss_fn: LossFn, batch: Any, selection: ParameterSelection):
    """One forward and one backward of the summed loss, keeping each selected layer call's
    input and output gradient: ``(losses, [(layer name, input, output gradient), ...])``."""
    modules = dict(model.named_modules())
    owners = sorted({name.rpartition(".")[0] for name in selection.names})
    calls: List[Tuple[str, torch.Tensor, torch.Tensor]] = []

    def make_hook(owner: str):
        def hook(module, inputs, output):
            calls.append((owner, inputs[0].detach(), output))

        return hook

    handles = [modules[o].register_forward_hook(make_hook(o)) for o in owners]
    try:
        with requires_grad_only(model, selection), torch.enable_grad():
            losses = loss_fn(model, batch)
            dys = torch.autograd.grad(losses.sum(), [c[2] for c in calls], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    b = losses.shape[0]
    captured = []
    for (owner, x, _), dy in zip(calls, dys):
        if dy is None:
            continue
        if x.shape[0] != b or dy.shape[0] != b:
            raise SharedAcrossBatchError(
                f"Layer '{owner}' runs on a tensor without the batch dimension (shared by all examples, like BERT's "
                "position embeddings), so hooks cannot split its gradient per example. Exclude it from the "
                "influence parameters or use strategy='jvp'."
            )
        captured.append((owner, x, dy))
    return losses.detach(), captured


def _hooked_gradients(model: nn.Module, loss_fn: LossFn, batch: Any, selection: ParameterSelection) -> torch.Tensor:
    losses, captured = _capture_layer_calls(model, loss_fn, batch, selection)
    modules = dict(model.named_modules())
    b = losses.shape[0]
    per_param: Dict[str, torch.Tensor] = {}
    for owner, x, dy in captured:
        for attr, g in _layer_per_example_grads(modules[owner], x, dy).items():
            key = f"{owner}.{attr}" if owner else attr
            per_param[key] = per_param[key] + g if key in per_param else g
    dtype = losses.dtype if losses.is_floating_point() else torch.get_default_dtype()
    pieces = [
        per_param[n].reshape(b, -1) if n in per_param else torch.zeros(b, int(torch.Size(s).numel()), dtype=dtype, device=losses.device)
        for n, s in zip(selection.names, selection.shapes)
    ]
    return torch.cat(pieces, dim=1)


def _hooked_directional(model: nn.Module, loss_fn: LossFn, batch: Any, selection: ParameterSelection, directions: torch.Tensor) -> torch.Tensor:
    """grad L(z_j) . v_t from layer inputs and output gradients without forming per-example
    gradients: for few directions this saves writing and reading a (B, P) matrix."""
    losses, captured = _capture_layer_calls(model, loss_fn, batch, selection)
    modules = dict(model.named_modules())
    parts = dict(zip(selection.names, selection.unflatten(directions)))  # name -> (T, *shape)
    out = torch.zeros(losses.shape[0], directions.shape[0], dtype=directions.dtype, device=losses.device)
    for owner, x, dy in captured:
        module = modules[owner]
        weight = parts.get(f"{owner}.weight" if owner else "weight")
        bias = parts.get(f"{owner}.bias" if owner else "bias")
        b = x.shape[0]
        if isinstance(module, nn.Linear):
            x2, dy2 = x.reshape(b, -1, x.shape[-1]).to(out.dtype), dy.reshape(b, -1, dy.shape[-1]).to(out.dtype)
            if weight is not None:
                for t in range(weight.shape[0]):  # (x W_t^T) . dy, summed over positions and outputs
                    out[:, t] += ((x2 @ weight[t].T) * dy2).sum((1, 2))
            if bias is not None:
                out += dy2.sum(1) @ bias.T
        else:  # LayerNorm and Embedding: their per-example gradients are small, form them
            for attr, g in _layer_per_example_grads(module, x, dy).items():
                vec = weight if attr == "weight" else bias
                if vec is not None:
                    out += g.reshape(b, -1).to(out.dtype) @ vec.reshape(vec.shape[0], -1).T
    return out


def _vmapped_gradients(model: nn.Module, loss_fn: LossFn, batch: Any, selection: ParameterSelection) -> torch.Tensor:
    flat = selection.values(model)

    def one_loss(theta: torch.Tensor, example: Any) -> torch.Tensor:
        single = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, example)
        return _functional_losses(model, loss_fn, selection, theta, single)[0]

    return vmap(grad(one_loss), in_dims=(None, 0))(flat, batch)


def per_example_gradients(
    model: nn.Module, loss_fn: LossFn, batch: Any, selection: ParameterSelection, strategy: str = "auto"
) -> torch.Tensor:
    """grad L(z_j) for every example of ``batch``: shape (B, P), P = selection.numel.

    strategy: "hooks", "vmap", or "auto" (hooks when every selected parameter belongs
    to a supported batch-first layer, else vmap).
    """
    if strategy == "auto":
        strategy = resolve_strategy(model, loss_fn, batch, selection)
        if strategy == "jvp":
            raise RuntimeError("Neither hooks nor vmap can compute per-example gradients of this model; use directional_derivatives(..., strategy='jvp').")
    if strategy == "hooks":
        return _hooked_gradients(model, loss_fn, batch, selection)
    if strategy == "vmap":
        return _vmapped_gradients(model, loss_fn, batch, selection)
    raise ValueError(f"per_example_gradients: strategy must be auto, hooks or vmap, got {strategy!r}")


def _jvp_directional(model: nn.Module, loss_fn: LossFn, batch: Any, selection: ParameterSelection, directions: torch.Tensor) -> torch.Tensor:
    flat = selection.values(model)
    cols = []
    for v in directions:
        _, tangent = jvp(lambda theta: _functional_losses(model, loss_fn, selection, theta, batch), (flat,), (v.to(flat.dtype),))
        cols.append(tangent)
    return torch.stack(cols, dim=1)


def directional_derivatives(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    selection: ParameterSelection,
    directions: torch.Tensor,
    strategy: str = "auto",
) -> torch.Tensor:
    """grad L(z_j) . v_t for every example j of ``batch`` and direction t: (B, T).

    ``directions`` has shape (T, P). With per-example gradients (hooks/vmap) the cost
    is one pass whatever T; with jvp it is one forward-mode pass per direction.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    strategy = resolve_strategy(model, loss_fn, batch, selection, strategy)
    if strategy == "jvp":
        return _jvp_directional(model, loss_fn, batch, selection, directions)
    if strategy == "hooks" and directions.shape[0] <= _FEW_DIRECTIONS:
        return _hooked_directional(model, loss_fn, batch, selection, directions)
    g = per_example_gradients(model, loss_fn, batch, selection, strategy)
    return g @ directions.to(g.dtype).T


def resolve_strategy(model: nn.Module, loss_fn: LossFn, batch: Any, selection: ParameterSelection, strategy: str = "auto") -> str:
    """The concrete strategy for this model: "auto" tries hooks, then vmap, on ``batch``
    (which should hold at least two examples), and falls back to jvp."""
    if strategy != "auto":
        return strategy
    if hookable(model, selection):
        try:
            _hooked_gradients(model, loss_fn, batch, selection)
            return "hooks"
        except SharedAcrossBatchError:
            pass
    try:
        _vmapped_gradients(model, loss_fn, batch, selection)
        return "vmap"
    except RuntimeError:
        # vmap refuses data-dependent control flow; forward mode needs no batching rule.
        return "jvp"


def batch_gradient(model: nn.Module, loss_fn: LossFn, batch: Any, selection: ParameterSelection, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_j w_j grad L(z_j) over a batch (w = 1 by default): shape (P,). One backward pass."""
    with requires_grad_only(model, selection), torch.enable_grad():
        losses = loss_fn(model, batch)
        total = losses.sum() if weights is None else (losses * weights.to(losses.dtype)).sum()
        grads = torch.autograd.grad(total, selection.tensors(model), allow_unused=True)
    return selection.flatten([torch.zeros(s, dtype=losses.dtype, device=losses.device) if g is None else g for g, s in zip(grads, selection.shapes)])
