"""A mixture-of-experts model with random weights, for ``vs_reference.py --model`` (no mixture-of-experts checkpoint
is reachable from these machines): Qwen3-MoE's architecture at about 280M parameters (8 layers, hidden 768, 32
experts of 384, 4 per token), the built-in model's tokenizer. Speed and memory are a real model's of that shape; its
accuracy figures are a random model's (no massive activations), not a trained one's.

    python benchmarks/moe_model.py DIR && python benchmarks/vs_reference.py --model DIR --modes fp32,default,bf16,int8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from lm2vec.loading.source import resolve_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--experts", type=int, default=32)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(None).path)  # the built-in model's
    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=len(tokenizer),
        hidden_size=768,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        num_experts=args.experts,
        num_experts_per_tok=4,
        moe_intermediate_size=384,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    model.save_pretrained(args.directory)
    tokenizer.save_pretrained(args.directory)
    print(f"{args.directory}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
