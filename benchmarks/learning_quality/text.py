"""Local texts for the language-model tasks, read from the Python installation (nothing is
downloaded), and the windows a character-level LM trains and is validated on.

Corpora (:data:`CORPORA`), each the same text for a given Python version:

* ``stdlib-a``: the source of ``argparse``, ``difflib``, ``textwrap``, ``inspect``, ``ast``,
  ``dataclasses`` (about 450k characters on CPython 3.11), the text of ``gpt-lm``;
* ``stdlib-b``: the source of ``typing``, ``enum``, ``functools``, ``pathlib``, ``logging``,
  ``configparser`` (about 420k), the text of ``gpt-lm-rms``;
* ``stdlib-c``: the source of ``tarfile``, ``subprocess``, ``shutil``, ``collections`` (about
  300k), the pre-training text of ``lm-finetune``;
* ``pydoc-topics``: the English help pages of the interpreter's ``help()`` (the values of
  ``pydoc_data.topics.topics`` in key order, about 460k characters), the fine-tuning text of
  ``lm-finetune``.

A module's source is the file ``importlib.util.find_spec(name).origin`` names. Characters map to
the alphabet of :mod:`~benchmarks.learning_quality.charlm` (newline and printable ASCII, one
"unknown" token for the rest). The first 90% of a corpus is its training span and the last 10%
its validation span (:class:`Windows`): no training window reaches past the cut and every
validation window starts after it, so the two share no character.
"""

import functools
import importlib
import importlib.util
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from benchmarks.learning_quality.base import Batch
from benchmarks.learning_quality.charlm import ALPHABET, VOCAB

TRAIN_FRACTION = 0.9
#: Corpus name -> the standard-library modules whose source it joins (``pydoc-topics``: none).
CORPORA: Dict[str, Tuple[str, ...]] = {
    "stdlib-a": ("argparse", "difflib", "textwrap", "inspect", "ast", "dataclasses"),
    "stdlib-b": ("typing", "enum", "functools", "pathlib", "logging", "configparser"),
    "stdlib-c": ("tarfile", "subprocess", "shutil", "collections"),
    "pydoc-topics": (),
}


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    origin = spec.origin if spec is not None else None
    if not origin or not origin.endswith(".py"):
        raise RuntimeError(f"the LM tasks need the source of the stdlib module {name!r}")
    with open(origin, encoding="utf-8") as handle:
        return handle.read()


@functools.cache
def corpus(name: str) -> str:
    """The text of corpus ``name`` (:data:`CORPORA`)."""
    if name not in CORPORA:
        raise ValueError(f"Unknown corpus: {name!r} (one of {', '.join(CORPORA)})")
    if name == "pydoc-topics":
        try:
            topics = importlib.import_module("pydoc_data.topics").topics
        except ImportError as error:
            raise RuntimeError("the corpus pydoc-topics needs the stdlib's pydoc_data") from error
        return "\n\n".join(topics[key] for key in sorted(topics))
    return "\n".join(_module_source(module) for module in CORPORA[name])


@functools.cache
def encoded(name: str) -> Tensor:
    """Corpus ``name`` as token ids (int64) of the char-lm alphabet."""
    index = {c: i for i, c in enumerate(ALPHABET)}
    return torch.tensor([index.get(c, VOCAB - 1) for c in corpus(name)], dtype=torch.int64)


def spans(name: str) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """``(start, end)`` of the training and the validation span of corpus ``name``."""
    total = int(encoded(name).shape[0])
    cut = int(TRAIN_FRACTION * total)
    return (0, cut), (cut, total)


class Windows:
    """Windows of ``context + 1`` characters of one corpus: inputs and next-character targets.

    Args:
        name: the corpus.
        context: characters a window feeds the model.
    """

    def __init__(self, name: str, context: int) -> None:
        self.name = name
        self.context = int(context)

    def cut(self, starts: Tensor) -> Batch:
        """The windows starting at ``starts``: inputs (N, context) and targets, the same
        shifted by one character."""
        offsets = torch.arange(self.context + 1)
        windows = encoded(self.name)[starts[:, None] + offsets]
        return windows[:, :-1], windows[:, 1:]

    def train_starts(self, size: int, generator: torch.Generator) -> Tensor:
        """``size`` random first positions of windows inside the training span."""
        (begin, end), _ = spans(self.name)
        last = end - (self.context + 1)
        return torch.randint(begin, last + 1, (size,), generator=generator)

    def validation_starts(self, size: int) -> Tensor:
        """``size`` first positions evenly spaced over the validation span."""
        _, (begin, end) = spans(self.name)
        last = end - (self.context + 1)
        stride = max(1, (last - begin) // size)
        return torch.arange(begin, last + 1, stride)[:size]


def describe(name: str) -> Dict[str, object]:
    """The corpus's size and sources, for the report."""
    (_, cut), (_, end) = spans(name)
    modules: List[str] = list(CORPORA[name]) or ["pydoc_data.topics"]
    return {"corpus": name, "sources": modules, "characters": end, "train_characters": cut}
