"""``char-lm``: a small character-level transformer language model on Python's own source code.

The text is the source of the standard-library modules :data:`MODULES`, read from the files that
``importlib.util.find_spec(name).origin`` names and joined in that order (about 200k characters
on CPython 3.10–3.13; the same text for a given Python version, nothing downloaded). The first
90% is the training span, the last 10% the validation span: a training window never reaches past
the cut and every validation window starts after it, so the two share no character.
"""

import functools
import importlib.util
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.learning_quality.base import Batch, Task

#: The standard-library modules whose source is the corpus, in order.
MODULES = ("argparse", "difflib", "textwrap")
#: Newline and printable ASCII; any other character maps to one extra "unknown" token.
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB = len(ALPHABET) + 1
TRAIN_FRACTION = 0.9


@functools.lru_cache(maxsize=1)
def corpus() -> str:
    """The concatenated source of :data:`MODULES`."""
    parts: List[str] = []
    for name in MODULES:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if not origin or not origin.endswith(".py"):
            raise RuntimeError(f"char-lm needs the source of the stdlib module {name!r}")
        with open(origin, encoding="utf-8") as handle:
            parts.append(handle.read())
    return "\n".join(parts)


@functools.lru_cache(maxsize=1)
def encoded() -> Tensor:
    """:func:`corpus` as token ids (int64)."""
    index = {c: i for i, c in enumerate(ALPHABET)}
    return torch.tensor([index.get(c, VOCAB - 1) for c in corpus()], dtype=torch.int64)


def spans() -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """``(start, end)`` of the training and validation spans of :func:`encoded`."""
    total = int(encoded().shape[0])
    cut = int(TRAIN_FRACTION * total)
    return (0, cut), (cut, total)


class Block(nn.Module):
    """A pre-norm transformer block with causal self-attention."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final norm and an untied readout."""

    def __init__(self, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(0.02 * torch.randn(context, width))
        self.blocks = nn.Sequential(*[Block(width, heads, 2 * width) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.readout(self.norm(self.blocks(x)))


class CharLM(Task):
    """Next-character prediction with a 2-layer, 32-wide transformer over 32-character windows."""

    name = "char-lm"
    summary = (
        "transformer LM (2 layers, d_model 32, 4 heads, context 32) on stdlib source "
        f"({', '.join(MODULES)})"
    )
    batch_size = 32
    validation_size = 64
    context = 32
    width = 32
    layers = 2
    heads = 4

    def build_model(self) -> nn.Module:
        return CharTransformer(self.context, self.width, self.layers, self.heads)

    def _windows(self, starts: Tensor) -> Batch:
        text = encoded()
        offsets = torch.arange(self.context + 1)
        windows = text[starts[:, None] + offsets]
        return windows[:, :-1], windows[:, 1:]

    def train_starts(self, step: int) -> Tensor:
        """The first positions of the windows of training batch ``step``: each window and its
        shifted target lie inside the training span."""
        (begin, end), _ = spans()
        last = end - (self.context + 1)
        return torch.randint(begin, last + 1, (self.batch_size,), generator=self.generator(step))

    def validation_starts(self) -> Tensor:
        """The first positions of the validation windows, evenly spaced over the validation
        span."""
        _, (begin, end) = spans()
        last = end - (self.context + 1)
        stride = max(1, (last - begin) // self.validation_size)
        return torch.arange(begin, last + 1, stride)[: self.validation_size]

    def batch(self, step: int) -> Batch:
        return self._windows(self.train_starts(step))

    def validation(self) -> Batch:
        if self._held is None:
            self._held = self._windows(self.validation_starts())
        return self._held

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.reshape(-1, VOCAB), target.reshape(-1))


#: The loss of predicting every token uniformly (ln of the vocabulary size).
UNIFORM_LOSS = math.log(VOCAB)
