"""Training: the LLM2Vec recipe on the Hugging Face Trainer (MNTP, SimCSE, supervised), and ``convert``.

The stages and their settings (:mod:`.config`) import eagerly and lightly; what trains (peft, the Trainer) is
imported on first use, so that the CLI can list the stages without paying for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes
from .config import (
    STAGES,
    MNTPConfig,
    Recipe,
    SimCSEConfig,
    Stage,
    StageConfig,
    SupervisedConfig,
    load_recipe,
    stage_config,
)

if TYPE_CHECKING:
    from .conversion import convert, convert_seeds
    from .mntp import train_mntp
    from .simcse import train_simcse
    from .supervised import train_supervised
    from .trainer import NonFiniteLossError, last_checkpoint

__getattr__ = lazy_attributes(  # name -> the module that defines it
    __name__,
    {
        "convert": "conversion",
        "convert_seeds": "conversion",
        "train_mntp": "mntp",
        "train_simcse": "simcse",
        "train_supervised": "supervised",
        "NonFiniteLossError": "trainer",
        "last_checkpoint": "trainer",
    },
)

__all__ = [
    "STAGES",
    "MNTPConfig",
    "NonFiniteLossError",
    "Recipe",
    "SimCSEConfig",
    "Stage",
    "StageConfig",
    "SupervisedConfig",
    "convert",
    "convert_seeds",
    "last_checkpoint",
    "load_recipe",
    "stage_config",
    "train_mntp",
    "train_simcse",
    "train_supervised",
]
