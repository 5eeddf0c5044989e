"""The keywords of ``torch.optim.AdamW`` that ``FrozenOptimizer`` takes so AdamW code carries
over: each is honoured with AdamW's meaning or refused with a message saying why and what to use.

=================  ==========================================================================
keyword            in ``FrozenOptimizer``
=================  ==========================================================================
``lr``             honoured: the size of an update (default: the artifact's recommended lr)
``weight_decay``   honoured: decoupled, ``p ← p − lr·wd·p`` as AdamW's
``maximize``       honoured: the rule sees the negated gradient (a per-group entry)
``foreach``        accepted, no effect: the update is always applied with foreach ops
``fused``          ``True`` asks for the ``compiled`` backend (the rule fused by Inductor);
                   ``None``/``False`` leave the choice to ``backend``
``betas``, ``eps`` refused: the learned rule's decays and epsilon are part of the artifact
``amsgrad``        ``False`` accepted; ``True`` refused (no second-moment maximum to keep)
``capturable``     ``False`` accepted; ``True`` refused (a step reads finiteness flags on the
                   host unless ``nonfinite="ignore"``; CUDA-graph capture is not supported)
``differentiable`` ``False`` accepted; ``True`` refused (use the transform's ``update``, or
                   ``compiledopt.optim.LearnableOptimizer``, for differentiable steps)
=================  ==========================================================================
"""

import logging
import os
from typing import Any, Optional, Sequence

from torch import Tensor

from compiledopt.export import Artifact
from compiledopt.pretrained import DEFAULT, open_artifact

__all__ = [
    "FOREIGN_GROUP_KEYS",
    "artifact_for",
    "backend_for_keywords",
    "check_new_group",
    "check_own_group",
]

logger = logging.getLogger("compiledopt")

#: Param-group entries that torch.optim's optimizers keep and a FrozenOptimizer never has (the
#: Adam family, SGD, RMSprop, Adagrad, Adadelta, ASGD, Rprop, LBFGS): a saved group holding one
#: was saved by another optimizer, even when it holds no state yet (before its first step).
FOREIGN_GROUP_KEYS = ("betas", "eps", "momentum", "rho", "lr_decay", "lambd", "etas", "max_iter")


def artifact_for(
    artifact: "str | os.PathLike | Artifact | None",
    trust_code: bool,
    trusted_keys: Optional[Sequence["str | os.PathLike | bytes"]],
) -> Artifact:
    """The artifact an optimizer runs: the packaged default when none is named (an INFO log line
    says so), a loaded ``Artifact`` as given (trusting its code with ``trust_code``), else the
    packaged optimizer or folder ``artifact`` names, opened and verified. A number in the
    artifact's place is refused: it is a learning rate passed positionally, as AdamW takes it."""
    if artifact is None:
        logger.info("FrozenOptimizer: no artifact named: the packaged default %r", DEFAULT)
        artifact = DEFAULT
    elif isinstance(artifact, (int, float, Tensor)) and not isinstance(artifact, bool):
        raise TypeError(
            f"Invalid artifact: {artifact!r}: the second argument is the artifact (a name or a "
            f"folder), not the learning rate; pass lr={artifact!r} by keyword"
        )
    if not isinstance(artifact, Artifact):
        return open_artifact(artifact, trust_code=trust_code, trusted_keys=trusted_keys)
    if trusted_keys is not None:
        raise ValueError(
            "trusted_keys checks an artifact's signature when it is opened: pass the artifact's "
            "path, or load it with load_artifact(path, trusted_keys=...)"
        )
    return artifact.trusting() if trust_code else artifact


def backend_for_keywords(
    backend: str,
    *,
    betas: Any = None,
    eps: Any = None,
    amsgrad: Any = False,
    foreach: Any = None,
    fused: Any = None,
    capturable: Any = False,
    differentiable: Any = False,
) -> str:
    """``backend`` after AdamW's implementation keywords (see the module doc): ``"compiled"``
    for ``fused=True`` with ``backend="auto"``; ``ValueError`` for a keyword FrozenOptimizer
    cannot honour, naming it and saying what to use instead."""
    if betas is not None:
        raise ValueError(
            f"Invalid betas: {betas!r}: FrozenOptimizer has no betas; the learned rule's "
            "decays are part of the artifact (compiledopt inspect ARTIFACT lists them); pass "
            "lr and weight_decay, or meta-train a rule with other decays"
        )
    if eps is not None:
        raise ValueError(
            f"Invalid eps: {eps!r}: FrozenOptimizer has no eps; the learned rule's epsilon is "
            "part of the artifact (compiledopt inspect ARTIFACT lists it)"
        )
    for name, value, why in (
        ("amsgrad", amsgrad, "the learned rule keeps no second-moment maximum"),
        (
            "capturable",
            capturable,
            "a step reads its finiteness flags on the host unless nonfinite='ignore', and "
            "CUDA-graph capture of a step is not supported",
        ),
        (
            "differentiable",
            differentiable,
            "the step runs under no_grad; for differentiable updates call the transform's "
            "update() or use compiledopt.optim.LearnableOptimizer",
        ),
    ):
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {name}: {value!r} (a bool)")
        if value:
            raise ValueError(f"Invalid {name}: True: {why}")
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"Invalid foreach: {foreach!r} (None or a bool)")
    return _fused_backend(backend, fused)


def _fused_backend(backend: str, fused: Optional[Any]) -> str:
    if fused is None or fused is False:
        return backend
    if fused is not True:
        raise ValueError(f"Invalid fused: {fused!r} (None or a bool)")
    if backend in ("auto", "compiled"):
        return "compiled"
    raise ValueError(
        f"Invalid fused: True with backend {backend!r}: fused=True asks for the compiled "
        "backend (the rule fused by torch.compile); pass one of them, not both"
    )


def _foreign_entry(group: Any) -> Optional[str]:
    """The first of :data:`FOREIGN_GROUP_KEYS` the param group ``group`` holds, or ``None``."""
    return next((key for key in FOREIGN_GROUP_KEYS if key in group), None)


def check_new_group(group: Any) -> None:
    """``ValueError`` naming the entry if the param group ``group`` given to a FrozenOptimizer
    holds one of :data:`FOREIGN_GROUP_KEYS`: a setting it does not have (it would be ignored,
    and its own state_dict then refused as another optimizer's)."""
    key = _foreign_entry(group)
    if key is not None:
        raise ValueError(
            f"Invalid param group entry {key!r} ({group[key]!r}): a setting of other "
            "optimizers (torch.optim.AdamW's, SGD's, ...), which a FrozenOptimizer does not "
            "have: its rule's decays and epsilon are part of the artifact"
        )


def check_own_group(saved: Any, where: str) -> None:
    """``ValueError`` naming ``where`` and the entry if the saved param group ``saved`` holds
    one of :data:`FOREIGN_GROUP_KEYS`: another optimizer's state_dict (its lr and
    hyperparameters would otherwise load silently, and its betas and eps be ignored)."""
    key = _foreign_entry(saved)
    if key is not None:
        raise ValueError(
            f"{where} has {key!r} ({saved[key]!r}), an entry of another optimizer's "
            "param groups (torch.optim.AdamW's, SGD's, ...): the state_dict was saved by "
            "another optimizer, which a FrozenOptimizer cannot continue"
        )
