"""Tiny seeded models, data and fixtures for tests, examples and benchmarks (no Hub access needed).

Nothing in the package imports this module: it is the place of helpers that only tests, examples and benchmarks use
(a tokenizer trained on the spot, an importance folder written from given tensors).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))


def tiny_phi3(seed: int = 0, **overrides) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    cfg = {**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    return Phi3ForCausalLM(Phi3Config(**cfg))


_MOE_SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  num_experts_per_tok=2)
# transformers config class and its own name for the routed-expert count and width
_MOE = {"mixtral": ("MixtralConfig", {"num_local_experts": 4}),
        "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "moe_intermediate_size": 24}),
        "olmoe": ("OlmoeConfig", {"num_experts": 4}),
        # a shared expert beside the routed ones
        "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "moe_intermediate_size": 24,
                                         "shared_expert_intermediate_size": 32}),
        # transposed storage, interleaved gate/up rows, expert and router biases, its own gate function
        "gpt_oss": ("GptOssConfig", {"num_local_experts": 4, "intermediate_size": 24, "head_dim": 8})}


def tiny_moe(arch: str = "mixtral", seed: int = 0, **overrides):
    """
    A tiny seeded mixture-of-experts causal LM from the stock config class: 2 layers, hidden 32, 4 experts, top-2,
    vocabulary 64 (pad 0, bos 1, eos 2), fused 3-D expert weights as transformers 5 builds them.

    Args:
        arch (`str`, *optional*, defaults to `"mixtral"`): `"mixtral"`, `"qwen3_moe"`, `"olmoe"`, `"qwen2_moe"` or
            `"gpt_oss"`. Biases (gpt-oss) are drawn from N(0, 0.1) rather than left at zero, so they count in checks.
        seed (`int`, *optional*, defaults to 0): `torch.manual_seed` before the weights are drawn.
        **overrides: config fields to change.

    Returns:
        `PreTrainedModel`: from `AutoModelForCausalLM.from_config`.
    """
    import transformers

    config_cls, extra = _MOE[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**_MOE_SMALL, **extra, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("_bias", "router.bias")):
                p.normal_(0, 0.1)
    return model


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token windows with `labels = input_ids` (a map-style dataset the Trainer accepts)."""

    def __init__(self, n: int = 32, seq_len: int = 16, vocab_size: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab_size, (n, seq_len), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """
    Trains a small byte-level BPE tokenizer (GPT-2 style) on `texts` with the `tokenizers` library.

    `<|endoftext|>` is the only special token and serves as `bos_token`, `eos_token`, `pad_token` and `unk_token`
    (byte-level BPE never needs an unknown token, but some code paths expect one). The same texts give the same
    tokenizer. It saves with `save_pretrained` and reloads offline with `AutoTokenizer.from_pretrained`.

    Args:
        texts (`Iterable[str]`):
            Training documents.
        vocab_size (`int`, *optional*, defaults to 2048):
            Final vocabulary size, including the 256 byte tokens and `<|endoftext|>` (at least 257).

    Returns:
        [`PreTrainedTokenizerFast`]: the trained tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"vocab_size must be an integer >= 257 (256 bytes + {ENDOFTEXT}), got {vocab_size!r}.")
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of documents, not a single string.")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("texts is empty; a tokenizer needs some text to train on.")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        # All 256 bytes, even unseen ones, so that any input encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
    )


def save_importance_dir(final_dir: str, tensors: Mapping[str, Tensor], *, max_shard_size: int | str = "5GB",
                        **kwargs) -> str:
    """Write an importance folder from given buffers (single process), with checksums, atomically into `final_dir`.

    Args:
        final_dir (`str`): the importance folder to write (replaced if it exists).
        tensors (`Mapping[str, Tensor]`): raw accumulator buffers by canonical parameter name.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`): above it, HF shards + index.
        **kwargs: `config`, `meta`, `shapes` (and optionally `extra`, `checksums`) of `importance_files.finalize`.

    Returns:
        `str`: `final_dir`.
    """
    from .files import importance_files as F
    from .files.safetensors_io import cpu_tensors, tensor_checksum
    from .io_utils import temp_sibling

    tmp = temp_sibling(final_dir)
    cpu = cpu_tensors(tensors)
    try:
        F.write_single(tmp, cpu, max_shard_size=max_shard_size)
        kwargs.setdefault("checksums", {"tensors": {n: tensor_checksum(t) for n, t in cpu.items()}})
        return F.finalize(tmp, final_dir, **kwargs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def layer_reconstruction_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """
    Squared output error of replacing `W` by `W_hat` on the inputs summarised by `H`.

    `trace((W - W_hat) H (W - W_hat)^T)`, which equals `||W X^T - W_hat X^T||_F^2` when `H = X^T X` (`X`: `[tokens,
    in]` inputs): the objective SparseGPT minimises.

    Args:
        W (`torch.Tensor`):
            `[out, in]` original weight.
        W_hat (`torch.Tensor`):
            `[out, in]` pruned weight.
        H (`torch.Tensor`):
            `[in, in]` sum of `x x^T` over tokens.

    Returns:
        `float`: the error, computed in float32 (squared output units summed over tokens and outputs).

    Raises:
        `ValueError`: shapes disagree.
    """
    from .scorers.sparsegpt import check_pair

    check_pair(W, H)
    if not isinstance(W_hat, Tensor) or W_hat.shape != W.shape:
        raise ValueError(f"`W_hat` must have the shape of `W` {tuple(W.shape)}, got {getattr(W_hat, 'shape', None)}.")
    D = W.detach().float() - W_hat.detach().float().to(W.device)
    return float(((D @ H.detach().float().to(W.device)) * D).sum())
