"""Run an :class:`lm2vec.Encoder` in MTEB (v2): its encoder protocol, its prompt rules and a valid ``ModelMeta``.

mteb is an optional extra (``lm2vec[eval]``), so it is imported only when the adapter is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..encoder import Encoder

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models import ModelMeta
    from mteb.types import Array, BatchedInput, PromptType
    from torch.utils.data import DataLoader


class MTEBEncoder:
    """An :class:`lm2vec.Encoder` as an MTEB encoder: ``mteb.evaluate(MTEBEncoder(encoder), tasks)``.

    ``prompts`` (default: the encoder's own) maps MTEB keys to instructions; as in mteb's
    sentence-transformers wrapper, the first present of ``"{task}-{query|document}"``, ``task``,
    ``"{task type}-{query|document}"``, ``task type`` and ``"query"``/``"document"`` is used, else the
    encoder's default prompt, else none. Keys are not checked against mteb's task registry, so prompts
    for locally defined tasks work too. ``batch_size`` overrides the one mteb passes in ``encode_kwargs``
    (32 unless set there). The metadata (``mteb_model_meta``, see :func:`model_meta`) describes the
    encoder as it is when wrapped: wrap it again after training it further.
    """

    def __init__(
        self,
        encoder: Encoder,
        prompts: dict[str, str] | None = None,
        batch_size: int | None = None,
        *,
        name: str | None = None,
    ):
        self.encoder = encoder
        self.prompts = dict(encoder.prompts if prompts is None else prompts)
        self.batch_size = batch_size
        self.mteb_model_meta = model_meta(encoder, self.prompts, name)

    def instruction(self, task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str | None:
        """The instruction for this task and side, by mteb's own lookup (``mteb.models.abs_encoder.get_prompt``).

        Where no key matches, the encoder's default prompt (if it has one) applies, as it does for a
        sentence-transformers model in mteb.
        """
        from mteb.models.abs_encoder import get_prompt

        prompt = get_prompt(self.prompts, task_metadata, prompt_type)
        return prompt if prompt is not None else self.encoder.resolve_instruction(None, None, None)

    def encode(
        self,
        inputs: DataLoader[BatchedInput],
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embed the texts of mteb's DataLoader as a float32 (n, dim) array.

        Batches carry the text to embed under ``"text"``; mteb has already joined a document's title to it
        and a query's per-query instruction, as its sentence-transformers wrapper expects.
        """
        if kwargs.get("precision", "float32") != "float32":
            raise ValueError(f"lm2vec produces float32 embeddings only, not precision={kwargs['precision']!r}")
        texts = []
        for batch in inputs:
            if "text" not in batch:
                raise ValueError(
                    f"{task_metadata.name} gives no text to embed (fields {sorted(batch)}): lm2vec encodes text only"
                )
            texts.extend(batch["text"])
        embeddings = self.encoder.encode(
            texts,
            instruction=self.instruction(task_metadata, prompt_type),
            batch_size=self.batch_size or kwargs.get("batch_size", 32),
            show_progress_bar=kwargs.get("show_progress_bar"),
            convert_to_tensor=True,
        )
        return torch.as_tensor(embeddings).float().numpy()  # a tensor: bf16 has no numpy dtype

    def similarity(self, embeddings1: Array, embeddings2: Array) -> torch.Tensor:
        """Every row of ``embeddings1`` with every row of ``embeddings2``, by the encoder's similarity function."""
        return self.encoder.similarity(torch.as_tensor(embeddings1), torch.as_tensor(embeddings2))

    def similarity_pairwise(self, embeddings1: Array, embeddings2: Array) -> Array:
        """Each row of ``embeddings1`` with the same row of ``embeddings2``, by the encoder's similarity function."""
        return self.encoder.similarity_pairwise(torch.as_tensor(embeddings1), torch.as_tensor(embeddings2))


def model_meta(encoder: Encoder, prompts: dict[str, str], name: str | None = None) -> ModelMeta:
    """What mteb records with the results, and where it writes them (``results/NAME/REVISION``).

    The revision is a checksum of the weights, settings and prompts: mteb skips tasks whose results it
    already holds for the same name and revision, so two checkpoints of one model must not share one.
    """
    from mteb.models import ModelMeta
    from mteb.models.model_meta import ScoringFunction

    info = encoder.info()
    return ModelMeta(
        loader=None,
        name=name or f"lm2vec/{_source_name(encoder)}-{info['attention']}-{info['pooling']}",
        revision=revision(encoder, prompts),
        release_date=None,
        languages=None,
        n_parameters=info["parameters"],
        memory_usage_mb=None,
        max_tokens=encoder.max_length,
        embed_dim=encoder.dim,
        license=None,
        open_weights=None,
        public_training_code=None,
        public_training_data=None,
        framework=["PyTorch", "Transformers"],
        similarity_fn_name=ScoringFunction(encoder.similarity_fn_name),
        use_instructions=bool(prompts),
        training_datasets=None,
    )


def _source_name(encoder: Encoder) -> str:
    """The last part of the model's hub id or directory, else its architecture."""
    source = encoder.model.config.name_or_path
    return Path(source).name if source else encoder.model.config.model_type


def revision(encoder: Encoder, prompts: dict[str, str]) -> str:
    """A short checksum of the settings, the prompts and every weight (see :meth:`lm2vec.Encoder.fingerprint`)."""
    return encoder.fingerprint(prompts)[:12]
