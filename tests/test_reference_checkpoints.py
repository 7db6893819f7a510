"""The reference llm2vec's checkpoints load in lm2vec and give the reference's vectors.

The checkpoints and the reference's vectors are made by the reference's own code, in its own venv
(``tests/reference_layout.py``; ``make reference-venv`` builds the venv, ``make test`` does it first).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from torch.nn.utils import parametrize
from transformers import AutoModel

import lm2vec
from lm2vec.inputs import ReferenceStyle
from lm2vec.loading.reference import ReferenceCheckpoint, merged_on_access
from lm2vec.quantization import block_plan
from tests.support import tiny_config, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MIN_COSINE = 0.9999


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Checkpoints in the reference's layout and its vectors, written by the reference itself."""
    python = Path(os.environ.get("LM2VEC_REFERENCE_DIR", ROOT / ".peer-llm2vec")) / "venv" / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"the reference llm2vec's venv is missing ({python}): run `make reference-venv`")
    out = tmp_path_factory.mktemp("reference")
    tiny_model(tiny_config("llama", pad_token_id=3)).save_pretrained(out / "base", safe_serialization=True)
    tiny_tokenizer(bos=True).save_pretrained(out / "tokenizer-bos")
    tiny_tokenizer().save_pretrained(out / "tokenizer-plain")
    script = ROOT / "tests" / "reference_layout.py"
    done = subprocess.run([str(python), str(script), str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def inputs(made: Path) -> dict[str, list]:
    data = json.loads((made / "inputs.json").read_text())
    return {"plain": data["plain"], "pairs": [tuple(pair) for pair in data["pairs"]]}


@pytest.mark.parametrize(
    ("case", "source", "adapter"),
    [("mntp", "mntp", None), ("supervised", "mntp", "supervised"), ("untemplated", "mntp-untemplated", None)],
)
def test_reference_checkpoints_give_the_references_vectors(made: Path, case: str, source: str, adapter: str | None):
    """With and without instructions; a chat-templated base and a BOS tokenizer included (``mntp``)."""
    encoder = lm2vec.load(made / source, adapter=made / adapter if adapter else None, dtype="float32")
    assert encoder.reference_style is not None and encoder.pooling.value == "mean"
    for kind, items in inputs(made).items():
        reference = np.load(made / f"{case}-{kind}.npy")
        assert cosine(encoder.encode(items), reference).min() >= MIN_COSINE, (case, kind)


def test_the_reference_convention_and_the_adapters_matter(made: Path):
    """The test above can fail: lm2vec's own instruction convention, or a missing adapter, give other vectors."""
    items = inputs(made)
    encoder = lm2vec.load(made / "mntp", adapter=made / "supervised", dtype="float32")
    reference = np.load(made / "supervised-pairs.npy")
    own_convention = encoder.with_model(encoder.model, reference_style=None)
    assert cosine(own_convention.encode(items["pairs"]), reference).min() < MIN_COSINE
    mntp_only = lm2vec.load(made / "mntp", dtype="float32")
    assert cosine(mntp_only.encode(items["pairs"]), reference).min() < MIN_COSINE


def test_a_saved_copy_gives_the_same_vectors(made: Path, tmp_path: Path):
    """lm2vec reloads the convention (lm2vec_config.json); sentence-transformers reproduces it where it can: no
    chat template and no BOS (its prompts only prefix, and it pools the BOS of a text without one)."""
    items = inputs(made)
    for source, adapter in (("mntp", "supervised"), ("mntp-untemplated", None)):
        encoder = lm2vec.load(made / source, adapter=made / adapter if adapter else None, dtype="float32")
        saved = encoder.save(tmp_path / source)
        assert not any(saved.glob("adapter_*")) and "lora" not in " ".join(load_file(saved / "model.safetensors"))
        again = lm2vec.load(saved, dtype="float32")
        assert again.reference_style == encoder.reference_style
        for kind in ("plain", "pairs"):
            assert np.array_equal(again.encode(items[kind]), encoder.encode(items[kind])), (source, kind)
    st = SentenceTransformer(str(tmp_path / "mntp-untemplated"), device="cpu")
    reference = np.load(made / "untemplated-plain.npy")
    assert cosine(st.encode(items["plain"]), reference).min() >= MIN_COSINE


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_a_bf16_base_takes_its_adapters_on_access_with_the_vectors_of_a_float32_merge(
    made: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
):
    """The reference's published bases are stored in bf16: a lower precision loads them so and adds each adapter's
    update to a weight as it is read (a 7B model merged in float32: 29.5 GB), with the plan and the vectors of the
    float32 merge of the same weights."""
    tensors = load_file(made / "base" / "model.safetensors")
    folders = {}
    for name, dtypes in (("half", [torch.bfloat16]), ("full", [torch.bfloat16, torch.float32])):
        base = shutil.copytree(made / "base", tmp_path / name / "base")
        stored = {key: functools.reduce(torch.Tensor.to, dtypes, t) for key, t in tensors.items()}
        save_file(stored, base / "model.safetensors", metadata={"format": "pt"})
        mntp = shutil.copytree(made / "mntp", tmp_path / name / "mntp")
        config = json.loads((mntp / "adapter_config.json").read_text()) | {"base_model_name_or_path": str(base)}
        (mntp / "adapter_config.json").write_text(json.dumps(config))
        folders[name] = mntp
    encoders = {}
    for name, mntp in folders.items():
        monkeypatch.setenv("LM2VEC_CACHE", str(tmp_path / f"cache-{name}"))  # each calibrates on its own
        encoders[name] = lm2vec.load(mntp, adapter=made / "supervised", dtype=dtype)
    plan = block_plan(encoders["half"].model)
    assert dtype in plan and plan == block_plan(encoders["full"].model)
    for items in inputs(made).values():
        np.testing.assert_array_equal(encoders["half"].encode(items), encoders["full"].encode(items))
    assert not any(parametrize.is_parametrized(m) for m in encoders["half"].model.modules())
    monkeypatch.setattr(ReferenceCheckpoint, "load_model", None)  # a later load reads the lowered weights back
    again = lm2vec.load(folders["full"], adapter=made / "supervised", dtype=dtype)
    np.testing.assert_array_equal(again.encode(inputs(made)["pairs"]), encoders["full"].encode(inputs(made)["pairs"]))
    with pytest.raises(TypeError):  # another adapter: its own weights
        lm2vec.load(folders["full"], dtype=dtype)

    base = AutoModel.from_pretrained(tmp_path / "half" / "base", dtype=torch.bfloat16)
    model = merged_on_access(PeftModel.from_pretrained(base, made / "supervised"))
    adapted = [m for m in model.modules() if parametrize.is_parametrized(m)]
    assert adapted and all(m.parametrizations.weight.original.dtype == torch.bfloat16 for m in adapted)
    assert all(m.weight.dtype == torch.float32 for m in adapted)  # merged as read


def test_bad_adapters_get_clear_errors(made: Path, tmp_path: Path):
    with pytest.raises(lm2vec.ModelLoadError, match="adapter directory not found"):
        lm2vec.load(made / "mntp", adapter=tmp_path / "missing")
    with pytest.raises(lm2vec.ModelLoadError, match="is not a PEFT adapter"):
        lm2vec.load(made / "mntp", adapter=made / "base")
    pickled = shutil.copytree(made / "supervised", tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(lm2vec.ModelLoadError, match="never unpickles"):
        lm2vec.load(made / "mntp", adapter=pickled)
    wider = tmp_path / "wider"  # the base with another hidden size: the adapter no longer fits
    shutil.copytree(made / "base", wider)
    config = json.loads((wider / "config.json").read_text()) | {"hidden_size": 128, "intermediate_size": 256}
    (wider / "config.json").write_text(json.dumps(config))
    _rebuild_weights(wider)
    with pytest.raises(lm2vec.ModelLoadError, match="does not fit the base model"):
        lm2vec.load(wider, adapter=made / "supervised")
    other = tmp_path / "gpt2"  # another architecture: the adapter's q_proj/v_proj/up_proj are not there
    tiny_model(tiny_config("gpt2", pad_token_id=3)).save_pretrained(other, safe_serialization=True)
    tiny_tokenizer().save_pretrained(other)
    with pytest.raises(lm2vec.ModelLoadError, match="does not fit the base model"):
        lm2vec.load(other, adapter=made / "supervised")
    renamed = shutil.copytree(made / "supervised", tmp_path / "renamed")  # its weights' names reach no layer
    weights = load_file(renamed / "adapter_model.safetensors")
    inside = {name.replace("base_model.model.", "base_model.model.decoder.", 1): w for name, w in weights.items()}
    save_file(inside, renamed / "adapter_model.safetensors")
    with pytest.raises(lm2vec.ModelLoadError, match="does not fit the base model.*missing adapter keys"):
        lm2vec.load(made / "mntp", adapter=renamed)  # peft would warn and merge the layers' initial weights


def _rebuild_weights(folder: Path) -> None:
    """Random weights for the config in ``folder`` (lm2vec's transformers)."""
    from transformers import AutoConfig, AutoModel

    AutoModel.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder, safe_serialization=True)


def test_reference_style_round_trips_through_json():
    style = ReferenceStyle(template=("[INST] ", " [/INST]"), eos=" </s>", doc_max_length=None, skip_instruction=False)
    assert ReferenceStyle.from_json(json.loads(json.dumps(style.to_json()))) == style
