"""Applications built on the library, each a function with plain keyword arguments.

The ``compiledopt`` commands (:mod:`compiledopt.cli`) parse their arguments, call one of these
and print; a program calls them the same way. Each raises ``ValueError`` (or ``TypeError``)
naming a bad value before any long work.

* :mod:`compiledopt.apps.pipeline`: the demo pipeline, meta-train -> export -> verify ->
  fine-tune (``compiledopt demo``);
* :mod:`compiledopt.apps.finetune`: fine-tuning a pre-trained MLP with a frozen learned optimizer
  against AdamW (``compiledopt finetune``);
* :mod:`compiledopt.apps.meta_descent`: a learned optimizer meta-trained online against SGD
  (``compiledopt meta-descent``);
* :mod:`compiledopt.apps.train`: meta-training a family with truncated back-propagation, PES or
  ES, resuming, evaluating and exporting (``compiledopt train``; its settings in
  :mod:`compiledopt.apps.train_settings`, read from a ``--config`` file by
  :mod:`compiledopt.apps.config`);
* :mod:`compiledopt.apps.export`: a checkpoint -> an artifact (``compiledopt export``, and
  ``compiledopt train --export``);
* :mod:`compiledopt.apps.inspect`: an artifact's manifest summarised, the packaged optimizers
  listed (``compiledopt inspect``);
* :mod:`compiledopt.apps.verify`: every backend of an artifact against the eager reference
  (``compiledopt verify``);
* :mod:`compiledopt.apps.bench`: an artifact's step timed per backend against AdamW, printed
  and written as JSON and a chart (``compiledopt bench``);
* :mod:`compiledopt.apps.trust`: opening an artifact with the trust given, checking, making and
  signing with keys (``compiledopt keygen``, ``compiledopt sign``);
* the helpers they share: :mod:`compiledopt.apps.requirements` (optional packages, checked
  first), :mod:`compiledopt.apps.paths` (the output root and the checks on a path),
  :mod:`compiledopt.apps.backends` (which FrozenOptimizer backends run on an artifact),
  :mod:`compiledopt.apps.errors` (which errors are the user's, reported in one line) and
  :mod:`compiledopt.apps.text` (an artifact's strings escaped for a terminal).

The package imports nothing heavy at import time: each module imports torch inside its functions.
"""
