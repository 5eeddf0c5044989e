"""The task interface of the suite: :class:`Task`, and the helpers every task uses."""

import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = Tuple[Tensor, Tensor]

#: Random streams: training batch ``k`` uses stream ``k``; these are the others.
VALIDATION_STREAM = -1
INIT_STREAM = -2
DATA_STREAM = -3


class Task:
    """One optimisation problem of the suite, determined by ``seed``.

    Subclasses set the class attributes and implement :meth:`build_model`, :meth:`batch`,
    :meth:`validation` and (unless cross-entropy) :meth:`loss`.

    Args:
        seed: picks the data, the initial weights and every minibatch.
        steps: how many steps a run takes (tasks that precompute their batches need it).
    """

    name = "task"
    summary = ""
    #: Steps of a run at full size, and with ``--quick``.
    default_steps = 300
    quick_steps = 12
    batch_size = 64
    validation_size = 1024
    #: Import names the task needs beyond torch (checked before a run).
    needs: Tuple[str, ...] = ()
    #: The fewest seeds of a full run (``--seeds`` not given): more than the suite's default
    #: for tasks whose runs vary more between seeds.
    min_seeds = 1
    #: The named group of tasks (``--suite``) the task belongs to.
    suite = "classic"
    #: Whether the task trains through its own loop (:meth:`fit`) instead of the suite's.
    custom_loop = False

    def __init__(self, seed: int, steps: int) -> None:
        self.seed = int(seed)
        self.steps = int(steps)
        self._held: Optional[Batch] = None

    def stream_seed(self, stream: int) -> int:
        """The seed of random stream ``stream``: a function of the task's name, its seed and
        ``stream`` alone."""
        salt = zlib.crc32(self.name.encode())
        return ((salt * 1_000_003 + self.seed) * 1_000_033 + stream) % 2**63

    def generator(self, stream: int) -> torch.Generator:
        """A generator for random stream ``stream`` (:meth:`stream_seed`)."""
        return torch.Generator().manual_seed(self.stream_seed(stream))

    def model(self) -> nn.Module:
        """The model at its initial weights (the same on every call; the global RNG is left as
        it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.stream_seed(INIT_STREAM))
            return self.build_model()

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def sample(self, stream: int, size: int) -> Batch:
        """``size`` generated examples from random stream ``stream`` (generated tasks)."""
        raise NotImplementedError

    def batch(self, step: int) -> Batch:
        """The training minibatch of ``step``."""
        return self.sample(step, self.batch_size)

    def validation(self) -> Batch:
        """The held-out set the validation loss is measured on (generated once)."""
        if self._held is None:
            self._held = self.sample(VALIDATION_STREAM, self.validation_size)
        return self._held

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)

    def preparation_steps(self) -> int:
        """Training steps :meth:`prepare` takes (for the time estimate; 0: none)."""
        return 0

    def timing_model(self) -> nn.Module:
        """A model that costs what :meth:`model`'s does, without :meth:`prepare`'s work (the
        time estimate runs before any preparation)."""
        return self.model()

    def prepare(self) -> None:
        """One-off work a run needs before its model exists (pre-training), done once so that no
        run is timed with it; a no-op unless the task has such work."""

    def fit(self, model: nn.Module, optimizer: Any, scheduler: Any, recorder: Any) -> None:
        """Train ``model`` for ``self.steps`` steps through the task's own loop (tasks with
        :attr:`custom_loop`), reporting to ``recorder`` (a :class:`~benchmarks.learning_quality.
        run.Recorder`) as the suite's loop does."""
        raise NotImplementedError

    def describe(self) -> Dict[str, object]:
        """Sizes, for the report."""
        model = self.model()
        held = self.validation()
        return {
            "summary": self.summary,
            "params": sum(p.numel() for p in model.parameters()),
            "tensors": len(list(model.parameters())),
            "batch_size": self.batch_size,
            "validation_size": int(held[1].shape[0]),
            "steps": self.steps,
        }


def mlp(widths: List[int], activation: Callable[[], nn.Module]) -> nn.Sequential:
    """Linear layers of the given widths with ``activation`` between them."""
    layers: List[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)
