"""Training: the LLM2Vec recipe on the Hugging Face Trainer (MNTP, SimCSE, supervised), and ``convert``."""

from .config import MNTPConfig, Recipe, SimCSEConfig, StageConfig, SupervisedConfig, load_recipe, stage_config
from .convert import convert
from .mntp import train_mntp
from .simcse import train_simcse
from .supervised import train_supervised
from .trainer import NonFiniteLossError, last_checkpoint

__all__ = [
    "MNTPConfig",
    "NonFiniteLossError",
    "Recipe",
    "SimCSEConfig",
    "StageConfig",
    "SupervisedConfig",
    "convert",
    "last_checkpoint",
    "load_recipe",
    "stage_config",
    "train_mntp",
    "train_simcse",
    "train_supervised",
]
