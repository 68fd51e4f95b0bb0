"""Tiny seeded models and data for tests, examples and benchmarks (no Hub access needed)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))


def tiny_phi3(seed: int = 0, **overrides) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    cfg = {**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    return Phi3ForCausalLM(Phi3Config(**cfg))


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token windows with `labels = input_ids` (a map-style dataset the Trainer accepts)."""

    def __init__(self, n: int = 32, seq_len: int = 16, vocab_size: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab_size, (n, seq_len), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
