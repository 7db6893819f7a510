"""The README.md a saved encoder carries, as sentence-transformers writes one: what the model is, how it was made,
and how to load it. :meth:`lm2vec.Encoder.save` writes it; ``lm2vec convert`` adds the recipe, its stages and
their STS-B scores (``training``).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PretrainedConfig

from .st_format import STSettings


def write_card(
    path: Path, config: PretrainedConfig, dim: int, settings: STSettings, training: str | None = None
) -> Path:
    """Write ``path / "README.md"`` for an encoder of the model ``config`` with ``dim`` dimensions and ``settings``;
    ``training``: markdown on how the encoder was trained."""
    base = config._name_or_path or config.model_type
    front = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity", "tags": ["lm2vec"]}
    prompts = "\n".join(f"- `{name}`: {text!r}" for name, text in settings.prompts.items()) or "none"
    convention = (
        "the reference llm2vec's (instruction and text joined by a space, only the text's own tokens pooled; "
        "reproduced by lm2vec, not by sentence-transformers)"
        if settings.reference_style
        else f"a prefix, its tokens attended to {'and' if settings.include_prompt else 'but not'} pooled "
        "(sentence-transformers' prompts)"
    )
    lines = [
        "---",
        *(f"{key}: {json.dumps(value)}" for key, value in front.items()),
        "---",
        "",
        f"# {path.name}",
        "",
        f"A text encoder made from the decoder-only LLM `{base}` ({config.model_type}) with lm2vec, following the "
        "LLM2Vec recipe (BehnamGhader et al., 2024).",
        "",
        f"- Attention: {'bidirectional' if settings.bidirectional else 'causal'}",
        f"- Pooling: {settings.pooling.value}{', normalized' if settings.normalize else ''}; {dim} dimensions; at most "
        f"{settings.max_length} tokens per text",
        *([f"- Dense modules after the pooling: {len(settings.dense)}, to {dim} dimensions"] if settings.dense else []),
        *(
            [f"- Trained for truncation (Matryoshka) to {', '.join(map(str, settings.matryoshka_dims))} dimensions"]
            if settings.matryoshka_dims
            else []
        ),
        f"- Instructions: {convention}",
        f"- Prompts: {prompts}",
        "",
    ]
    if training:
        lines += ["## Training", "", training.strip(), ""]
    lines += [
        "## Usage",
        "",
        "```python",
        "import lm2vec",
        "",
        f'encoder = lm2vec.load("{path.name}")',
        'embeddings = encoder.encode(["A first sentence.", "Another one."], normalize_embeddings=True)',
        "```",
        "",
        "The directory is also a sentence-transformers model:",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("{path.name}")',
        'embeddings = model.encode(["A first sentence.", "Another one."])',
        "```",
        "",
    ]
    card = path / "README.md"
    card.write_text("\n".join(lines))
    return card
