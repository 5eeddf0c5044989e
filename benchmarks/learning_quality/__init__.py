"""Learning quality of a learned optimizer on held-out tasks.

``python -m benchmarks.learning_quality --optimizer PATH``:
The learned optimizer under test (an artifact folder, ``--optimizer``) trains eight tasks that no
meta-training family contains (:mod:`~benchmarks.learning_quality.tasks`: a CNN on 16×16 shapes,
a character-level transformer on Python's own source, an MLP ten times wider than meta-training's,
Fourier-series regression, ill-conditioned logistic regression, the demo's fine-tuning job, a
6-hidden-layer MLP with LayerNorm, and 3,000 steps of the regression task), next to AdamW, SGD with
momentum and the repository's earlier ``export/coordinate-mlp`` artifact, each swept over learning
rates (:mod:`~benchmarks.learning_quality.optimizers`), all under one warm-up + cosine schedule.
``--suite transformers`` runs five transformer-scale tasks instead
(:mod:`~benchmarks.learning_quality.transformer_tasks`, :mod:`~benchmarks.learning_quality.
hf_trainer`): two GPT-style character LMs of 1.09M and 0.35M parameters, the first again through
Hugging Face's ``Trainer``, a ViT, and a language model pre-trained by the benchmark and fine-tuned
on another text.

Reported (:mod:`~benchmarks.learning_quality.analysis`, :mod:`~benchmarks.learning_quality.
metrics`): final validation losses untuned and tuned, the learned optimizer's final loss over tuned
AdamW's, its speed-up in steps to tuned AdamW's final loss, divergence, and the Celo papers'
aggregates (IQM and geometric mean over tasks × seeds; fractions of tasks won), plus a stress check
(loss ×1e6, gradients of 1e38: parameters must stay finite). Outputs (:mod:`~benchmarks.
learning_quality.report`, :mod:`~benchmarks.learning_quality.plots`): ``PREFIX.json``,
``PREFIX.md``, ``PREFIX_curves.png``, ``PREFIX_normalized.png``. Run from the repository root::

    python -m benchmarks.learning_quality --optimizer PATH --estimate-only  # plan + time estimate
    python -m benchmarks.learning_quality --optimizer PATH    # ~10 min on 2 idle cores, 2 seeds
    python -m benchmarks.learning_quality --optimizer PATH --quick   # ~1 min: a smoke test

``--lrs KIND=LR[,LR...]`` narrows a kind's sweep (its untuned baselines kept); ``--journal PATH``
keeps each finished run in a JSON Lines file, and a rerun takes the runs recorded there
(:mod:`~benchmarks.learning_quality.journal`): a long suite in pieces.

Modules: ``base`` (the task interface), ``tasks``, ``charlm``, ``text``, ``transformer_tasks`` and
``hf_trainer`` (the tasks), ``optimizers`` (kinds, sweeps, schedule), ``run`` (one run, the stress
check, timing), ``metrics`` (pure functions), ``analysis`` (summaries, aggregates, lr spread,
costs), ``options``, ``runner``, ``journal`` (the runs kept for a rerun), ``report``, ``plots``.
"""
