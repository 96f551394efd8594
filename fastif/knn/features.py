"""Feature vectors of a classifier's inputs, the space the kNN prefilter searches.

Three kinds (``FeatureSpec.kind``):

- ``pooled``: the input of the model's final classification layer (for HF BERT the
  pooled [CLS] vector fed to ``model.classifier``), captured with a forward hook on
  that ``nn.Linear``. This is the space FastIF used.
- ``mean``: the attention-mask-weighted mean of the last hidden state (needs a model
  that accepts ``output_hidden_states=True`` and returns ``.hidden_states``).
- ``pooled+probs``: ``pooled`` concatenated with the softmax class probabilities,
  multiplied by ``probs_weight * ||pooled||`` so that the prediction part weighs the
  same whatever the scale of the representation (per example, hence batch-invariant).

With ``normalize=True`` each final vector is scaled to unit L2 norm (then L2 and
inner-product neighbours coincide and ip is cosine similarity).

Batch contract: a dataset item is a dict of tensors (HF style: ``input_ids``,
``attention_mask``, ``token_type_ids``, ``labels``); every tensor except ``labels``
is passed to the model as a keyword argument. The model returns logits, an object
with ``.logits``, or a mapping with ``"logits"``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from fastif.config import FEATURES, KnnConfig
from fastif.errors import ConfigError, InputError

# Names under which HF classifiers keep their classification head, in lookup order.
_HEAD_NAMES = ("classifier", "score")


@dataclass(frozen=True)
class FeatureSpec:
    """Which features to extract (recorded in the index metadata)."""

    kind: str = "pooled"
    normalize: bool = False
    classifier_module: Optional[str] = None  # None: auto-detect classifier / score / last Linear
    probs_weight: float = 1.0  # only for kind="pooled+probs"

    def __post_init__(self) -> None:
        if self.kind not in FEATURES:
            raise ConfigError(f"Unknown feature kind '{self.kind}'. Fix: use one of {', '.join(FEATURES)} (knn.features=...).")
        if not self.probs_weight > 0:
            raise ConfigError(f"probs_weight must be > 0, got {self.probs_weight}. Fix: set knn.probs_weight=1.0.")

    @classmethod
    def from_config(cls, cfg: KnnConfig) -> "FeatureSpec":
        return cls(kind=cfg.features, normalize=cfg.normalize, classifier_module=cfg.classifier_module, probs_weight=cfg.probs_weight)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FeatureSpec":
        return cls(**dict(data))


def find_classifier_layer(model: nn.Module, name: Optional[str] = None) -> tuple[str, nn.Linear]:
    """The ``nn.Linear`` that produces the logits: ``name`` if given, else ``classifier`` /
    ``score`` (their last Linear when they are a head module), else the model's last Linear."""
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            raise ConfigError(
                f"The model has no module named '{name}'. Fix: set knn.classifier_module to the final Linear layer "
                f"(e.g. one of {_last_linear_names(model)}), or null to auto-detect."
            )
        return _last_linear_in(name, modules[name])
    for head in _HEAD_NAMES:
        if head in modules:
            return _last_linear_in(head, modules[head])
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("The model has no nn.Linear layer to take pooled features from. Fix: use knn.features=mean.")
    return linears[-1]


def _last_linear_in(name: str, module: nn.Module) -> tuple[str, nn.Linear]:
    if isinstance(module, nn.Linear):
        return name, module
    inner = [(f"{name}.{n}", m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not inner:
        raise ConfigError(f"Module '{name}' contains no nn.Linear layer. Fix: set knn.classifier_module to the final Linear layer.")
    return inner[-1]


def _last_linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-3:]


def extract_features(
    model: nn.Module,
    dataset,
    spec: FeatureSpec,
    *,
    device: torch.device | str,
    batch_size: int,
    progress: bool = False,
) -> torch.Tensor:
    """Features of every dataset item, in dataset order: a CPU float32 tensor (n, d).

    Runs under ``torch.inference_mode`` with the model in eval mode (its training
    flag is restored afterwards); ``device`` is where the model already lives or is
    moved to by the caller -- batches are moved there.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}. Fix: set knn.batch_size=128.")
    if len(dataset) == 0:
        raise InputError("Cannot extract features of an empty dataset. Fix: check the training split (data.train, data.max_train).")
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    device = torch.device(device)
    accepted = _accepted_kwargs(model)
    if spec.kind == "mean" and accepted is not None and "output_hidden_states" not in accepted:
        raise ConfigError(f"features=mean needs a model whose forward accepts output_hidden_states ({type(model).__name__} does not). Fix: use knn.features=pooled.")
    layer_name, layer = find_classifier_layer(model, spec.classifier_module) if spec.kind != "mean" else (None, None)
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, args, output):
        # Keep the last call: the logits come from the final application of the layer.
        captured["input"], captured["output"] = args[0], output

    handle = layer.register_forward_hook(hook) if layer is not None else None
    was_training = model.training
    model.eval()
    chunks = []
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        with torch.inference_mode(), tqdm(total=len(dataset), desc="features", unit="ex", disable=not progress) as bar:
            for batch in loader:
                if not isinstance(batch, Mapping):
                    raise InputError("Dataset items must be dicts of tensors (input_ids, attention_mask, ...). Fix: encode the split with fastif.data.encode.")
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels" and torch.is_tensor(v) and (accepted is None or k in accepted)}
                if spec.kind == "mean":
                    inputs["output_hidden_states"] = True
                captured.clear()
                output = model(**inputs)
                logits = _logits_of(output)
                if spec.kind == "mean":
                    feats = _masked_mean(_last_hidden_state(output), inputs.get("attention_mask"))
                else:
                    feats = _pooled(captured, logits, layer_name)
                    if spec.kind == "pooled+probs":
                        probs = torch.softmax(logits.float(), dim=-1)
                        scale = spec.probs_weight * feats.float().norm(dim=-1, keepdim=True)
                        feats = torch.cat([feats.float(), probs * scale], dim=-1)
                feats = feats.float()
                if spec.normalize:
                    feats = torch.nn.functional.normalize(feats, dim=-1)
                chunks.append(feats.cpu())
                bar.update(feats.shape[0])
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    return torch.cat(chunks).contiguous()


def _accepted_kwargs(model: nn.Module) -> Optional[set[str]]:
    """Keyword names model.forward accepts, or None when it takes **kwargs (pass all)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _logits_of(output) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if logits is None:
        raise InputError(f"The model returned {type(output).__name__}, not logits. Fix: make forward return a logits tensor or an object with .logits.")
    return logits


def _last_hidden_state(output) -> torch.Tensor:
    hidden = output.get("hidden_states") if isinstance(output, Mapping) else getattr(output, "hidden_states", None)
    if not hidden:
        raise ConfigError("features=mean needs the model to return hidden_states when called with output_hidden_states=True. Fix: use knn.features=pooled.")
    return hidden[-1]


def _masked_mean(hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    hidden = hidden.float()
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _pooled(captured: dict, logits: torch.Tensor, layer_name: str) -> torch.Tensor:
    if "input" not in captured:
        raise ConfigError(f"Layer '{layer_name}' was not called in the forward pass. Fix: set knn.classifier_module to the layer that computes the logits.")
    inputs, outputs = captured["input"], captured["output"]
    if outputs.shape[-1] != logits.shape[-1]:
        raise ConfigError(
            f"Layer '{layer_name}' outputs {outputs.shape[-1]} values but the logits have {logits.shape[-1]}. "
            "Fix: set knn.classifier_module to the final Linear layer that produces the logits."
        )
    if inputs.dim() == 2:
        return inputs
    if inputs.dim() == 3 and logits.dim() == 2:
        # Decoder-style heads (e.g. HF `score`) run on every position and the model picks
        # one position per example (the last real token): find it by matching the logits.
        gap = (outputs.float() - logits.float().unsqueeze(1)).abs().amax(dim=-1)  # (B, T)
        position = gap.argmin(dim=1)
        return inputs[torch.arange(inputs.shape[0], device=inputs.device), position]
    raise ConfigError(f"Cannot take pooled features from '{layer_name}' with input shape {tuple(inputs.shape)}. Fix: use knn.features=mean.")
