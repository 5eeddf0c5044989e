"""Step-speed benchmark of frozen learned optimizers: ``python -m benchmarks.step_speed``.

For models of growing size (an MLP of 0.1M parameters, a conv net of 1.1M, a transformer block of
4.2M, an MLP stack of 16.8M, and a ResNet-18-shaped parameter list of 11.7M for compile time),
every learned transform family is exported as an artifact and applied with
:class:`~compiledopt.FrozenOptimizer` on each backend; one optimizer step (gradients set once,
``optimizer.step()`` repeated) is timed as the median of repeated runs after warm-up, next to
``torch.optim.AdamW`` (foreach and fused) on the same parameters.

Families (:mod:`~benchmarks.step_speed.plan`): every learned family of the catalog
(``coordinate-mlp``, ``coordinate-lstm`` with ``hidden_size=20``, ``learned-step-size``,
``hypergradient``, ``idbd``: shape-agnostic artifacts, exported graphs per rank, compiled graphs
with dynamic sizes), and ``kronecker`` (``KroneckerLinear``, ``psd=True``) and ``metacurvature``
(bound artifacts: one whole-model graph). Backends: ``eager`` — the reference: the transforms'
own ``update`` in a Python loop over parameters (for Kronecker that recomputes ``LᵀL``/``RᵀR`` on
every call, as learn2learn does) — then ``compiled`` (``torch.compile`` of the frozen rule),
``compiled-bf16`` (the same with bfloat16 state) and the export backends (``torchscript``,
``onnx`` on onnxruntime, ``aoti``: AOTInductor, built only where affordable, ``--aoti``).

Roofline (:mod:`~benchmarks.step_speed.roofline`): the peak FLOP/s (a large fp32 matmul) and
bandwidth (the faster of a large copy, read + write bytes, and a large in-place ``a += b``,
two reads and a write) are measured in the same run; each rule's FLOPs and
bytes come from its own cost model; the *floor* of a step is ``max(flops / peak, bytes /
bandwidth)`` and the *achieved fraction* is ``floor / measured``.

Also recorded per configuration: the first step (compile or graph load included), the export
time of the backend's graph, the number of Dynamo graphs and recompiles, the peak resident-memory
increase, and the optimizer-state bytes per parameter. Outputs under ``--out`` (default
``benchmarks/results``): ``step_speed.json``, ``step_speed.md``, ``step_speed.png`` (step time vs
parameter count per backend, log-log) and ``roofline.png``. Needs ``compiledopt[bench]``
(matplotlib). Run from the repository root::

    python -m benchmarks.step_speed            # full run (~40 min on 2 cores; compiles dominate)
    python -m benchmarks.step_speed --quick    # ~1 min with a warm Inductor cache; structure only

The production targets (the packaged default optimizer on a real ResNet-18 against AdamW and the
model's forward+backward, many small tensors, peak memory, the GPU when there is one; 1 thread
and all cores) are a separate run: ``python -m benchmarks.step_speed.targets`` (modules
``targets``, ``targets_runs``, ``targets_report``).

Modules: ``models`` (the parameter lists), ``plan`` (families, backends, configurations, cuts),
``options`` (the command line), ``measure`` (timing, peak memory, the profiler, child
processes), ``roofline`` (costs and floors), ``runs`` (what each configuration does), ``runner``
(the run), ``report`` (targets, markdown, JSON) and ``plots``.
"""
