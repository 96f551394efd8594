"""Structured configs: the schema every YAML under ``configs/`` is checked against.

Each dataclass documents its fields and validates ranges in ``__post_init__``; the
command line composes YAML + overrides with Hydra, then turns the result into these
objects with :func:`to_settings` so that a typo or an impossible value is refused
before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf

from fastif.errors import ConfigError

SOLVERS = ("exact", "cg", "lissa")
FEATURES = ("pooled", "mean", "pooled+probs")
METRICS = ("l2", "ip")


def _check(condition: bool, key: str, problem: str, fix: str) -> None:
    if not condition:
        raise ConfigError(f"Invalid config value for '{key}': {problem}. Fix: {fix}.")


@dataclass
class PathsConfig:
    outputs: str = field(default="./outputs", metadata={"help": "Root of all run folders (env FASTIF_OUTPUTS overrides the default)."})


@dataclass
class ModelConfig:
    name_or_path: str = field(default="demo", metadata={"help": "'demo' (the embedded tiny BERT, trained on first use), a local HF checkpoint dir, or a hub id."})
    num_labels: int = field(default=2, metadata={"help": "Number of classes of the sequence classifier."})
    trainable: List[str] = field(default_factory=lambda: ["*"], metadata={"help": "Name patterns (fnmatch globs, or 're:<regex>') of parameters that train."})
    influence_params: List[str] = field(default_factory=lambda: ["*"], metadata={"help": "Name patterns of the parameters the Hessian and gradients are taken over."})
    max_length: int = field(default=64, metadata={"help": "Tokenizer truncation length."})
    # Architecture of a model built from scratch (name_or_path=demo); ignored for checkpoints.
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 128
    dropout: float = field(default=0.0, metadata={"help": "Hidden and attention dropout of a model built from scratch (name_or_path=demo); the demo learns fastest without."})
    init_seed: int = field(default=0, metadata={"help": "Seed of the random initialisation of a model built from scratch (name_or_path=demo)."})
    initializer_range: float = field(default=0.1, metadata={"help": "Std of the random weights of a model built from scratch (BERT's 0.02 makes the tiny demo model learn much more slowly)."})
    alignment_init: float = field(default=1.0, metadata={"help": "Scale of the word-alignment initialisation of the first attention layer of a model built from scratch: its query/key start as the identity, with the segment direction reflected in the key, so hypothesis words attend to the same words in the premise (0 disables)."})

    def __post_init__(self) -> None:
        _check(self.num_labels >= 2, "model.num_labels", f"got {self.num_labels}, need >= 2", "set model.num_labels=2 or 3")
        _check(self.max_length >= 4, "model.max_length", f"got {self.max_length}, need >= 4", "use e.g. model.max_length=128")
        _check(len(self.trainable) > 0, "model.trainable", "empty pattern list", "give at least one pattern, e.g. '[*]'")
        _check(len(self.influence_params) > 0, "model.influence_params", "empty pattern list", "give at least one pattern, e.g. '[classifier.*]'")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            _check(getattr(self, key) >= 1, f"model.{key}", f"got {getattr(self, key)}, need >= 1", f"set model.{key} to a positive integer")
        _check(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
               f"{self.hidden_size} is not a multiple of model.num_attention_heads={self.num_attention_heads}",
               "choose hidden_size divisible by num_attention_heads, e.g. model.hidden_size=64 model.num_attention_heads=2")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"got {self.dropout}, need 0 <= dropout < 1", "e.g. model.dropout=0.1")
        _check(self.initializer_range > 0, "model.initializer_range", f"got {self.initializer_range}, need > 0", "e.g. model.initializer_range=0.1")
        _check(self.alignment_init >= 0, "model.alignment_init", f"got {self.alignment_init}, need >= 0", "e.g. model.alignment_init=1.0 (0 disables)")


@dataclass
class DataConfig:
    name: str = field(default="demo", metadata={"help": "Dataset name: demo, mnli, hans, anli, snli, or 'files' for local files."})
    train: str = field(default="train", metadata={"help": "Training split name, or a path to a local file."})
    eval: str = field(default="dev", metadata={"help": "In-distribution evaluation split, or a path."})
    challenge: Optional[str] = field(default="challenge", metadata={"help": "Challenge split (HANS-style), or a path; null for none."})
    label_map: str = field(default="2way", metadata={"help": "'2way' (entailment vs non-entailment) or '3way'."})
    max_train: Optional[int] = field(default=None, metadata={"help": "Use only the first n training examples (null: all)."})
    demo_train_size: int = field(default=8000, metadata={"help": "Size of the generated demo training split."})
    demo_eval_size: int = field(default=600, metadata={"help": "Size of the generated demo dev and challenge splits."})
    seed: int = field(default=0, metadata={"help": "Seed of the demo data generator."})
    demo_shortcut: float = field(default=0.93, metadata={"help": "Fraction of demo train/dev pairs with every hypothesis word in the premise that are entailment (the spurious overlap shortcut; the challenge split is always 50/50)."})
    pool: Optional[str] = field(default=None, metadata={"help": "Candidate pool of `fastif finetune-correct` (split name, path or '<dataset>:<split>'); null = the training split. Set it to data the model never saw (e.g. hans:train) for the unseen-pool experiments."})
    root: Optional[str] = field(default=None, metadata={"help": "Folder that relative file names in train/eval/challenge/pool are looked up in; 'nli-pack' = the offline NLI pack found by fastif.data.nli.shared_nli_dir() (env FASTIF_NLI_DIR); null = the working directory."})

    def __post_init__(self) -> None:
        _check(self.label_map in ("2way", "3way"), "data.label_map", f"got '{self.label_map}'", "use 2way or 3way")
        _check(self.max_train is None or self.max_train > 0, "data.max_train", f"got {self.max_train}", "use a positive integer or null")
        _check(self.demo_train_size >= 10, "data.demo_train_size", f"got {self.demo_train_size}, need >= 10", "raise it")
        _check(self.demo_eval_size >= 10, "data.demo_eval_size", f"got {self.demo_eval_size}, need >= 10", "raise it")
        _check(0.0 <= self.demo_shortcut <= 1.0, "data.demo_shortcut", f"got {self.demo_shortcut}, need 0 <= x <= 1", "e.g. data.demo_shortcut=0.93")
        _check(self.pool is None or bool(str(self.pool).strip()), "data.pool", "empty string", "name a split or file, or set data.pool=null (the training split)")
        _check(self.root is None or bool(str(self.root).strip()), "data.root", "empty string", "use data.root=nli-pack, a folder, or null")


@dataclass
class TrainConfig:
    epochs: float = field(default=4.0, metadata={"help": "Training epochs (may be fractional)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size."})
    precision: str = field(default="fp32", metadata={"help": "fp32, bf16 or fp16 (the last two on CUDA only)."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of the training steps over which the learning rate warms up linearly from 0 (then decays linearly to 0)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this value before each step; 0 disables clipping."})

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "train.epochs", f"got {self.epochs}, need > 0", "set train.epochs to a positive number, e.g. train.epochs=3")
        _check(self.learning_rate > 0, "train.learning_rate", f"got {self.learning_rate}, need > 0", "e.g. train.learning_rate=2e-5")
        _check(self.weight_decay >= 0, "train.weight_decay", f"got {self.weight_decay}, need >= 0", "e.g. train.weight_decay=0.01")
        _check(self.batch_size >= 1, "train.batch_size", f"got {self.batch_size}, need >= 1", "e.g. train.batch_size=32")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", f"got {self.eval_batch_size}, need >= 1", "e.g. train.eval_batch_size=128")
        _check(self.precision in ("fp32", "bf16", "fp16"), "train.precision", f"got '{self.precision}'", "use fp32, bf16 or fp16")
        _check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", f"got {self.warmup_ratio}, need 0 <= x < 1", "e.g. train.warmup_ratio=0.1")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", f"got {self.max_grad_norm}, need >= 0", "e.g. train.max_grad_norm=1.0 (0 disables clipping)")


@dataclass
class HvpConfig:
    solver: str = field(default="lissa", metadata={"help": "Inverse-HVP solver: exact (dense, small parameter sets), cg or lissa."})
    damping: float = field(default=0.01, metadata={"help": "lambda in (H + lambda I)^-1 (for LiSSA too: fastif derives d = lambda / scale). Must exceed minus the smallest Hessian eigenvalue."})
    scale: float = field(default=0.0, metadata={"help": "LiSSA scale s (> top Hessian eigenvalue); 0 = choose from a power-iteration estimate."})
    depth: int = field(default=500, metadata={"help": "LiSSA recursion steps per chain."})
    batch_size: int = field(default=8, metadata={"help": "Minibatch size of each LiSSA/CG Hessian-vector product."})
    chains: int = field(default=1, metadata={"help": "Independent LiSSA chains (repeats) averaged; split across ranks under torchrun."})
    tol: float = field(default=1e-4, metadata={"help": "Stop when the relative change of s_test falls below tol (LiSSA: over a window; CG: residual)."})
    max_iter: int = field(default=200, metadata={"help": "CG iteration cap."})
    seed: int = field(default=0, metadata={"help": "Seed of the minibatch sampling."})
    tail_average: float = field(default=0.5, metadata={"help": "LiSSA: fraction of the last steps whose iterates are averaged (0 = last iterate, as the original)."})
    from_calibration: Optional[str] = field(default=None, metadata={"help": "Take every hvp field from a calibration's recommended.yaml instead: 'latest' (the latest complete `fastif hvp-calibrate` run of this experiment; what hvp=calibrated sets), a calibration run folder, or a recommended.yaml path; null = use the fields here."})

    def __post_init__(self) -> None:
        _check(0.0 <= self.tail_average < 1.0, "hvp.tail_average", f"got {self.tail_average}", "use a value in [0, 1), e.g. hvp.tail_average=0.5")
        _check(self.from_calibration is None or bool(str(self.from_calibration).strip()), "hvp.from_calibration", "empty string",
               "use hvp.from_calibration=latest, a calibration run folder, a recommended.yaml path, or null")
        _check(self.solver in SOLVERS, "hvp.solver", f"got '{self.solver}'", f"use one of {', '.join(SOLVERS)}")
        _check(self.damping >= 0, "hvp.damping", f"got {self.damping}, need >= 0", "e.g. hvp.damping=0.001")
        _check(self.scale >= 0, "hvp.scale", f"got {self.scale}, need >= 0", "e.g. hvp.scale=0 (auto) or hvp.scale=100")
        _check(self.depth >= 1, "hvp.depth", f"got {self.depth}, need >= 1", "e.g. hvp.depth=500")
        _check(self.batch_size >= 1, "hvp.batch_size", f"got {self.batch_size}, need >= 1", "e.g. hvp.batch_size=8")
        _check(self.chains >= 1, "hvp.chains", f"got {self.chains}, need >= 1", "e.g. hvp.chains=4")
        _check(self.tol >= 0, "hvp.tol", f"got {self.tol}, need >= 0", "e.g. hvp.tol=1e-4")
        _check(self.max_iter >= 1, "hvp.max_iter", f"got {self.max_iter}, need >= 1", "e.g. hvp.max_iter=200")


@dataclass
class KnnAuditConfig:
    enabled: bool = field(default=False, metadata={"help": "Run the recall audit: full-scan influence for a sample of test points, then recall@m of the kNN candidates for several k."})
    split: str = field(default="eval", metadata={"help": "Split the audited test points are sampled from: eval or challenge."})
    n_test: int = field(default=20, metadata={"help": "Number of test points audited (each needs one inverse-HVP solve)."})
    ks: List[Any] = field(default_factory=lambda: ["1%", "5%", "10%", "25%"], metadata={"help": "Candidate-set sizes audited: integers or percentages of N like '5%'."})
    ms: List[int] = field(default_factory=lambda: [10, 100], metadata={"help": "Recall is measured over the top-m most influential training points, for each m."})
    seed: int = field(default=0, metadata={"help": "Seed of the test-point sample."})

    def __post_init__(self) -> None:
        _check(self.split in ("eval", "challenge"), "knn.audit.split", f"got '{self.split}'", "use eval or challenge")
        _check(self.n_test >= 1, "knn.audit.n_test", f"got {self.n_test}, need >= 1", "e.g. knn.audit.n_test=20")
        _check(len(self.ks) > 0, "knn.audit.ks", "empty list", "e.g. knn.audit.ks=[1%,5%,10%,25%]")
        for k in self.ks:
            _check(_is_count(k), "knn.audit.ks", f"got '{k}'", "use positive integers or percentages like 5%")
        _check(len(self.ms) > 0 and all(isinstance(m, int) and m >= 1 for m in self.ms), "knn.audit.ms", f"got {self.ms}", "use positive integers, e.g. knn.audit.ms=[10,100]")


@dataclass
class KnnConfig:
    k: Any = field(default=100, metadata={"help": "Candidates per test point: an integer, a fraction of N like '5%', or 'all' (full scan)."})
    features: str = field(default="pooled", metadata={"help": "Feature space: pooled (classifier input), mean (mean last hidden state), pooled+probs."})
    normalize: bool = field(default=False, metadata={"help": "L2-normalise features before indexing."})
    classifier_module: Optional[str] = field(default=None, metadata={"help": "Name of the final Linear layer whose input are the pooled features (e.g. classifier, score, classifier.out_proj); null = auto-detect."})
    probs_weight: float = field(default=1.0, metadata={"help": "features=pooled+probs: weight of the class probabilities, relative to the L2 norm of the pooled vector."})
    backend: str = field(default="auto", metadata={"help": "auto (faiss if installed, else torch), faiss or torch (exact search only)."})
    index_factory: str = field(default="Flat", metadata={"help": "faiss index_factory string, e.g. Flat, IVF4096,Flat, HNSW32, IVF4096,PQ32."})
    metric: str = field(default="l2", metadata={"help": "l2 (distances are squared L2, smaller = closer) or ip (inner product, larger = closer)."})
    nprobe: int = field(default=16, metadata={"help": "IVF cells visited per query (recall vs speed)."})
    ef_search: int = field(default=128, metadata={"help": "HNSW candidate-list size at search time, efSearch (recall vs speed); raised to k when k is larger."})
    device: str = field(default="auto", metadata={"help": "Where the index searches: auto (GPU when faiss/torch see one), cpu, cuda or cuda:i."})
    batch_size: int = field(default=128, metadata={"help": "Batch size of feature extraction."})
    rebuild: bool = field(default=False, metadata={"help": "Rebuild the index even when a matching one exists (and instead of refusing a mismatching one)."})
    audit: KnnAuditConfig = field(default_factory=KnnAuditConfig, metadata={"help": "Recall audit of the kNN candidate set against full-scan influence."})

    def __post_init__(self) -> None:
        k = self.k
        ok = k == "all" or _is_count(k)
        _check(ok, "knn.k", f"got '{k}'", "use a positive integer, a percentage like knn.k=5%, or knn.k=all")
        _check(self.features in FEATURES, "knn.features", f"got '{self.features}'", f"use one of {', '.join(FEATURES)}")
        _check(self.probs_weight > 0, "knn.probs_weight", f"got {self.probs_weight}, need > 0", "e.g. knn.probs_weight=1.0")
        _check(self.backend in ("auto", "faiss", "torch"), "knn.backend", f"got '{self.backend}'", "use auto, faiss or torch")
        _check(bool(self.index_factory.strip()), "knn.index_factory", "empty string", "e.g. knn.index_factory=Flat")
        _check(self.metric in METRICS, "knn.metric", f"got '{self.metric}'", "use l2 or ip")
        _check(self.nprobe >= 1, "knn.nprobe", f"got {self.nprobe}", "use a positive integer")
        _check(self.ef_search >= 1, "knn.ef_search", f"got {self.ef_search}", "use a positive integer, e.g. knn.ef_search=128")
        _check(self.device == "auto" or self.device == "cpu" or self.device == "cuda" or (self.device.startswith("cuda:") and self.device[5:].isdigit()),
               "knn.device", f"got '{self.device}'", "use auto, cpu, cuda or cuda:<index>")
        _check(self.batch_size >= 1, "knn.batch_size", f"got {self.batch_size}", "use a positive integer")

    def resolve_k(self, n: int) -> int:
        """The number of candidates for a pool of n training points."""
        if self.k == "all":
            return n
        if isinstance(self.k, str):
            return max(1, min(n, round(n * float(self.k[:-1]) / 100.0)))
        return min(int(self.k), n)


def _is_count(value: Any) -> bool:
    """A positive integer or a percentage string like '5%'."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1
    return isinstance(value, str) and value.endswith("%") and _is_positive_float(value[:-1]) and float(value[:-1]) <= 100


def _is_positive_float(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def to_settings(cfg: DictConfig, schema: type) -> Any:
    """Turn a composed config into validated dataclass objects (raises ConfigError)."""
    obj = OmegaConf.to_object(cfg)
    if not dataclasses.is_dataclass(obj) or not isinstance(obj, schema):
        raise ConfigError(f"Config does not match the {schema.__name__} schema.")
    return obj
