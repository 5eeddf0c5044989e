"""The plots: ``step_speed.png`` (step time against parameters per backend, a panel per family)
and ``roofline.png`` (achieved FLOP/s under the measured roofs; achieved % of the floor)."""

import math
from pathlib import Path
from typing import Any, Dict

from benchmarks.step_speed.plan import BACKENDS, FAMILIES
from benchmarks.step_speed.report import loads_text
from compiledopt.bench import ADAMW

#: A marker per backend (any other backend gets "x").
MARKERS = {
    "eager": "o",
    "compiled": "s",
    "compiled-bf16": "P",
    "torchscript": "^",
    "onnx": "D",
    "aoti": "v",
}


def plot(doc: Dict[str, Any], out: Path) -> None:
    """``step_speed.png`` (step time vs parameters per backend, a panel per family, AdamW for
    reference; log-log) and ``roofline.png`` (achieved GFLOP/s vs arithmetic intensity under the
    measured roofs, and achieved % of the floor vs parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if r.get("step_ms") and r["model"] != "resnet18"]
    families = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    colors = {b: f"C{i}" for i, b in enumerate(BACKENDS)}
    markers = {b: MARKERS.get(b, "x") for b in BACKENDS}
    cols = min(3, max(1, len(families)))
    nrows = math.ceil(len(families) / cols) if families else 1
    fig, axes = plt.subplots(
        nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False, sharex=True
    )
    for ax, family in zip(axes.flat, families):
        for backend in BACKENDS:
            pts = sorted(
                (r["params"], r["step_ms"])
                for r in rows
                if r["family"] == family and r["backend"] == backend
            )
            if pts:
                ax.plot(*zip(*pts), marker=markers[backend], color=colors[backend], label=backend)
        for variant, style in zip(ADAMW, (":x", "--+")):
            pts = sorted(
                (r["params"], r["step_ms"]) for r in rows if r["family"] == f"adamw-{variant}"
            )
            if pts:
                ax.plot(*zip(*pts), style, color="k", label=f"AdamW {variant}")
        ax.set(xscale="log", yscale="log", title=family, xlabel="parameters", ylabel="step (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(families) :]:
        ax.axis("off")
    fig.suptitle(
        f"Frozen optimizer step, median ms ({doc['machine']['cpu']}, "
        f"{doc['machine']['torch_threads']} threads, "
        f"load {loads_text(doc['machine']['load_average_start'][:1])})"
    )
    fig.tight_layout()
    fig.savefig(out / "step_speed.png", dpi=110)
    plt.close(fig)

    c = doc["ceilings"]
    peak, bw = c["peak_flops"], c["bandwidth_bytes_per_s"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    intensities = [r["arithmetic_intensity"] for r in rows if r.get("arithmetic_intensity")]
    lo = min([0.05, *intensities]) / 2
    hi = max([100.0, *intensities]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    left.plot(xs, [min(peak, x * bw) / 1e9 for x in xs], "k-", lw=2, label="roof (measured)")
    fam_colors = {f: f"C{i}" for i, f in enumerate([*FAMILIES, "adamw-foreach", "adamw-fused"])}
    for r in rows:
        if not r.get("arithmetic_intensity") or r["backend"] not in ("compiled", "torch.optim"):
            continue
        if r["family"] == "adamw-foreach":
            continue
        left.scatter(
            r["arithmetic_intensity"],
            r["achieved_flops"] / 1e9,
            color=fam_colors[r["family"]],
            s=15 + 25 * math.log10(r["params"] / 1e4),
            alpha=0.8,
        )
    for family, color in fam_colors.items():
        if any(r["family"] == family for r in rows) and family != "adamw-foreach":
            left.scatter([], [], color=color, label=family)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="arithmetic intensity (FLOP / byte, ideal fused step)",
        ylabel="achieved GFLOP/s",
        title="Roofline: compiled backend (marker size ~ parameters) and AdamW fused",
    )
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    for family in families:
        pts = sorted(
            (r["params"], 100 * r["achieved_fraction"])
            for r in rows
            if r["family"] == family and r["backend"] == "compiled"
        )
        if pts:
            right.plot(*zip(*pts), marker="s", color=fam_colors[family], label=family)
    pts = sorted(
        (r["params"], 100 * r["achieved_fraction"]) for r in rows if r["family"] == "adamw-fused"
    )
    if pts:
        right.plot(*zip(*pts), "--", color="k", label="AdamW fused")
    right.axhline(50, color="r", lw=0.8, ls=":", label="50% target")
    right.set(
        xscale="log",
        yscale="log",
        xlabel="parameters",
        ylabel="achieved % of the roofline floor",
        title="Achieved fraction of the floor, compiled backend",
    )
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(
        f"peak {peak / 1e9:.0f} GFLOP/s ({c['matmul_n']}³ matmul), bandwidth {bw / 1e9:.1f} GB/s "
        "(copy), measured in this run"
    )
    fig.tight_layout()
    fig.savefig(out / "roofline.png", dpi=110)
    plt.close(fig)
