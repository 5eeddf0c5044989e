"""Transformer-scale tasks (the ``transformers`` suite): GPT-style character LMs on Python's own
source, a ViT on generated shapes, and a fine-tuning job whose pre-training the benchmark does
itself. (``gpt-lm-trainer``, the same LM through Hugging Face's Trainer, is in
:mod:`~benchmarks.learning_quality.hf_trainer`.)

* ``gpt-lm``: :class:`GPT` with 4 pre-LayerNorm blocks, d_model 128, 4 heads, context 64, a GELU
  MLP of 768, token and learned position embeddings and an untied output head (1.09M parameters),
  2,000 steps of 16 windows on the corpus ``stdlib-a`` (:mod:`~benchmarks.learning_quality.text`).
* ``gpt-lm-rms``: :class:`GPT` with 3 blocks, d_model 96, 4 heads, context 64, an MLP of 384,
  RMSNorm written out (:class:`RMSNorm`), no biases, the output head tied to the token embedding
  (0.35M parameters), 2,000 steps on ``stdlib-b``.
* ``vit``: :class:`ViT`, 4×4 patches of the 16×16 shape images of the ``cnn`` task
  (:func:`~benchmarks.learning_quality.tasks.shape_images`), d 64, 3 pre-LayerNorm blocks,
  4 heads, a CLS token (0.10M parameters), 1,000 steps.
* ``lm-finetune``: :class:`GPT` with 3 blocks, d_model 128, an MLP of 512 (0.63M parameters),
  pre-trained by the benchmark on ``stdlib-c`` (Python source) with AdamW (lr 3e-3, the suite's
  warm-up + cosine schedule, as many steps as the fine-tune), then fine-tuned for 1,000 steps on
  ``pydoc-topics`` (English help pages); validation on the held-out end of the English text. The
  pre-trained weights are a function of the seed and the step count alone: made once
  (:meth:`LMFinetune.prepare`, which the runner calls before any run, in its worker pool) and kept
  in memory and on disk (:data:`CACHE_DIR`), so no fine-tune run is timed with them and no
  optimizer under test touches them.

Every task draws its initial weights from its seed's init stream and its batches from the
seed's per-step streams (:class:`~benchmarks.learning_quality.base.Task`), and runs with at least
3 seeds in a full run (``min_seeds``).
"""

import copy
import hashlib
import math
import os
from pathlib import Path
from typing import Dict, Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.learning_quality import text
from benchmarks.learning_quality.base import INIT_STREAM, Batch, Task
from benchmarks.learning_quality.charlm import VOCAB

#: Where pre-trained weights are kept between processes (``LEARNING_QUALITY_CACHE`` overrides).
CACHE_DIR = Path(
    os.environ.get(
        "LEARNING_QUALITY_CACHE",
        Path(__file__).resolve().parents[1] / "results" / "cache" / "learning_quality",
    )
)
#: The random streams of pre-training: its initial weights and its batches (``PRETRAIN - k``).
PRETRAIN_INIT_STREAM = -1_000
PRETRAIN_STREAM = -2_000_000
PRETRAIN_LR = 3e-3


# -- models ---------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension with a learned gain."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(kind: str, width: int) -> nn.Module:
    return RMSNorm(width) if kind == "rms" else nn.LayerNorm(width)


class Attention(nn.Module):
    """Multi-head self-attention (causal or not) through ``F.scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int, causal: bool, bias: bool) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of {heads} heads")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` with a GELU
    MLP."""

    def __init__(
        self, width: int, heads: int, hidden: int, norm: str, causal: bool, bias: bool
    ) -> None:
        super().__init__()
        self.norm1 = _norm(norm, width)
        self.attn = Attention(width, heads, causal, bias)
        self.norm2 = _norm(norm, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, width, bias=bias)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _init_gpt_style(model: nn.Module, layers: int) -> None:
    """GPT-2's initialisation: normal(0, 0.02) weights, zero biases, the residual projections
    scaled by ``1 / sqrt(2 · layers)``."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if name.endswith("attn.proj") or name.endswith("mlp.2"):
                std /= math.sqrt(2 * layers)
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class GPT(nn.Module):
    """A GPT-style LM: token + learned position embeddings, ``layers`` causal pre-norm blocks, a
    final norm and an output head (tied to the token embedding when ``tied``)."""

    def __init__(
        self,
        vocab: int,
        context: int,
        width: int,
        layers: int,
        heads: int,
        hidden: int,
        norm: str = "layer",
        tied: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(
            Block(width, heads, hidden, norm, causal=True, bias=bias) for _ in range(layers)
        )
        self.norm = _norm(norm, width)
        self.head = nn.Linear(width, vocab, bias=bias and not tied)
        _init_gpt_style(self, layers)
        if tied:
            self.head.weight = self.token.weight

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class ViT(nn.Module):
    """A vision transformer: non-overlapping ``patch``×``patch`` patches through a linear
    embedding, a CLS token, learned positions, ``layers`` pre-LayerNorm blocks, a final norm and a
    linear classifier on the CLS token."""

    def __init__(
        self,
        side: int,
        patch: int,
        channels: int,
        width: int,
        layers: int,
        heads: int,
        classes: int,
    ) -> None:
        super().__init__()
        if side % patch:
            raise ValueError(f"image side {side} is not a multiple of the patch {patch}")
        self.patch = patch
        self.embed = nn.Linear(channels * patch * patch, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(0.02 * torch.randn(1, 1 + (side // patch) ** 2, width))
        self.blocks = nn.Sequential(
            *[
                Block(width, heads, 2 * width, "layer", causal=False, bias=True)
                for _ in range(layers)
            ]
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, images: Tensor) -> Tensor:
        b, c, h, w = images.shape
        p = self.patch
        patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        x = self.embed(patches.reshape(b, (h // p) * (w // p), c * p * p))
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.position
        return self.head(self.norm(self.blocks(x))[:, 0])


# -- tasks ----------------------------------------------------------------------------------------


class CharGPTTask(Task):
    """Next-character prediction on a corpus of :mod:`~benchmarks.learning_quality.text` with a
    :class:`GPT`; random training windows, evenly spaced validation windows, disjoint spans."""

    suite = "transformers"
    min_seeds = 3
    default_steps = 2000
    quick_steps = 8
    batch_size = 16
    validation_size = 128
    corpus = "stdlib-a"
    context = 64
    width = 128
    layers = 4
    heads = 4
    hidden = 768
    norm = "layer"
    tied = False
    bias = True

    def windows(self) -> text.Windows:
        return text.Windows(self.corpus, self.context)

    def build_model(self) -> nn.Module:
        return GPT(
            VOCAB,
            self.context,
            self.width,
            self.layers,
            self.heads,
            self.hidden,
            self.norm,
            self.tied,
            self.bias,
        )

    def train_starts(self, step: int) -> Tensor:
        return self.windows().train_starts(self.batch_size, self.generator(step))

    def validation_starts(self) -> Tensor:
        return self.windows().validation_starts(self.validation_size)

    def batch(self, step: int) -> Batch:
        return self.windows().cut(self.train_starts(step))

    def validation(self) -> Batch:
        if self._held is None:
            self._held = self.windows().cut(self.validation_starts())
        return self._held

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        logits = getattr(output, "logits", output)  # a Hugging Face model's output, or logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    def describe(self) -> Dict[str, object]:
        return {**super().describe(), **text.describe(self.corpus), "context": self.context}


class GPTLM(CharGPTTask):
    name = "gpt-lm"
    summary = (
        "GPT char-LM: 4 pre-LayerNorm blocks, d_model 128, 4 heads, context 64, GELU MLP 768, "
        "untied head, on stdlib source (corpus stdlib-a)"
    )


class GPTLMRMS(CharGPTTask):
    name = "gpt-lm-rms"
    summary = (
        "GPT char-LM: 3 pre-RMSNorm blocks, d_model 96, 4 heads, context 64, MLP 384, no biases, "
        "tied embedding/head, on stdlib source (corpus stdlib-b)"
    )
    corpus = "stdlib-b"
    width = 96
    layers = 3
    hidden = 384
    norm = "rms"
    tied = True
    bias = False


class ShapesViT(Task):
    """The ``cnn`` task's five shapes in noisy 16×16 images, classified by a small ViT."""

    name = "vit"
    summary = "ViT: 4x4 patches of 16x16 shape images, d 64, 3 blocks, 4 heads, CLS token, 5 shapes"
    suite = "transformers"
    min_seeds = 3
    default_steps = 1000
    quick_steps = 8
    validation_size = 512
    side, patch, width, layers, heads = 16, 4, 64, 3, 4

    def build_model(self) -> nn.Module:
        from benchmarks.learning_quality.tasks import SHAPES

        return ViT(self.side, self.patch, 1, self.width, self.layers, self.heads, len(SHAPES))

    def sample(self, stream: int, size: int) -> Batch:
        from benchmarks.learning_quality.tasks import SHAPES, shape_images

        g = self.generator(stream)
        labels = torch.randint(0, len(SHAPES), (size,), generator=g)
        return shape_images(labels, g), labels


class LMFinetune(CharGPTTask):
    """A :class:`GPT` pre-trained on Python source (``stdlib-c``), fine-tuned on English
    (``pydoc-topics``)."""

    name = "lm-finetune"
    summary = (
        "GPT char-LM (3 pre-LayerNorm blocks, d_model 128, context 64) pre-trained by the "
        "benchmark with AdamW on stdlib source (stdlib-c), fine-tuned on the pydoc help topics"
    )
    default_steps = 1000
    corpus = "pydoc-topics"
    pretrain_corpus = "stdlib-c"
    layers = 3
    hidden = 512

    def pretrain_steps(self) -> int:
        """Pre-training steps: as many as the fine-tune's."""
        return self.steps

    def cache_path(self) -> Path:
        """The file of the pre-trained weights: named by everything they depend on."""
        key = "|".join(
            map(
                str,
                (
                    self.name,
                    self.seed,
                    self.pretrain_steps(),
                    self.batch_size,
                    PRETRAIN_LR,
                    self.context,
                    self.width,
                    self.layers,
                    self.heads,
                    self.hidden,
                    hashlib.sha256(text.corpus(self.pretrain_corpus).encode()).hexdigest(),
                    torch.__version__,
                ),
            )
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return CACHE_DIR / f"{self.name}-seed{self.seed}-{self.pretrain_steps()}-{digest}.pt"

    def prepare(self) -> None:
        _pretrained_state(self)

    def preparation_steps(self) -> int:
        return self.pretrain_steps()

    def timing_model(self) -> nn.Module:
        return self.build_model()

    def model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.stream_seed(INIT_STREAM))
            model = self.build_model()
        model.load_state_dict(_pretrained_state(self))
        return model

    def pretrain(self) -> Dict[str, Tensor]:
        """Pre-train on ``stdlib-c`` with AdamW (lr :data:`PRETRAIN_LR`, weight decay 0, the
        suite's warm-up + cosine schedule); the weights. A function of the seed and the steps."""
        from benchmarks.learning_quality import optimizers

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.stream_seed(PRETRAIN_INIT_STREAM))
            model = self.build_model()
        windows = text.Windows(self.pretrain_corpus, self.context)
        optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
        scheduler = optimizers.schedule(optimizer, self.pretrain_steps())
        for step in range(self.pretrain_steps()):
            starts = windows.train_starts(self.batch_size, self.generator(PRETRAIN_STREAM - step))
            inputs, target = windows.cut(starts)
            optimizer.zero_grad(set_to_none=True)
            self.loss(model(inputs), target).backward()
            optimizer.step()
            scheduler.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


_MEMORY: Dict[str, Dict[str, Tensor]] = {}


def _pretrained_state(task: LMFinetune) -> Dict[str, Tensor]:
    """The pre-trained weights of ``task``: from memory, else from :data:`CACHE_DIR`, else
    pre-trained now and written there (atomically: a temporary file renamed)."""
    path = task.cache_path()
    key = str(path)
    if key not in _MEMORY:
        state: Optional[Dict[str, Tensor]] = None
        if path.exists():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # a damaged cache file: pre-train again
                state = None
        if state is None:
            state = task.pretrain()
            path.parent.mkdir(parents=True, exist_ok=True)
            ignore = path.parent / ".gitignore"
            if not ignore.exists():
                ignore.write_text("*\n")
            temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save(state, temporary)
            os.replace(temporary, path)
        _MEMORY[key] = state
    return copy.deepcopy(_MEMORY[key])


def clear_memory() -> None:
    """Forget the pre-trained weights held in memory (the disk cache stays)."""
    _MEMORY.clear()


#: The tasks of this module, in report order.
TRANSFORMER_TASKS: Dict[str, Type[Task]] = {
    task.name: task for task in (GPTLM, GPTLMRMS, ShapesViT, LMFinetune)
}
