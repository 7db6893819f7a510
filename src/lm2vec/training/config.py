"""The training stages (:data:`STAGES`), their settings (one dataclass per stage, peft-style) and recipes: the
stages of a conversion, in order.

A recipe is a small JSON file: ``{"description", "how_chosen", "stages": [{"stage": "mntp", ...}, ...]}``.
Every key is checked against the stage's dataclass before anything is loaded or trained. This module is light
(no torch, peft or Trainer): the CLI builds its parser from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import import_module, resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..encoder import Encoder


# The JSON types of config fields' scalar annotations.
_SCALARS: dict[str, type | tuple[type, ...]] = {
    "bool": bool,
    "int": int,
    "float": (int, float),
    "str": str,
    "None": type(None),
}


def _is(value: object, kind: str) -> bool:
    """Whether ``value`` is of the type a config field annotates (``int``, ``list[str]``, ``dict[str, str]``, ...);
    JSON's ``true`` is not a number here, an integer is a float."""
    if kind.startswith(("list[", "dict[")):
        inner = kind[5:-1].split(", ")
        if kind.startswith("list["):
            return isinstance(value, list) and all(_is(item, inner[0]) for item in value)
        return isinstance(value, dict) and all(_is(k, inner[0]) and _is(v, inner[1]) for k, v in value.items())
    if isinstance(value, bool):
        return kind == "bool"
    return isinstance(value, _SCALARS[kind])


@dataclass
class StageConfig:
    """Settings every stage shares: optimisation, LoRA, checkpoints, evaluation on STS-B dev."""

    data: list[str] = field(default_factory=list)  # files (or names under the data folder), or hub dataset ids
    steps: int = 200
    batch_size: int = 64  # per device
    learning_rate: float = 3e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_length: int = 128  # tokens per text (cut to the positions of a model that has fewer, with a warning)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | str = "all-linear"  # every linear layer but the head (q,k,v,o,gate,up,down on Llama)
    lora_layers: int | None = None  # LoRA on the top N layers only (a shorter backward pass); None: all
    bf16: bool | None = None  # None: where bf16 measures faster on this machine (trainer.bf16_pays)
    gradient_checkpointing: bool = False
    seed: int = 42
    save_steps: int = 50
    save_total_limit: int | None = 3
    eval_steps: int | None = None  # STS-B dev every N steps (and at the end); None: no evaluation
    eval_pairs: int | None = None  # evaluate on the first N dev pairs only (CPU budgets); None: all
    select_best: bool = True  # keep the checkpoint with the best dev score (needs eval_steps)
    logging_steps: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        for f in fields(self):  # recipes and --set give JSON: "false" or "no" must not switch a setting on
            value, kinds = getattr(self, f.name), str(f.type).split(" | ")
            if not any(_is(value, kind) for kind in kinds):
                raise ValueError(f"{f.name} must be {' or '.join(kinds)}, got {value!r}")
        for name in ("steps", "batch_size", "max_length", "lora_r", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.eval_steps is not None and self.select_best and self.save_steps % self.eval_steps:
            raise ValueError(f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps})")


@dataclass
class MNTPConfig(StageConfig):
    """Masked next token prediction: the masked token at i is predicted from the output at i-1."""

    data: list[str] = field(default_factory=lambda: ["corpus/wikitext2_raw_test.txt"])
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_length: int = 512  # the chunk length texts are concatenated and cut into (at most the model's positions)
    mlm_probability: float = 0.2
    mask_strategy: str = "80/10/10"  # or "all": every chosen token becomes the mask token
    mask_token: str = "_"  # an existing token, "eos", or "new" (adds <mask> to the vocabulary)
    select_best: bool = False  # MNTP does not move STS by itself; keep the last step

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_strategy not in ("80/10/10", "all"):
            raise ValueError(f"mask_strategy must be '80/10/10' or 'all', got {self.mask_strategy!r}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability!r}")


@dataclass
class ContrastiveConfig(StageConfig):
    """What the contrastive stages share: InfoNCE's scale, passes, negatives across devices, Matryoshka."""

    scale: float = 20.0  # 1 / temperature
    mini_batch_size: int | None = None  # rows per forward pass, sorted by length (less padding); None: one pass
    gather_across_devices: bool = True
    matryoshka_dims: list[int] | None = None  # e.g. [64, 128, 256, 576]: the loss summed over these leading dims

    def __post_init__(self) -> None:
        super().__post_init__()
        dims = self.matryoshka_dims
        if dims is not None and (not dims or any(not isinstance(d, int) or d < 1 for d in dims)):
            raise ValueError(f"matryoshka_dims must be a list of positive integers, got {dims!r}")


@dataclass
class SimCSEConfig(ContrastiveConfig):
    """Unsupervised SimCSE: each sentence twice with dropout; InfoNCE over in-batch negatives."""

    data: list[str] = field(default_factory=lambda: ["corpus/wiki1m_10k.txt", "corpus/wiki1m_prefix.txt"])
    attention_dropout: float = 0.3


@dataclass
class SupervisedConfig(ContrastiveConfig):
    """Supervised contrastive: (query, positive, negative) triplets, in-batch + hard negatives."""

    data: list[str] = field(default_factory=lambda: ["pairs/snli_triplets/train.jsonl"])
    learning_rate: float = 2e-4
    scale: float = 50.0
    instructions: dict[str, str] = field(default_factory=dict)  # dataset name (file's folder) -> instruction
    default_instruction: str = "Retrieve semantically similar text: "
    grad_cache: bool = False  # with mini_batch_size: free each pass's activations (GradCache); memory ~ one pass
    kept_graphs: int = 0  # with grad_cache: the last N passes keep their graphs, not run twice (memory ~ N passes)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grad_cache and not self.mini_batch_size:
            raise ValueError("grad_cache needs mini_batch_size (the rows of each cached forward pass)")
        if self.kept_graphs < 0 or (self.kept_graphs and not self.grad_cache):
            raise ValueError(f"kept_graphs needs grad_cache and must be >= 0, got {self.kept_graphs!r}")


@dataclass(frozen=True)
class Stage:
    """A training stage: its settings' dataclass and its train function, ``module:function`` under this package,
    imported when the stage runs (reading a recipe or building the CLI needs neither peft nor the Trainer).

    Every train function takes ``(model, config, output_dir, *, data_root=None, resume=False)`` and returns the
    trained :class:`~lm2vec.Encoder`, also saved under ``output_dir/encoder``.
    """

    config: type[StageConfig]
    function: str

    def train_function(self) -> Callable[..., Encoder]:
        module, _, name = self.function.partition(":")
        return getattr(import_module(f"{__package__}.{module}"), name)

    def train(
        self,
        model: Encoder | str | os.PathLike | None,
        config: StageConfig,
        output_dir: str | os.PathLike,
        *,
        data_root: str | os.PathLike | None = None,
        resume: bool = False,
    ) -> Encoder:
        return self.train_function()(model, config, output_dir, data_root=data_root, resume=resume)


STAGES: dict[str, Stage] = {  # in the order a recipe runs them
    "mntp": Stage(MNTPConfig, "mntp:train_mntp"),
    "simcse": Stage(SimCSEConfig, "simcse:train_simcse"),
    "supervised": Stage(SupervisedConfig, "supervised:train_supervised"),
}


def stage_config(stage: str, settings: dict | None = None) -> StageConfig:
    """Build a stage's config, refusing unknown stages and keys with the list of known ones."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are: {', '.join(STAGES)}")
    cls = STAGES[stage].config
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings or {}) - known)
    if unknown:
        raise ValueError(
            f"unknown {stage} setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}"
        )
    return cls(**(settings or {}))


@dataclass
class Recipe:
    name: str
    description: str
    how_chosen: str
    stages: list[tuple[str, StageConfig]]

    def with_seed(self, seed: int) -> Recipe:
        """This recipe with every stage's seed (data order, LoRA initialisation, dropout) set to ``seed``."""
        return replace(self, stages=[(stage, replace(config, seed=seed)) for stage, config in self.stages])

    def to_dict(self) -> dict:
        stages = [{"stage": stage} | asdict(config) for stage, config in self.stages]
        return {"description": self.description, "how_chosen": self.how_chosen, "stages": stages}


def builtin_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in resources.files(__package__).joinpath("recipes").iterdir())


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A packaged recipe by name (``reference``, ``small``, ``cpu``) or a JSON file; checked completely."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        text, name = path.read_text(), path.stem
    elif str(name_or_path) in builtin_recipes():
        name = str(name_or_path)
        text = resources.files(__package__).joinpath("recipes", f"{name}.json").read_text()
    else:
        raise ValueError(f"unknown recipe {str(name_or_path)!r}; packaged recipes: {', '.join(builtin_recipes())}")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"recipe {name}: invalid JSON ({err})") from None
    unknown = sorted(set(raw) - {"description", "how_chosen", "stages"})
    if unknown or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise ValueError(
            f"recipe {name}: expected keys description, how_chosen, stages (a non-empty list); got {sorted(raw)}"
        )
    stages = []
    for i, entry in enumerate(raw["stages"]):
        settings = dict(entry)
        stage = settings.pop("stage", None)
        try:
            stages.append((stage, stage_config(stage, settings)))
        except (TypeError, ValueError) as err:
            raise ValueError(f"recipe {name}, stage {i + 1}: {err}") from None
    return Recipe(name, raw.get("description", ""), raw.get("how_chosen", ""), stages)
