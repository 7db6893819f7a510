"""The encoder: a (bidirectional) decoder, a tokenizer and a pooling mode, with sentence-transformers' API."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from . import st_format
from .attention import position_ids_for, verify_attention
from .cache import cache_key
from .choices import PoolingMode, parse_pooling
from .dense import Dense
from .experts import experts_implementation
from .inputs import (
    Batch,
    Inputs,
    ReferenceStyle,
    ReferenceTokenization,
    Tokenization,
    check_flag,
    check_positive,
    check_prompts,
    length_batches,
    normalize,
)
from .invariance import BatchInvariant
from .late_chunking import Chunks, late_chunks
from .model_card import write_card
from .outputs import Precision, check_output_options, postprocess
from .packing import enable_packing, packed_states, window_applies
from .pooling import pool
from .quantization import FLOAT32, block_plan, lower_kind, parameter_count
from .similarity import check_similarity, similarity, similarity_pairwise

if TYPE_CHECKING:
    from peft import PeftModel

# Tokens per text unless told otherwise (fewer where the model has fewer positions).
DEFAULT_MAX_LENGTH = 512
# Tokens per forward pass on a CPU unless told otherwise. It bounds activation memory (200 SciFact abstracts, fp32:
# peak 2.0 -> 1.3 GB against unbounded batches of 32). On 1000 STS-B sentences, default precision, Intel Xeon with
# AMX: 512 tokens peak at 813-818 MB, 1024 at 857-860 MB (the reference: 835-864 MB), 3-6% slower.
CPU_MAX_TOKENS = 512
# What one more forward pass costs on a CPU, in padded tokens (SmolLM2, 2 cores: 1 text of 10 tokens 163 ms, 32
# of 10 1089 ms): mixed-length batches are cut where their padding would cost more (see ``length_batches``).
CPU_PASS_COST = 48
TOKENIZE_CHUNK = 16384  # texts tokenized at a time by encode(), the next chunk while the model embeds this one


def model_positions(config: PretrainedConfig) -> int | None:
    """The positions a model has (its config's ``max_position_embeddings``), if it says."""
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def fitted_length(config: PretrainedConfig, length: int | None = None) -> int:
    """``length`` (default :data:`DEFAULT_MAX_LENGTH`), or the model's positions where it has fewer. For lengths
    not asked for by the caller (the default, a saved setting, a recipe's); an explicit one past them is refused."""
    length = length or DEFAULT_MAX_LENGTH
    positions = model_positions(config)
    return min(length, positions) if positions else length


def check_length(config: PretrainedConfig, max_length: int) -> None:
    """Refuse a ``max_length`` that is not a positive integer or that runs past the model's positions."""
    check_positive("max_length", max_length)
    if (positions := model_positions(config)) and max_length > positions:
        raise ValueError(
            f"max_length {max_length} is more than the {positions} positions of this model (max_position_embeddings "
            "in its config): learned position tables fail past their end and rotary ones were not trained there"
        )


def check_batching(batch_size: int, max_tokens: int | None) -> None:
    """``batch_size`` and ``max_tokens`` (None: the device's default) are positive integers: checked before any text
    is tokenized."""
    check_positive("batch_size", batch_size)
    if max_tokens is not None:
        check_positive("max_tokens", max_tokens)


class Encoder:
    """Turns texts into embeddings with a decoder-only LLM.

    Build one with :func:`lm2vec.load`, or around a model you hold: ``Encoder(model, tokenizer)``. ``prompts``
    maps names (``"query"``, ``"document"``, task names) to instructions, as in sentence-transformers. With
    ``batch_invariant`` (the default), CPU encoding gives each text the same embedding bit for bit whatever it is
    batched with: float32 products in fixed row blocks (see :mod:`lm2vec.invariance`) and packed attention (see
    :mod:`lm2vec.packing`; models it cannot pack are batched by equal length instead). Off, float32 products take
    the BLAS's own kernels and a text's embedding moves by cosine < 1e-5 between batches.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pooling: str | PoolingMode = PoolingMode.MEAN,
        max_length: int | None = None,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        bidirectional: bool = True,
        batch_invariant: bool = True,
        reference_style: ReferenceStyle | None = None,
        matryoshka_dims: tuple[int, ...] | None = None,
        normalize: bool = False,
        include_prompt: bool = False,
        dense: tuple[Dense, ...] = (),
        similarity_fn_name: str = "cosine",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = parse_pooling(pooling)
        check_prompts(prompts, default_prompt_name)
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        check_flag("bidirectional", bidirectional)
        self.bidirectional = bidirectional
        self.batch_invariant = batch_invariant
        self._packing: bool | None = None  # decided on first use: see packs()
        self.reference_style = reference_style
        self.matryoshka_dims = matryoshka_dims  # the truncate_dim values training prepared it for, if any
        check_flag("normalize", normalize)
        self.normalize = normalize  # sentence-transformers' Normalize module: every output has unit length
        if not (isinstance(dense, tuple | list) and all(isinstance(layer, Dense) for layer in dense)):
            raise TypeError(f"dense must be a tuple of lm2vec.dense.Dense modules, got {dense!r:.80}")
        self.dense = tuple(dense)  # sentence-transformers' Dense modules: the pooled state projected (see project())
        self.similarity_fn_name = check_similarity(similarity_fn_name)  # how its vectors are compared
        widths = [self.hidden_size, *(layer.out_features for layer in self.dense)]
        if [layer.in_features for layer in self.dense] != widths[:-1]:
            chain = " -> ".join(f"{layer.in_features} -> {layer.out_features}" for layer in self.dense)
            raise ValueError(f"the Dense modules take {chain} features; they must chain from the model's {widths[0]}")
        if matryoshka_dims and not all(0 < d <= self.dim for d in matryoshka_dims):
            dims = list(matryoshka_dims)
            raise ValueError(f"matryoshka_dims {dims} must lie in 1..{self.dim} (the embedding's dimensions)")
        check_flag("include_prompt", include_prompt)
        self._include_prompt = include_prompt  # read by the tokenization the max_length setter builds
        self.max_length = fitted_length(model.config) if max_length is None else max_length  # builds self.tokenization

    # -- properties --------------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        """Tokens per text, instruction and special tokens included; longer texts are cut. Settable, as
        sentence-transformers' ``max_seq_length`` (the same property here, for code written for it)."""
        return self.tokenization.max_length

    @max_length.setter
    def max_length(self, value: int) -> None:
        check_length(self.model.config, value)
        style = self.reference_style  # a new tokenization: its instructions were checked against the old length
        self.tokenization = (
            ReferenceTokenization(self.tokenizer, value, style)
            if style
            else Tokenization(self.tokenizer, value, self._include_prompt)
        )

    @property
    def include_prompt(self) -> bool:
        """Whether an instruction's tokens are pooled with the text's (sentence-transformers' Pooling setting, read
        from its directories); lm2vec's encoders attend to them but pool only the text."""
        return self._include_prompt

    @include_prompt.setter
    def include_prompt(self, value: bool) -> None:
        check_flag("include_prompt", value)
        self._include_prompt = value
        self.max_length = self.max_length  # a tokenization that marks instructions accordingly

    max_seq_length = max_length

    @property
    def dim(self) -> int:
        """The embedding's dimensions: the last Dense module's outputs, else the model's hidden size."""
        return self.dense[-1].out_features if self.dense else self.hidden_size

    @property
    def hidden_size(self) -> int:
        """The width of a token's state (:meth:`token_states`), which the pooling keeps."""
        return self.model.config.get_text_config().hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def verify(self) -> None:
        """Prove the attention mode on this model (raises :class:`lm2vec.AttentionError`)."""
        verify_attention(self.model, self.bidirectional, vocab_size=len(self.tokenizer))

    def with_model(self, model: PreTrainedModel, **changes) -> Encoder:
        """An encoder with this one's settings (tokenizer, pooling, prompts, ...) around another model.

        Training stages use it for the model they train, ONNX for its graph; ``changes`` override settings
        by their ``__init__`` names, e.g. ``batch_invariant=False``.
        """
        return Encoder(model, **(self.settings() | changes))

    def settings(self) -> dict[str, Any]:
        """The ``__init__`` arguments besides the model: what :meth:`with_model` carries over."""
        return {
            "tokenizer": self.tokenizer,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "prompts": self.prompts,
            "default_prompt_name": self.default_prompt_name,
            "bidirectional": self.bidirectional,
            "batch_invariant": self.batch_invariant,
            "reference_style": self.reference_style,
            "matryoshka_dims": self.matryoshka_dims,
            "normalize": self.normalize,
            "include_prompt": self.include_prompt,
            "dense": self.dense,
            "similarity_fn_name": self.similarity_fn_name,
        }

    # -- encoding ----------------------------------------------------------------------------------
    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last layer's state of every token, (batch, seq, hidden); positions follow the real tokens, so
        either padding side gives the same states. Differentiable: pooling, MNTP and word probing start here."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with self._invariance():
            if self.packs():
                return packed_states(self.model, input_ids, attention_mask)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_for(attention_mask),
                use_cache=False,  # an encoder has no next token: a KV cache only holds every layer's keys and values
            )
        return out.last_hidden_state

    def packs(self) -> bool:
        """Whether the model runs packed (see :mod:`lm2vec.packing`): in eval mode on a CPU, for models whose packed
        states were checked to equal each text's alone (checked on first use); never while traced for export."""
        if self.device.type != "cpu" or self.model.training or torch.compiler.is_compiling():
            return False
        if self._packing is None:
            self._packing = enable_packing(self.model, self.max_length)
        return self._packing and not window_applies(self.model.config, self.max_length)  # max_length may grow

    def forward(self, batch: Batch) -> torch.Tensor:
        """Embed one tokenized batch (no normalization); differentiable, used by training too."""
        batch = batch.to(self.device)
        hidden = self.token_states(batch.input_ids, batch.attention_mask)
        return self.project(pool(hidden, batch.attention_mask, batch.pool_mask, self.pooling))

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The pooled states through the encoder's Dense modules (none: as they are), in float32 as the pooling, in
        the same row blocks as the model's products (a text's bits do not depend on its batch)."""
        if not self.dense:
            return pooled
        with self._invariance(), torch.autocast(pooled.device.type, enabled=False):
            for layer in self.dense:
                pooled = layer.to(pooled.device)(pooled)
        return pooled

    def resolve_instruction(self, prompt_name: str | None, prompt: str | None, instruction: str | None) -> str | None:
        if prompt is not None and instruction is not None:
            raise ValueError("pass either prompt or instruction, not both (they are the same thing)")
        if prompt is not None or instruction is not None:
            return prompt if prompt is not None else instruction
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return None
        if name not in self.prompts:
            raise ValueError(f"unknown prompt_name {name!r}; this encoder has prompts: {sorted(self.prompts)}")
        return self.prompts[name]

    @torch.inference_mode()
    def encode(
        self,
        sentences: Inputs,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = False,
        instruction: str | None = None,
        max_tokens: int | None = None,
        truncate_dim: int | None = None,
        precision: Precision = "float32",
    ) -> np.ndarray | torch.Tensor:
        """Embed texts. A single string gives one vector; a list gives a (n, dim) array.

        Items may be strings or (instruction, text) pairs; ``instruction``/``prompt``/``prompt_name``
        set the instruction for plain strings. Instruction tokens are attended to but not pooled.
        A forward pass takes at most ``max_tokens`` tokens (default: ``CPU_MAX_TOKENS`` on a CPU, unbounded
        elsewhere) and, where texts are padded to a common length, at most ``batch_size`` texts (raise both on a
        GPU: thousands of tokens per pass). Packed batches (CPU, see :mod:`lm2vec.packing`) carry no padding, so
        only ``max_tokens`` bounds them. ``truncate_dim`` and
        ``precision`` (int8, uint8, binary, ubinary) shrink the output as sentence-transformers does.
        """
        check_output_options(self.dim, truncate_dim, precision)
        check_batching(batch_size, max_tokens)
        for name, flag in (
            ("normalize_embeddings", normalize_embeddings),
            ("convert_to_numpy", convert_to_numpy),
            ("convert_to_tensor", convert_to_tensor),
        ):
            check_flag(name, flag)
        default = self.resolve_instruction(prompt_name, prompt, instruction)
        instructions, texts, single = normalize(sentences, default)
        embeddings = self._embed_texts(instructions, texts, batch_size, max_tokens, show_progress_bar)
        output = postprocess(embeddings, truncate_dim, normalize_embeddings, precision)
        if single:
            output = output[0]
        if isinstance(output, np.ndarray) or not convert_to_tensor and convert_to_numpy:
            return np.asarray(output)
        return output

    def truncated(
        self,
        sentences: Inputs,
        prompt_name: str | None = None,
        prompt: str | None = None,
        instruction: str | None = None,
    ) -> list[int]:
        """Positions of the texts that :meth:`encode` (same arguments) cuts at ``max_length`` tokens, instruction
        included: it embeds only their beginning. Tokenizes again; nothing is embedded."""
        instructions, texts, _ = normalize(sentences, self.resolve_instruction(prompt_name, prompt, instruction))
        if not texts:
            return []
        ids, _ = self.tokenization.tokenize(instructions, texts)
        return self.tokenization.cut(instructions, texts, ids)

    def _embed_texts(
        self,
        instructions: list[str],
        texts: list[str],
        batch_size: int,
        max_tokens: int | None,
        show_progress_bar: bool | None,
    ) -> torch.Tensor:
        """Tokenize and embed in chunks of ``TOKENIZE_CHUNK`` texts, the next chunk tokenized on a thread
        (fast tokenizers release the GIL) while the model embeds this one, so a large corpus never waits
        on tokenization. Length sorting is per chunk: a chunk is large enough for full equal-length batches.
        """
        if show_progress_bar is None:
            show_progress_bar = len(texts) > batch_size and sys.stderr.isatty()
        chunks = [
            (instructions[i : i + TOKENIZE_CHUNK], texts[i : i + TOKENIZE_CHUNK])
            for i in range(0, len(texts), TOKENIZE_CHUNK)
        ]

        def tokenize(chunk: tuple[list[str], list[str]]) -> tuple[list[list[int]], list[int]]:
            return self.tokenization.tokenize(*chunk)

        executor = ThreadPoolExecutor(max_workers=1) if len(chunks) > 1 else None  # one chunk: nothing to overlap
        try:
            tokenized = executor.map(tokenize, chunks) if executor else map(tokenize, chunks)
            with tqdm(total=len(texts), desc="Encoding", unit="text", disable=not show_progress_bar) as progress:
                parts = [
                    self.embed_tokens(ids, prefix, batch_size, max_tokens, progress=progress)
                    for ids, prefix in tokenized
                ]
        finally:
            if executor:
                executor.shutdown(cancel_futures=True)
        return torch.cat(parts) if parts else torch.empty(0, self.dim)

    @torch.inference_mode()
    def embed_tokens(
        self,
        ids: list[list[int]],
        prefix: list[int] | None = None,
        batch_size: int = 32,
        max_tokens: int | None = None,
        show_progress_bar: bool | None = None,
        progress: tqdm | None = None,
    ) -> torch.Tensor:
        """Embed token id rows (each at most ``max_length``; ``prefix``: instruction tokens not to pool).

        Returns a float32 (rows, dim) tensor in input order, of unit length where the encoder ``normalize``s
        (sentence-transformers' Normalize module), else as pooled. ``progress``: a bar to advance
        by each batch's texts instead of a bar of its own. On a GPU, batches are queued without waiting for
        results (one copy to the host at the end), so the next batch is prepared while this one runs.
        """
        check_batching(batch_size, max_tokens)
        prefix = prefix if prefix is not None else [0] * len(ids)
        if max_tokens is None and self.device.type == "cpu":
            max_tokens = CPU_MAX_TOKENS
        lengths = [len(row) for row in ids]
        if self.packs():  # no padding: any texts share a batch up to max_tokens (STS-B: 1.3x batches of 32)
            batches = length_batches(lengths, len(ids), max_tokens, same_length=False)
        else:
            pass_cost = CPU_PASS_COST if self.device.type == "cpu" else None  # a GPU pads almost for free
            batches = length_batches(lengths, batch_size, max_tokens, self.batch_invariant, pass_cost)
        if show_progress_bar is None:
            show_progress_bar = len(batches) > 1 and sys.stderr.isatty()
        was_training = self.model.training
        self.model.eval()
        chunks = []
        own = tqdm(total=len(ids), desc="Encoding", unit="text", disable=progress is not None or not show_progress_bar)
        try:
            with own:
                for idx in batches:
                    rows = [ids[i] for i in idx]  # longest first; +1 padding column: see length_batches
                    batch = self.tokenization.collate(rows, [prefix[i] for i in idx], width=len(rows[0]) + 1)
                    chunks.append(self.forward(batch))
                    (progress or own).update(len(idx))
        finally:
            self.model.train(was_training)
        if not chunks:
            return torch.empty(0, self.dim)
        order = torch.from_numpy(np.concatenate(batches))
        embeddings = torch.cat(chunks).cpu()[torch.argsort(order)]
        return torch.nn.functional.normalize(embeddings, dim=-1) if self.normalize else embeddings

    @contextlib.contextmanager
    def batch_variant(self) -> Iterator[None]:
        """Batch invariance off while inside: float32 products in one piece rather than in row blocks (faster), for
        work that only compares or ranks embeddings of the same batches (calibration, scoring), where a text's bits
        need not match its bits in other batches."""
        was, self.batch_invariant = self.batch_invariant, False
        try:
            yield
        finally:
            self.batch_invariant = was

    def _invariance(self) -> contextlib.AbstractContextManager:
        """Blocked float32 CPU matmuls, experts as linear layers (the lower-precision layers block their own; GPUs
        and export: off)."""
        param = next(self.model.parameters())
        applies = self.batch_invariant and param.device.type == "cpu" and param.dtype == torch.float32
        if not applies or torch.compiler.is_compiling():
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(experts_implementation(self.model, "eager"))
        stack.enter_context(BatchInvariant())
        return stack

    def late_chunks(
        self,
        documents: list[str],
        spans: list[list[tuple[int, int]]] | None = None,
        chunk_tokens: int | None = None,
        overlap: int | None = None,
        normalize_embeddings: bool = False,
        prompt_name: str | None = None,
        prompt: str | None = None,
        instruction: str | None = None,
    ) -> list[Chunks]:
        """One vector per chunk, pooled from the whole document's token states (late chunking): chunks at the
        character ``spans`` of each document, or runs of ``chunk_tokens`` tokens; instructions as :meth:`encode`
        takes them. See :mod:`lm2vec.late_chunking`."""
        return late_chunks(
            self, documents, spans, chunk_tokens, overlap, normalize_embeddings, prompt_name, prompt, instruction
        )

    def encode_query(self, sentences: Inputs, **kwargs) -> np.ndarray | torch.Tensor:
        """Encode with the ``query`` prompt, if the encoder has one."""
        return self.encode(sentences, prompt_name="query" if "query" in self.prompts else None, **kwargs)

    def encode_document(self, sentences: Inputs, **kwargs) -> np.ndarray | torch.Tensor:
        """Encode with the ``document`` prompt, if the encoder has one."""
        return self.encode(sentences, prompt_name="document" if "document" in self.prompts else None, **kwargs)

    def similarity(self, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Scores of each row of ``a`` with each row of ``b`` (one vector is one row) by the encoder's
        ``similarity_fn_name`` (cosine unless its saved model names another), as sentence-transformers'
        ``similarity``."""
        return similarity(a, b, self.similarity_fn_name)

    def similarity_pairwise(self, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Scores of each row of ``a`` with the same row of ``b``, by the encoder's ``similarity_fn_name``."""
        return similarity_pairwise(a, b, self.similarity_fn_name)

    # -- saving ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, merge_adapters: bool = True, training: str | None = None) -> Path:
        """Save as a sentence-transformers directory (safetensors) that reloads with identical embeddings, with a
        model card (README.md; ``training``: markdown on how the encoder was made, see :mod:`lm2vec.model_card`).

        LoRA adapters are merged into the weights by default; with ``merge_adapters=False`` the base
        weights and the adapter are saved side by side, and transformers/sentence-transformers apply the
        adapter when loading.
        """
        if set(block_plan(self.model)) - set(FLOAT32):  # float32 on oneDNN keeps nn.Linear's weight names: saves
            raise ValueError(
                f"{self.dtype} encoders are converted when loaded: save the float32 model, "
                f"load it with dtype={self.dtype!r}"
            )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = self.model
        from peft import PeftModel  # imported when used: not needed to encode

        if isinstance(model, PeftModel):
            if not merge_adapters:
                _save_adapter(model, path)
            model = _without_adapters(model, merge_adapters)
        model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        settings = st_format.STSettings(
            self.pooling,
            self.max_length,
            self.prompts,
            self.default_prompt_name,
            bidirectional=self.bidirectional,
            reference_style=self.reference_style,
            matryoshka_dims=self.matryoshka_dims,
            normalize=self.normalize,
            include_prompt=self.include_prompt,
            dense=self.dense,
            similarity_fn_name=self.similarity_fn_name,
        )
        st_format.write(path, self.hidden_size, settings)
        write_card(path, model.config, self.dim, settings, training)
        return path

    @property
    def dtype(self) -> str:
        """ "int8" / "bfloat16" for a model with such linear layers (see :mod:`lm2vec.quantization`), else the
        weights' dtype ("float32", "float16", ...)."""
        return lower_kind(self.model) or str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def block_precisions(self) -> str:
        """How many blocks run in each precision, e.g. "bfloat16 19, int8x2 11 (of 30)"."""
        plan = block_plan(self.model)
        counts = ", ".join(f"{kind} {plan.count(kind)}" for kind in dict.fromkeys(sorted(plan)))
        return f"{counts} (of {len(plan)})"

    def info(self) -> dict[str, Any]:
        packed = self.packs()  # first: its check on first use switches the attention implementation reported below
        config = self.model.config
        return {
            "architecture": config.model_type,
            "parameters": parameter_count(self.model),
            "attention": "bidirectional" if self.bidirectional else "causal",
            "attn_implementation": config._attn_implementation,
            "pooling": self.pooling.value,
            "dimension": self.dim,
            "matryoshka_dims": self.matryoshka_dims,
            "max_length": self.max_length,
            "dtype": self.dtype,
            "engine": "torch",
            "blocks": self.block_precisions(),
            "batch_invariant": self.batch_invariant,
            "packed": packed,
            "prompts": self.prompts,
            "instructions": "llm2vec 0.2.3 convention" if self.reference_style else "prefix (sentence-transformers)",
            "include_prompt": self.include_prompt,
            "normalize": self.normalize,
            "similarity_fn_name": self.similarity_fn_name,
            "dense": " -> ".join(str(n) for n in [self.hidden_size, *(layer.out_features for layer in self.dense)])
            if self.dense
            else None,
        }

    def fingerprint(self, extra: object = None) -> str:
        """A 20-character key of what this encoder computes: its settings, tokenizer, ``extra`` and every weight.

        Each weight enters as its sum and norm (float64, 10 digits) on its own device: one pass, no copy to
        the CPU, stable when the thread count changes the order of additions, and different for every
        training stage of one model without the user naming them.
        """
        info = self.info()
        settings = {key: info[key] for key in ("architecture", "attention", "pooling", "max_length", "dtype")}
        settings |= {key: True for key in ("include_prompt", "normalize") if info[key]}  # absent: earlier keys stand
        if self.dense:
            settings["dense"] = [repr(layer) for layer in self.dense]  # shapes, bias, activation, residual
        if self.similarity_fn_name != "cosine":  # the same vectors, other scores: MTEB's results differ
            settings["similarity"] = self.similarity_fn_name
        tokenizer = [type(self.tokenizer).__name__, len(self.tokenizer)]
        weights = []
        dense = {f"dense.{i}.{name}": w for i, layer in enumerate(self.dense) for name, w in layer.state_dict().items()}
        with torch.no_grad():
            for name, weight in (self.model.state_dict() | dense).items():  # parameters, saved buffers (int8 weights)
                total, norm = _sum_and_norm(weight)
                weights.append(f"{name} {tuple(weight.shape)} {total:.10g} {norm:.10g}")
        return cache_key(settings, tokenizer, extra, weights)[:20]


def _sum_and_norm(weight: torch.Tensor, part: int = 1 << 20) -> tuple[float, float]:
    """A tensor's sum and Euclidean norm in float64, a million elements at a time: float64 over the whole tensor
    would copy it at twice float32's size (the built-in model's embedding matrix: 226 MB, a third of its load)."""
    total = torch.zeros((), dtype=torch.float64, device=weight.device)
    squares = torch.zeros((), dtype=torch.float64, device=weight.device)
    for piece in weight.reshape(-1).split(part):
        piece = piece if piece.is_floating_point() else piece.double()
        total += piece.sum(dtype=torch.float64)
        squares += torch.linalg.vector_norm(piece, dtype=torch.float64).square()
    return total.item(), squares.sqrt().item()


def _save_adapter(model: PeftModel, path: Path) -> None:
    """Save the adapter beside the base weights; its config names this directory as the base model.

    transformers finds the base weights in the directory itself; sentence-transformers reads the base
    config from ``base_model_name_or_path``, an absolute path (update it if the directory moves).
    """
    model.save_pretrained(str(path), safe_serialization=True)
    adapter_config = path / "adapter_config.json"
    config = json.loads(adapter_config.read_text())
    config["base_model_name_or_path"] = str(path.resolve())
    adapter_config.write_text(json.dumps(config, indent=2) + "\n")


def _without_adapters(model: PeftModel, merge: bool) -> PreTrainedModel:
    """A plain copy of the model, LoRA merged in or left out, leaving the trainable original untouched."""
    clone = copy.deepcopy(model)
    return clone.merge_and_unload() if merge else clone.unload()
