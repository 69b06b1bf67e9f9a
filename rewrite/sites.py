"""Attention site records: what policies, reports and users see (never FX nodes)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from tabulate import tabulate

#: an additive mask value (or a fill) at or below this removes a key from the softmax: exp(-1e4) is exactly 0
#: in every float type. Hugging Face masks with ``finfo.min``, older code with ``-10000``; one constant for all
MASKED_BELOW = -1e4


@dataclasses.dataclass
class AttentionSite:
    """One attention computation found in the model.

    ``name`` is the dotted ``named_modules()`` path of the innermost module that owns it and ``index``
    its order in the forward pass. Shapes are printed as strings (symbolic where the capture was
    dynamic). ``is_causal`` is True only when the mask was proven lower-triangular for every length.
    """

    name: str
    index: int = 0
    status: str = "matched"            # "matched" or "rejected"
    reason: str = ""
    kind: str = "eager"                # "eager" (softmax(q·kᵀ)·v) or "sdpa" (an existing fused call)
    q_shape: tuple = ()
    k_shape: tuple = ()
    v_shape: tuple = ()
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    scale: Optional[float] = None
    is_causal: bool = False
    mask: str = "none"                 # none | additive | boolean | causal | bias | alibi, joined by '+'
    dropout_p: float = 0.0
    layout: str = ""
    grid: Optional[tuple] = None
    prefix_tokens: Optional[int] = None
    cross: bool = False
    gqa: bool = False
    softmax_dtype: Optional[str] = None
    dtype: Optional[str] = None
    ordinal: int = 0                   # order among the sites of the same module
    softcap: Optional[float] = None    # scores soft-capped to softcap * tanh(s / softcap) before the mask (Gemma 2)
    sinks: int = 0                     # extra keys every query sees, their logits learned, their values 0 (gpt-oss)
    #: the site's mask on the example batch, as lowered for SDPA (None: no mask), when ``example_mask_known``;
    #: set by the pipeline before a handler runs, so handlers never evaluate the graph themselves
    example_mask: Any = dataclasses.field(default=None, repr=False, compare=False)
    example_mask_known: bool = dataclasses.field(default=False, repr=False, compare=False)

    @property
    def key(self) -> tuple:
        return (self.name, self.ordinal)

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("example_")}
        for k in ("q_shape", "k_shape", "v_shape", "grid"):
            if d[k] is not None:
                d[k] = [str(s) for s in d[k]]
        return d


class SiteTable(list):
    """A list of :class:`AttentionSite` that prints as a table."""

    COLUMNS = ("index", "name", "status", "heads", "kv_heads", "head_dim", "scale", "mask", "is_causal",
               "dropout_p", "layout", "reason")

    def table(self) -> str:
        rows = []
        # the soft-cap and sink columns only where a site has one (Gemma 2, gpt-oss): other tables read as before
        columns = self.COLUMNS + (("softcap",) if any(s.softcap is not None for s in self) else ()) \
            + (("sinks",) if any(s.sinks for s in self) else ())
        for s in self:
            row = []
            for c in columns:
                v = getattr(s, c)
                if c == "scale" and isinstance(v, float):
                    v = f"{v:.4g}"
                row.append(v)
            rows.append(row)
        return tabulate(rows, headers=columns, tablefmt="simple")

    def __str__(self) -> str:
        return self.table() if self else "(no attention sites found)"

    def to_json(self) -> list:
        return [s.to_json() for s in self]
