"""Character-level language modelling with small causal transformers, on generated languages.

Every task draws, from its seed alone:

* a **language**: an alphabet (2 to 5 vowels and 6 to 14 consonants out of the 26 letters), a
  vocabulary of 40 to 200 pseudo-words made of consonant–vowel syllables, Zipfian word
  frequencies (exponent 0.9 to 1.4), a sparse word-bigram Markov chain (each word is followed by
  3 to 10 others, drawn by frequency, with random weights) and sentences of 3 to 12 words with
  commas, semicolons and a final ``.``, ``!`` or ``?``. The text is written with the 32
  characters of :data:`CHARACTERS`, each one token;
* a **transformer**: ``d_model`` 16, 32 or 48, 1 or 2 layers, 2 or 4 heads, a context of 16 to 32
  characters, a token embedding (``nn.Embedding``) plus learned positions (an ``nn.Embedding``
  too), pre-norm blocks of causal self-attention (``F.scaled_dot_product_attention`` with
  ``is_causal=True``; query, key and value projections without bias) and a GELU MLP,
  LayerNorm or RMSNorm, an output head tied to the token embedding or not; GPT-2 style
  initialisation (normal, 0.02);
* a **batch size** of 16 to 32 windows.

Each language writes two texts from two different random streams: a training text (24,000
characters) that :meth:`TextLMTask.batch` draws windows from, and a validation text (6,000
characters) for :meth:`~TextLMTask.validation_batch` and :meth:`~TextLMTask.evaluation_batch`
that shares no sentence with it (a validation sentence that the training text contains is drawn
again). A batch is ``(inputs, targets)``: ``(batch, context)`` token ids and the ids one character
later. Everything is a deterministic function of the seed (batch ``k`` of ``(seed, k)``), and the
forward pass is a pure function of the parameters, so tasks work under
``torch.func.functional_call``, ``grad`` and ``vmap``.

The text is neither downloaded nor taken from any existing corpus, so it stays disjoint from
text an evaluation may use.

:class:`TextLMFamily` augments its training tasks (per-tensor parameter scales and a loss scale,
see :mod:`compiledopt.tasks.augment`) unless asked not to; held-out tasks stay as they are.
"""

import bisect
import functools
import math
from typing import List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compiledopt.tasks.augment import AugmentableFamily
from compiledopt.tasks.base import Batch, Task

__all__ = [
    "CHARACTERS",
    "Language",
    "TextLM",
    "TextLMFamily",
    "TextLMSpec",
    "TextLMTask",
    "decode",
    "encode",
    "language",
    "text_spec",
]

#: The characters of every language; a character's token id is its index here.
CHARACTERS = " abcdefghijklmnopqrstuvwxyz.,;!?"
VOCAB = len(CHARACTERS)
D_MODELS = (16, 32, 48)
LAYERS = (1, 2)
HEADS = (2, 4)
CONTEXTS = (16, 32)  # inclusive range
BATCH_SIZES = (16, 32)  # inclusive range
NORMS = ("layernorm", "rmsnorm")
TRAIN_CHARACTERS = 24_000
VALIDATION_CHARACTERS = 6_000
EVALUATION_WINDOWS = 128
_VOWELS = "aeiouy"
_CONSONANTS = "bcdfghjklmnpqrstvwxz"
_MASK64 = (1 << 64) - 1
_INDEX = {c: i for i, c in enumerate(CHARACTERS)}


def _stream_seed(seed: int, tag: int) -> int:
    """A well-mixed 63-bit seed for stream ``tag`` of ``seed`` (splitmix64 of the pair)."""
    z = (seed * 0x9E3779B97F4A7C15 + tag * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"Invalid task seed: {seed!r} (an integer in [0, 2**63))")
    return seed


def _check_step(step: object, what: str = "step") -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"Invalid {what}: {step!r} (a non-negative integer)")
    return step


def encode(text: str) -> Tensor:
    """The token ids of ``text`` (int64); a character outside :data:`CHARACTERS` is named."""
    try:
        return torch.tensor([_INDEX[c] for c in text], dtype=torch.int64)
    except KeyError as error:
        raise ValueError(f"Invalid character: {error.args[0]!r} (not in {CHARACTERS!r})") from None


def decode(tokens: Tensor) -> str:
    """The text of token ids."""
    return "".join(CHARACTERS[int(t)] for t in tokens.reshape(-1))


# -- the language ----------------------------------------------------------------------------


class Language(NamedTuple):
    """A generated language (see the module doc).

    Attributes:
        words: the vocabulary, most frequent first.
        exponent: the Zipf exponent of the word frequencies.
        successors: per word, the indices of the words that may follow it ...
        weights: ... and their cumulative probabilities (the last is 1).
        comma: probability of a comma (or a semicolon) after a word inside a sentence.
        ends: cumulative probabilities of ``.``, ``!`` and ``?`` ending a sentence.
    """

    words: Tuple[str, ...]
    exponent: float
    successors: Tuple[Tuple[int, ...], ...]
    weights: Tuple[Tuple[float, ...], ...]
    comma: float
    ends: Tuple[float, float, float]


def _pick(generator: torch.Generator, letters: str, count: int) -> str:
    order = torch.randperm(len(letters), generator=generator)[:count]
    return "".join(letters[i] for i in sorted(order.tolist()))


def _cumulative(weights: Tensor) -> Tuple[float, ...]:
    cumulative = (weights / weights.sum()).cumsum(0).tolist()
    cumulative[-1] = 1.0
    return tuple(cumulative)


def _draw_language(seed: int) -> Language:
    g = torch.Generator().manual_seed(_stream_seed(seed, 1))
    vowels = _pick(g, _VOWELS, int(torch.randint(2, 6, (), generator=g)))
    consonants = _pick(g, _CONSONANTS, int(torch.randint(6, 15, (), generator=g)))
    target = int(torch.randint(40, 201, (), generator=g))
    words: List[str] = []
    seen = set()
    for _ in range(20 * target):  # syllable draws until ``target`` distinct words
        if len(words) == target:
            break
        syllables = int(torch.randint(1, 4, (), generator=g))
        word = ""
        for _ in range(syllables):
            c, v, coda, closed = torch.rand(4, generator=g).tolist()
            word += consonants[int(c * len(consonants))] + vowels[int(v * len(vowels))]
            if closed < 0.3:
                word += consonants[int(coda * len(consonants))]
        if word not in seen:
            seen.add(word)
            words.append(word)
    exponent = float(torch.empty(()).uniform_(0.9, 1.4, generator=g))
    ranks = torch.arange(1, len(words) + 1, dtype=torch.float64)
    unigram = ranks.pow(-exponent)
    unigram = unigram / unigram.sum()
    successors, weights = [], []
    for _ in words:
        count = min(int(torch.randint(3, 11, (), generator=g)), len(words))
        chosen = torch.multinomial(unigram, count, replacement=False, generator=g)
        strength = unigram[chosen] * torch.rand(count, generator=g, dtype=torch.float64).add(0.1)
        successors.append(tuple(chosen.tolist()))
        weights.append(_cumulative(strength))
    comma = float(torch.empty(()).uniform_(0.03, 0.2, generator=g))
    ends = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    ends[1:] = torch.rand(2, generator=g, dtype=torch.float64) * 0.3
    full_stop, exclamation, question = _cumulative(ends)
    return Language(
        tuple(words),
        exponent,
        tuple(successors),
        tuple(weights),
        comma,
        (full_stop, exclamation, question),
    )


def _sentences(lang: Language, stream: int):
    """An endless stream of sentences of ``lang`` (each ending in ``.``, ``!`` or ``?``)."""
    g = torch.Generator().manual_seed(stream)
    first = _cumulative(torch.arange(1, len(lang.words) + 1, dtype=torch.float64) ** -lang.exponent)
    while True:
        draws = iter(torch.rand(64, generator=g, dtype=torch.float64).tolist())
        length = 3 + int(next(draws) * 10)
        word = bisect.bisect_left(first, next(draws))
        parts = [lang.words[word]]
        for _ in range(length - 1):
            if next(draws) < lang.comma:
                parts[-1] += ";" if next(draws) < 0.2 else ","
            options = lang.successors[word]
            word = options[bisect.bisect_left(lang.weights[word], next(draws))]
            parts.append(lang.words[word])
        end = ".!?"[bisect.bisect_left(lang.ends, next(draws))]
        yield " ".join(parts) + end


@functools.lru_cache(maxsize=32)
def language(seed: int) -> Tuple[Language, str, str]:
    """The language of task ``seed`` and its training and validation texts (cached).

    The validation text shares no sentence with the training text: a sentence drawn for it
    that the training text contains is skipped.
    """
    lang = _draw_language(seed)
    train_sentences: List[str] = []
    size = 0
    for sentence in _sentences(lang, _stream_seed(seed, 2)):
        train_sentences.append(sentence)
        size += len(sentence) + 1
        if size >= TRAIN_CHARACTERS:
            break
    known = set(train_sentences)
    validation_sentences: List[str] = []
    size = 0
    for attempt, sentence in enumerate(_sentences(lang, _stream_seed(seed, 3))):
        if attempt > 100_000:
            raise RuntimeError(f"language of seed {seed} repeats its training sentences")
        if sentence in known:
            continue
        validation_sentences.append(sentence)
        size += len(sentence) + 1
        if size >= VALIDATION_CHARACTERS:
            break
    train = " ".join(train_sentences)[:TRAIN_CHARACTERS]
    validation = " ".join(validation_sentences)[:VALIDATION_CHARACTERS]
    return lang, train, validation


# -- the model -------------------------------------------------------------------------------


class _RMSNorm(nn.Module):
    """``x / rms(x) · weight`` over the last dimension (for PyTorch without ``nn.RMSNorm``)."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(kind: str, size: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(size)
    if kind == "rmsnorm":
        if hasattr(nn, "RMSNorm"):
            return nn.RMSNorm(size, eps=1e-6)
        return _RMSNorm(size)
    raise ValueError(f"Invalid norm: {kind!r} (one of {NORMS})")


class _Block(nn.Module):
    def __init__(self, d_model: int, heads: int, norm: str) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = _norm(norm, d_model)
        # No bias: a key bias gets no gradient (softmax ignores a shift shared by a row's
        # scores), only rounding noise, which sign-like rules would amplify.
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = _norm(norm, d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, h: Tensor) -> Tensor:
        batch, length, width = h.shape
        q, k, v = self.qkv(self.norm1(h)).split(width, dim=-1)
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return h + self.out(F.gelu(self.fc(self.norm2(h))))


class TextLM(nn.Module):
    """A pre-norm causal transformer over :data:`CHARACTERS`: ``(B, T)`` ids → ``(B, T, 32)``
    logits.

    Parameters: ``embed.weight`` (tokens), ``positions.weight``, ``blocks.<i>.{norm1, qkv, proj,
    norm2, fc, out}.*``, ``norm.*`` and ``head.weight`` (left out of ``named_parameters`` when
    ``tied``: the head is then the token embedding itself). Built without touching the global
    RNG: every weight is drawn from ``generator``.
    """

    def __init__(
        self,
        d_model: int,
        layers: int,
        heads: int,
        context: int,
        norm: str,
        tied: bool,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"Invalid heads: {heads} (must divide d_model={d_model})")
        self.context = context
        self.tied = tied
        with torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG
            self.embed = nn.Embedding(VOCAB, d_model)
            self.positions = nn.Embedding(context, d_model)
            self.blocks = nn.ModuleList(_Block(d_model, heads, norm) for _ in range(layers))
            self.norm = _norm(norm, d_model)
            self.head = nn.Linear(d_model, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        residual = 0.02 / math.sqrt(2 * layers)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                elif param.dim() == 1:  # normalisation gains
                    param.fill_(1.0)
                else:
                    std = residual if name.endswith(("proj.weight", "out.weight")) else 0.02
                    param.copy_(torch.randn(param.shape, generator=generator) * std)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[-1]
        h = self.embed(tokens) + self.positions.weight[:length]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class TextLMSpec(NamedTuple):
    """What a task's seed draws for its model and batches (see the module doc)."""

    d_model: int
    layers: int
    heads: int
    context: int
    norm: str
    tied: bool
    batch_size: int


def _choice(generator: torch.Generator, options: tuple):
    return options[int(torch.randint(0, len(options), (), generator=generator))]


def _draw_spec(g: torch.Generator) -> TextLMSpec:
    d_model = _choice(g, D_MODELS)
    layers = _choice(g, LAYERS)
    heads = _choice(g, HEADS)
    context = int(torch.randint(CONTEXTS[0], CONTEXTS[1] + 1, (), generator=g))
    norm = _choice(g, NORMS)
    tied = bool(torch.randint(0, 2, (), generator=g))
    batch_size = int(torch.randint(BATCH_SIZES[0], BATCH_SIZES[1] + 1, (), generator=g))
    return TextLMSpec(d_model, layers, heads, context, norm, tied, batch_size)


def text_spec(seed: int) -> TextLMSpec:
    """The model and batch size of task ``seed``; cheap (no text, no parameters)."""
    return _draw_spec(torch.Generator().manual_seed(_check_seed(seed)))


class TextLMTask(Task):
    """One generated language and one small transformer, drawn from ``seed`` (see the module).

    Attributes:
        spec (TextLMSpec): what the seed drew; its fields are also attributes (``d_model``,
            ``layers``, ``heads``, ``context``, ``norm``, ``tied``, ``batch_size``).
        language (Language): the generated language.
        train_text, validation_text (str): the two texts.
        train_tokens, validation_tokens (Tensor): their token ids (int64, on the task's device).
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        seed = _check_seed(seed)
        g = torch.Generator().manual_seed(seed)
        self.spec = _draw_spec(g)
        (
            self.d_model,
            self.layers,
            self.heads,
            self.context,
            self.norm,
            self.tied,
            self.batch_size,
        ) = self.spec
        model = TextLM(self.d_model, self.layers, self.heads, self.context, self.norm, self.tied, g)
        super().__init__(seed, model, device)
        self.language, self.train_text, self.validation_text = language(seed)
        self.train_tokens = encode(self.train_text).to(self.device)
        self.validation_tokens = encode(self.validation_text).to(self.device)
        self._offsets = torch.arange(self.context + 1, device=self.device)

    def _windows(self, tokens: Tensor, starts: Tensor) -> Batch:
        windows = tokens[starts.to(self.device)[:, None] + self._offsets]
        return windows[:, :-1], windows[:, 1:]

    def _draw(self, tokens: Tensor, stream: int) -> Batch:
        high = tokens.numel() - self.context
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator(stream))
        return self._windows(tokens, starts)

    def batch(self, step: int) -> Batch:
        """``batch_size`` windows of the training text at offsets drawn from ``(seed, step)``."""
        return self._draw(self.train_tokens, _check_step(step))

    def validation_batch(self, step: int) -> Batch:
        """``batch_size`` windows of the validation text at offsets drawn from ``(seed, step)``."""
        return self._draw(self.validation_tokens, -1 - _check_step(step))

    def evaluation_batch(self) -> Batch:
        """The first 128 non-overlapping windows of the validation text."""
        starts = torch.arange(EVALUATION_WINDOWS) * (self.context + 1)
        return self._windows(self.validation_tokens, starts)

    def criterion(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))

    def describe(self) -> str:
        """One line for logs: language, model and batch."""
        lang = self.language
        head = "tied" if self.tied else "untied"
        return (
            f"{len(lang.words)} words (zipf {lang.exponent:.2f}), d{self.d_model} "
            f"x{self.layers} layers {self.heads} heads {self.norm} {head} head, "
            f"context {self.context}, batch {self.batch_size}"
        )

    def __repr__(self) -> str:
        return f"TextLMTask(seed={self.seed}: {self.describe()})"


class TextLMFamily(AugmentableFamily):
    """Small causal transformers on generated languages, everything varied per task.

    Args:
        seed (int, optional): distinguishes task streams. (default: 0)
        device (str or torch.device, optional): device of the tasks. (default: "cpu")
        augment (bool, optional): augment training tasks as :class:`AugmentedFamily` does, with
            the two limits below; held-out tasks are never augmented. (default: True)
        max_param_scale (float, optional): limit of the per-tensor scales. (default: 10.0)
        max_loss_scale (float, optional): limit of the loss scale. (default: 10.0)
    """

    name = "text-lm"

    def make(self, seed: int) -> TextLMTask:
        return TextLMTask(seed, self.device)
