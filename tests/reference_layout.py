"""Run by the reference llm2vec's own venv (``make reference-venv``): builds checkpoints in its layout with its own
code and writes the vectors the reference gives, for ``tests/test_reference_checkpoints.py`` to compare with.

    <reference venv>/bin/python tests/reference_layout.py OUT

OUT holds what the test wrote: ``base/`` (the tests' tiny random Llama) and the tests' word-level tokenizers
(``tokenizer-bos/``, ``tokenizer-plain/``). This adds ``mntp/`` (the base config and a BOS tokenizer plus a
random MNTP LoRA adapter on the bidirectional model, as the reference's MNTP training saves it, its config naming
a base the reference wraps in a chat template), ``mntp-untemplated/`` (the same without the template and BOS:
what sentence-transformers can reproduce), ``supervised/`` (a second random adapter), ``inputs.json`` and one
``<case>-<inputs>.npy`` per case: the reference's ``LLM2Vec.encode`` of those inputs.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from llm2vec import LLM2Vec
from llm2vec.models import LlamaBiModel
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedTokenizerFast

VOCAB = 128  # tests.support.VOCAB
WORDS = [f"w{i}" for i in range(4, VOCAB)]
TEMPLATED = "mistralai/Mistral-7B-Instruct-v0.2"  # a base the reference wraps in "[INST] ... [/INST]"


def tokenizer(out: Path, bos: bool = True) -> PreTrainedTokenizerFast:
    """The tests' word-level tokenizer (``tests.support.tiny_tokenizer``), written to OUT by the test."""
    return PreTrainedTokenizerFast.from_pretrained(out / ("tokenizer-bos" if bos else "tokenizer-plain"))


def lora(model, seed: int):
    """A LoRA adapter with random (non-zero) A and B: merging it changes the vectors."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def inputs() -> dict[str, list]:
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(n))) for n in rng.integers(1, 30, size=12)]
    instructions = ["w5 w6 w7", "  w8 w9 ", "w10"]
    return {"plain": texts, "pairs": [[instructions[i % 3], t] for i, t in enumerate(texts)]}


def main(out: Path) -> None:
    base = out / "base"  # the tests' tiny random Llama (tests.support), written by the test
    tokenizer(out).save_pretrained(base)

    mntp = out / "mntp"  # what the reference's MNTP stage leaves: base config + tokenizer + the adapter
    model = lora(LlamaBiModel.from_pretrained(base), seed=1)
    model.save_pretrained(mntp, safe_serialization=True)
    tokenizer(out).save_pretrained(mntp)
    base_config = json.loads((base / "config.json").read_text()) | {"_name_or_path": TEMPLATED}
    (mntp / "config.json").write_text(json.dumps(base_config, indent=2))

    untemplated = out / "mntp-untemplated"  # the same adapter, no template, a tokenizer without BOS
    shutil.copytree(mntp, untemplated)
    tokenizer(out, bos=False).save_pretrained(untemplated)
    (untemplated / "config.json").write_text((base / "config.json").read_text())

    supervised = out / "supervised"
    merged = LLM2Vec.from_pretrained(str(mntp), enable_bidirectional=True).model
    lora(merged, seed=2).save_pretrained(supervised, safe_serialization=True)

    data = inputs()
    (out / "inputs.json").write_text(json.dumps(data))
    cases = {
        "mntp": LLM2Vec.from_pretrained(str(mntp), enable_bidirectional=True, pooling_mode="mean"),
        "supervised": LLM2Vec.from_pretrained(
            str(mntp), peft_model_name_or_path=str(supervised), enable_bidirectional=True, pooling_mode="mean"
        ),
        "untemplated": LLM2Vec.from_pretrained(str(untemplated), enable_bidirectional=True, pooling_mode="mean"),
    }
    for name, encoder in cases.items():
        for kind, items in data.items():
            vectors = encoder.encode(items, batch_size=5, show_progress_bar=False)
            np.save(out / f"{name}-{kind}.npy", vectors.float().numpy())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
