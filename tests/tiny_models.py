"""Tiny random Llama / Mistral / Qwen2 models and an offline byte-level BPE tokenizer for evaluator tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A tiny model reads a tiny text.\n"
    "Question: which answer is right? Answer: A\nAnswer: B\nAnswer: C\nAnswer: D\n"
    "Pruning removes heads and channels; perplexity measures how surprised the model is.\n"
    "Numbers 0 1 2 3 4 5 6 7 8 9 and words such as model, layer, head, channel, token.\n"
) * 4

# name -> (config class name, kwargs). Shapes chosen to exercise what pruning must get right.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_mha": ("LlamaConfig", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                                      intermediate_size=64, num_hidden_layers=3)),
    "llama_gqa_odd": ("LlamaConfig", dict(hidden_size=36, num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                                          intermediate_size=48, num_hidden_layers=3)),
    "llama_tied_bias": ("LlamaConfig", dict(hidden_size=24, num_attention_heads=6, num_key_value_heads=2, head_dim=6,
                                            intermediate_size=40, num_hidden_layers=3, tie_word_embeddings=True,
                                            attention_bias=True, mlp_bias=True)),
    "qwen2_bias": ("Qwen2Config", dict(hidden_size=24, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                       intermediate_size=40, num_hidden_layers=3)),
    "mistral_gqa": ("MistralConfig", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          intermediate_size=48, num_hidden_layers=3, sliding_window=None)),
    "llama_deep": ("LlamaConfig", dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                       intermediate_size=32, num_hidden_layers=32)),
    # SmolLM-135M's shape, scaled down: 30 layers, 9 query / 3 KV heads, head_dim set (9 x 8 != 54), tied embeddings
    "llama_smol_shape": ("LlamaConfig", dict(hidden_size=54, num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                                             intermediate_size=64, num_hidden_layers=30, tie_word_embeddings=True)),
}


def make_config(name: str, attn_implementation: str = "eager") -> Any:
    import transformers

    cls_name, kwargs = CONFIGS[name]
    cls = getattr(transformers, cls_name)
    config = cls(vocab_size=1000, max_position_embeddings=256, initializer_range=0.2, bos_token_id=0,
                 eos_token_id=1, pad_token_id=2, **kwargs)
    config._attn_implementation = attn_implementation
    return config


def make_model(name: str, seed: int = 0, attn_implementation: str = "eager") -> torch.nn.Module:
    """A random model with non-trivial weights (norm weights and biases randomised too)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(name, attn_implementation))
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif pname.endswith(".bias"):
                param.copy_(0.2 * torch.randn_like(param))
    return model.eval()


def make_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer trained offline on ``CORPUS``; adds ``<s>`` in front of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny(name: str, directory: str | Path, *, dtype: torch.dtype = torch.float32, seed: int = 0,
              tokenizer: Any = None) -> Path:
    """Write a tiny model (weights in ``dtype``) and a tokenizer to ``directory``, as from_pretrained expects."""
    directory = Path(directory)
    model = make_model(name, seed)
    model.to(dtype)
    model.save_pretrained(directory)
    (tokenizer or make_tokenizer()).save_pretrained(directory)
    return directory


def save_all(root: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Save every tiny config (``llama_mha`` in bfloat16, the rest float32) under ``root``; one tokenizer."""
    tokenizer = make_tokenizer()
    out = {}
    for name in names or list(CONFIGS):
        dtype = torch.bfloat16 if name == "llama_mha" else torch.float32
        out[name] = save_tiny(name, Path(root) / name, dtype=dtype, tokenizer=tokenizer)
    return out


def random_importance(spec: Any, seed: int = 0) -> Any:
    """An ``Importance`` with random scores, so kept units are scattered, not a prefix."""
    import numpy as np

    from archopt.evaluators.importance import Importance

    rng = np.random.default_rng(seed)
    return Importance(key=f"random-{seed}", criterion="random",
                      kv_group=rng.random((spec.num_layers, spec.num_kv_heads)),
                      channel=rng.random((spec.num_layers, spec.intermediate_size)))


def padded_batch(vocab: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 14 tokens, the second left-padded by 5 (attention mask 0 there)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :5] = 2
    mask[1, :5] = 0
    return ids, mask


def write_local_data(root: str | Path) -> Path:
    """A small data folder laid out like ../shared/data (WikiText-2 raw test, PTB train/valid/test)."""
    root = Path(root)
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    (root / "wikitext-2").mkdir(parents=True, exist_ok=True)
    (root / "wikitext-2" / "wiki.test.raw").write_text("".join(f" {line} \n \n" for line in lines * 3))
    (root / "ptb").mkdir(exist_ok=True)
    ptb = "".join(f" {line.lower()} \n" for line in lines * 3)
    for split in ("train", "valid", "test"):
        (root / "ptb" / f"ptb.{split}.txt").write_text(ptb)
    return root
