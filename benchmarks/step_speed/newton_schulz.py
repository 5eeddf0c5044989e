"""What Newton–Schulz costs in a model's step: the harness's orthogonalisation of every matrix of
a model (ranks ≥ 2 viewed as ``(shape[0], rest)``), as the package computes it (a long matrix ends
on the Gram matrix of its short side) and as five plain quintic steps on ``X``, against fused
AdamW's whole step on the same parameters. Both forms and AdamW are timed interleaved in one
process, medians of ``--reps`` rounds, on one thread and on all cores.

    python -m benchmarks.step_speed.newton_schulz --models resnet18 gpt2-tiny transformer-mlp

Writes ``newton_schulz.json`` and ``newton_schulz.png`` to ``--out`` (default
``benchmarks/results/newton_schulz``).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.step_speed.models import gpt2_tiny_shapes, resnet18_shapes
from benchmarks.step_speed.runner import machine_info
from compiledopt.learned.normalized_ops import (
    NS_STEPS,
    newton_schulz,
    ns_cols,
    ns_rows,
    unit_frobenius,
)

MODELS: Dict[str, Callable[[], List]] = {
    "resnet18": resnet18_shapes,
    "gpt2-tiny": gpt2_tiny_shapes,
    # One transformer block of width 1,024 (attention and a 4x MLP): square and 4:1 matrices.
    "transformer-mlp": lambda: [
        ("attn.qkv", (3072, 1024)),
        ("attn.out", (1024, 1024)),
        ("mlp.up", (4096, 1024)),
        ("mlp.down", (1024, 4096)),
    ],
}


def plain(matrix: torch.Tensor) -> torch.Tensor:
    """Five quintic steps on ``X`` (the Gram matrix of the short side each step)."""
    x = unit_frobenius(matrix)
    return ns_cols(x, NS_STEPS) if x.shape[0] > x.shape[1] else ns_rows(x, NS_STEPS)


def _ms(fn: Callable[[], object]) -> float:
    """One call of ``fn``, in milliseconds."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure(model: str, threads: int, reps: int) -> Dict[str, object]:
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    shapes = [s for _, s in MODELS[model]()]
    matrices = [
        torch.randn(s[0], math.prod(s[1:]), generator=generator) for s in shapes if len(s) >= 2
    ]
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    adamw = torch.optim.AdamW(params, lr=1e-3, fused=True)

    def run(form: Callable) -> Callable[[], None]:
        return lambda: [form(m) for m in matrices]

    forms = {"package": run(newton_schulz), "plain": run(plain), "adamw_fused": adamw.step}
    flops = {}
    for name in ("package", "plain"):
        with FlopCounterMode(display=False) as counter:
            forms[name]()
        flops[name] = counter.get_total_flops()
    for fn in forms.values():  # warm-up
        fn()
    times: Dict[str, List[float]] = {name: [] for name in forms}
    for _ in range(reps):  # interleaved: a slow minute of the machine hits every form alike
        for name, fn in forms.items():
            times[name].append(_ms(fn))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "model": model,
        "threads": threads,
        "matrices": len(matrices),
        "params": sum(p.numel() for p in params),
        "gflop": {k: v / 1e9 for k, v in flops.items()},
        "median_ms": medians,
        "package_over_plain": medians["package"] / medians["plain"],
        "package_over_adamw_fused": medians["package"] / medians["adamw_fused"],
        "plain_over_adamw_fused": medians["plain"] / medians["adamw_fused"],
    }


def _plot(rows: List[Dict[str, object]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['threads']} thr" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4))
    ax.bar([i - 0.2 for i in x], [r["plain_over_adamw_fused"] for r in rows], 0.4, label="plain")
    ax.bar(
        [i + 0.2 for i in x], [r["package_over_adamw_fused"] for r in rows], 0.4, label="package"
    )
    ax.set_xticks(list(x), labels)
    ax.set_yscale("log")
    ax.set_ylabel("Newton–Schulz time / fused AdamW step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", default="1,all", help="comma-separated: integers or all")
    parser.add_argument("--out", default="benchmarks/results/newton_schulz")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    counts = []
    for item in args.threads.split(","):
        if item == "all":
            counts.append(os.cpu_count() or 1)
        elif item.isdigit() and int(item) > 0:
            counts.append(int(item))
        else:
            parser.error(f"invalid thread count {item!r} (a positive integer or all)")
    rows = []
    for threads in counts:
        for model in args.models:
            row = measure(model, threads, args.reps)
            rows.append(row)
            print(
                f"{model:16s} {threads} thr: package {row['median_ms']['package']:.1f} ms, "
                f"plain {row['median_ms']['plain']:.1f} ms ({row['package_over_plain']:.2f}x), "
                f"fused AdamW {row['median_ms']['adamw_fused']:.2f} ms; GFLOP "
                f"{row['gflop']['package']:.2f} vs {row['gflop']['plain']:.2f}",
                flush=True,
            )
    os.makedirs(args.out, exist_ok=True)
    doc = {
        "command": "python -m benchmarks.step_speed.newton_schulz "
        + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
    }
    with open(os.path.join(args.out, "newton_schulz.json"), "w", encoding="utf-8") as handle:
        json.dump(doc, handle, indent=2)
    _plot(rows, os.path.join(args.out, "newton_schulz.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
