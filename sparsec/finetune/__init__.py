"""Distillation-aware sparse fine-tuning (SquareHead): losses, gradual schedules, the trainer.

    from sparsec.finetune import FinetuneConfig, finetune
    history = finetune(student, teacher, token_ids, FinetuneConfig(steps=100, squarehead=1.0))

See ``trainer.py`` for the contract, ``losses.py`` for the exact loss definitions and
``distributed.py`` for running under ``torchrun``.
"""

from __future__ import annotations

from sparsec.finetune.batches import DataInputError, TokenData
from sparsec.finetune.checkpoint import CheckpointError
from sparsec.finetune.losses import (
    LossComponents,
    LossInputError,
    LossWeights,
    causal_lm_ce,
    distillation_loss,
    kl_distillation,
    squarehead,
    squarehead_terms,
)
from sparsec.finetune.model import DistillModel, ModelInputError, as_distill_model
from sparsec.finetune.trainer import FinetuneConfig, FinetuneError, History, finetune

__all__ = [
    "CheckpointError", "DataInputError", "DistillModel", "FinetuneConfig", "FinetuneError", "History",
    "LossComponents", "LossInputError", "LossWeights", "ModelInputError", "TokenData", "as_distill_model",
    "causal_lm_ce", "distillation_loss", "finetune", "kl_distillation", "squarehead", "squarehead_terms",
]
