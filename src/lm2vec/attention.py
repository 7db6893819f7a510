"""Bidirectional attention through transformers' native switch, and proof that it took effect.

transformers >= 5.2 builds a padding-only (bidirectional) mask for every decoder whose config says
``is_causal = False``. That one flag serves nearly every architecture; the few that need something else
are listed in the tables below, nowhere else. Because a flag can be silently ignored (the reference
implementation's Qwen2 stayed causal), :func:`verify_attention` checks the loaded model itself: end to end, and
each block's own mixing (:func:`causal_blocks`), since hybrid decoders mix tokens in some blocks with layers no
switch makes bidirectional (convolutions, linear attention, state-space layers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PretrainedConfig, PreTrainedModel

from .blocks import block_modules

# Architectures with a switch of their own, set instead of ``is_causal`` (see set_bidirectional).
EXTRA_FLAGS: dict[str, dict[str, object]] = {
    "gemma3_text": {"use_bidirectional_attention": True},
    "gemma3": {"use_bidirectional_attention": True},
}

# (model_type, attention implementation) pairs whose kernels ignore the switch or fail under it, with the reason.
# ``None`` as implementation means every implementation.
UNSUPPORTED: dict[tuple[str, str | None], str] = {
    ("stablelm", "sdpa"): "its decoder layers drop the is_causal switch before SDPA, so unpadded inputs stay "
    "causal; use attn_implementation='eager' (the default for stablelm)",
    ("nemotron", "sdpa"): "its attention modules are fixed causal (is_causal = True, not read from the config), which "
    "SDPA follows where a sequence has no padding; use attn_implementation='eager' (the default for nemotron)",
    ("mpt", None): "transformers' MPT converts the attention mask to bool without checking for None, and a "
    "bidirectional mask over a sequence without padding is None, so its forward pass fails; load it with "
    "bidirectional=False",
    ("modernbert-decoder", "eager"): "its eager attention adds the mask without checking for None, and a "
    "bidirectional mask over a sequence without padding is None, so its forward pass fails; use "
    "attn_implementation='sdpa' (the default)",
}


# A state "moves" where it changes by more than this fraction of its scale.
MOVES = 1e-4
# A block mixes tokens where a token's update moves by more than this fraction with another token's input: one that
# does not gives bit-identical states (rounding aside), one that does moves by 3e-3 or more on SmolLM2.
MIXES = 1e-5


class AttentionError(RuntimeError):
    """The model's attention is not in the mode that was asked for."""


def unsupported_reason(model_type: str, attn_implementation: str | None) -> str | None:
    """Why this architecture cannot be made bidirectional under this implementation, or None."""
    return UNSUPPORTED.get((model_type, None)) or UNSUPPORTED.get((model_type, attn_implementation or "sdpa"))


def set_bidirectional(config: PretrainedConfig, bidirectional: bool = True) -> PretrainedConfig:
    """Set the config flags that make a model built from ``config`` bidirectional (or causal).

    Set them *before* the model is built: some architectures read the flag only at construction.
    Raises :class:`AttentionError` for architectures listed in :data:`UNSUPPORTED`.
    """
    if bidirectional:
        impl = getattr(config, "_attn_implementation", None) or "sdpa"
        if reason := unsupported_reason(config.model_type, impl):
            raise AttentionError(f"{config.model_type} with {impl} attention cannot be made bidirectional: {reason}")
    for part in _text_configs(config):
        own = EXTRA_FLAGS.get(part.model_type, {})
        # An architecture's own switch is its bidirectional attention as its makers trained it (Gemma 3: sliding
        # windows kept, symmetric, distance < window, as EmbeddingGemma runs). is_causal stays unset there, as in
        # their configs: False would replace the switch's masks by transformers' generic ones (distance <= window),
        # True would reach every attention call as its is_causal argument and make unmasked calls causal.
        if own:
            vars(part).pop("is_causal", None)
            _switch(part, {key: value if bidirectional else not value for key, value in own.items()})
        else:
            part.is_causal = not bidirectional
    return config


def _switch(config: PretrainedConfig, flags: dict[str, object]) -> None:
    """Set an architecture's own switch as if the config had been built with it: Gemma 3's config halves its
    sliding window when built bidirectional (the window then reaches as far both ways as it reached back) and
    writes it doubled back; set afterwards, the window stayed whole and was saved doubled (512 -> 1022)."""
    if all(getattr(config, key, None) == value for key, value in flags.items()):
        return
    rebuilt = type(config).from_dict(config.to_dict() | flags)
    for key, value in vars(rebuilt).items():  # private settings (the attention implementation) and sub-configs stay
        if not key.startswith("_") and not isinstance(value, PretrainedConfig):
            setattr(config, key, value)


def saved_bidirectional(config: dict) -> bool:
    """Whether a saved ``config.json`` (as a dict) builds a bidirectional model: ``is_causal: false`` (lm2vec writes
    it) or an architecture's own switch on (EmbeddingGemma's ``use_bidirectional_attention``), in the config or its
    text config. transformers' default, for a config with neither, is causal."""
    for part in (config, config.get("text_config") or {}):
        flags = EXTRA_FLAGS.get(str(part.get("model_type")), {})
        if part.get("is_causal") is False or any(key in part and part[key] == on for key, on in flags.items()):
            return True
    return False


def _text_configs(config: PretrainedConfig) -> list[PretrainedConfig]:
    """The config and its text sub-config, if it has one (multimodal wrappers such as Gemma 3)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that follow the real tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def first_token_moves(model: PreTrainedModel, padding_side: str | None, vocab_size: int) -> bool:
    """Does the first real token's state change when the last token changes?

    ``padding_side`` None runs one unpadded sequence; "left"/"right" puts the probe inside a padded
    batch with a longer neighbour, the situation in which a half-applied switch falls back to causal.
    """
    n = 6
    ids = torch.arange(n, dtype=torch.long) % max(vocab_size - 1, 1) + 1
    changed = ids.clone()
    changed[-1] = (ids[-1] % (vocab_size - 1)) + 1 if vocab_size > 2 else 0
    states = []
    for seq in (ids, changed):
        if padding_side is None:
            input_ids, mask, first = seq[None], torch.ones(1, n, dtype=torch.long), 0
        else:
            pad = 3
            longer = torch.arange(n + pad, dtype=torch.long) % max(vocab_size - 1, 1) + 1
            padded = torch.zeros(n + pad, dtype=torch.long)
            m = torch.zeros(n + pad, dtype=torch.long)
            sl = slice(pad, None) if padding_side == "left" else slice(0, n)
            padded[sl], m[sl] = seq, 1
            input_ids = torch.stack([longer, padded])
            mask = torch.stack([torch.ones_like(m), m])
            first = pad if padding_side == "left" else 0
        device = next(model.parameters()).device
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids_for(mask).to(device),
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1]
        states.append(hidden[-1, first].float().cpu())
    scale = states[0].abs().max().clamp(min=1e-6)
    return bool(((states[0] - states[1]).abs().max() / scale) > MOVES)


@torch.inference_mode()
def block_changes(
    model: PreTrainedModel, run: Callable[[], object], perturb: torch.Tensor, watch: torch.Tensor
) -> list[float] | None:
    """Per transformer block: how far its outputs at ``watch`` move when only its inputs at ``perturb`` change
    (boolean masks over (batch, tokens)), relative to the block's update (output minus input) there, since the
    residual stream carries massive activations. ``run`` makes a forward pass; in a second one every block is fed
    the input it had in the first, perturbed at ``perturb``, so each block's own token mixing is measured alone.
    None where the blocks or their hidden states cannot be found (the end-to-end checks still apply)."""
    layers = block_modules(model)
    if not layers:
        return None
    index = {id(layer): i for i, layer in enumerate(layers)}
    inputs: dict[int, torch.Tensor] = {}
    outputs: list[dict[int, torch.Tensor]] = [{}, {}]
    second = False
    generator = torch.Generator().manual_seed(0)

    def feed(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.shape[:2] != perturb.shape:
            raise LookupError("no hidden states of shape (batch, tokens, dim)")
        i = index[id(module)]
        if not second:
            if i in inputs:
                raise LookupError("a block ran twice in one pass")
            inputs[i] = hidden.clone()
            return None
        changed = inputs[i].clone()
        rows = changed[perturb]
        scale = rows.float().pow(2).mean().sqrt().clamp(min=1.0)
        changed[perturb] = rows + (torch.randn(rows.shape, generator=generator) * scale).to(rows)
        return ((changed, *args[1:]), kwargs) if args else (args, kwargs | {"hidden_states": changed})

    def keep(module: torch.nn.Module, args: tuple, output: object) -> None:
        hidden = output[0] if isinstance(output, tuple | list) else output
        if not isinstance(hidden, torch.Tensor):
            raise LookupError("a block's output holds no hidden states")
        outputs[second][index[id(module)]] = hidden.clone()

    hooks = [layer.register_forward_pre_hook(feed, with_kwargs=True) for layer in layers]
    hooks += [layer.register_forward_hook(keep) for layer in layers]
    try:
        run()
        second = True
        run()
    except LookupError:
        return None
    finally:
        for hook in hooks:
            hook.remove()
    if any(len(seen) != len(layers) for seen in outputs):
        return None
    changes = []
    for i, before in sorted(inputs.items()):
        base, changed = outputs[0][i], outputs[1][i]
        update = (base - before)[watch].float().abs().amax(-1).clamp(min=1e-12)
        changes.append(float(((changed - base)[watch].float().abs().amax(-1) / update).max()))
    return changes


def verify_attention(model: PreTrainedModel, bidirectional: bool, vocab_size: int | None = None) -> None:
    """Prove the attention mode on the loaded model: alone, and in left- and right-padded batches.

    Raises :class:`AttentionError` naming the case that failed.
    """
    vocab_size = vocab_size or model.config.get_text_config().vocab_size
    was_training = model.training
    model.eval()
    try:
        for side in (None, "left", "right"):
            if first_token_moves(model, side, vocab_size) != bidirectional:
                case = "a single sequence" if side is None else f"a {side}-padded batch"
                want, got = ("bidirectional", "causal") if bidirectional else ("causal", "bidirectional")
                raise AttentionError(
                    f"{model.config.model_type} ({model.config._attn_implementation}) should be {want} "
                    f"but is {got} on {case}: the first token's state "
                    f"{'did not change' if bidirectional else 'changed'} when the last token changed."
                )
        if bidirectional and (causal := causal_blocks(model, vocab_size)):
            raise AttentionError(
                f"{model.config.model_type}: blocks {causal} of {len(block_modules(model))} stay causal (each passes "
                "the first token's input on to later tokens, not the last token's back): state-space, "
                "convolution and linear-attention layers mix tokens in one direction by construction. Load it "
                "with bidirectional=False (a causal encoder, e.g. with last_token pooling)."
            )
    finally:
        model.train(was_training)


def causal_blocks(model: PreTrainedModel, vocab_size: int) -> list[int]:
    """The blocks whose own token mixing is causal: later tokens move with the first token's input, earlier ones not
    with the last token's. (The model's end-to-end state can move through one bidirectional block while others stay
    causal; blocks that mix no tokens, such as Nemotron-H's MLP blocks, are neither.) Empty where the blocks cannot be
    probed. Ordinary tokens, not the first ids (special tokens in most vocabularies): a first special token can hold
    an attention sink, which attends to little else (SmolLM2: 1.5e-4 instead of 3e-3 or more)."""
    n = 6
    device = next(model.parameters()).device
    ids = (torch.arange(n) + vocab_size // 2)[None].to(device) % vocab_size  # ordinary tokens: no attention sink
    mask = torch.ones_like(ids)
    first, last = (torch.arange(n, device=device)[None] == k for k in (0, n - 1))

    def run() -> object:
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), use_cache=False)

    forward, backward = (block_changes(model, run, a, ~a) or [] for a in (first, last))
    return [i for i, (ahead, back) in enumerate(zip(forward, backward, strict=False)) if ahead > MIXES >= back]
