"""The production-targets report: ratios, targets met or missed, roofline, markdown and plot.

:func:`derive` adds to the document of :func:`benchmarks.step_speed.targets.main`, per thread
count, each backend's ratios (``runs[i]["ratios"][backend]``, AdamW foreach's own where the ratio
means something for it under ``runs[i]["ratios"]["adamw-foreach"]``) and roofline rows, the memory
ratios, the GPU ratios and ``targets`` (judged at the largest thread count); :func:`write` writes
``targets.json``, ``targets.md`` and ``targets.png``.
"""

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from benchmarks.step_speed.measure import json_default
from benchmarks.step_speed.models import gpt2_tiny_shapes
from benchmarks.step_speed.report import loads_text
from benchmarks.step_speed.targets_runs import memory_label

#: CPU ratios per thread count and backend: key, label (formatted with the settings), target (an
#: upper limit, except for the ratios of :data:`AT_LEAST`).
CPU_RATIOS: Tuple[Tuple[str, str, Optional[float]], ...] = (
    ("resnet18_vs_adamw_fused", "ResNet-18: step / fused AdamW step", 8.0),
    ("resnet18_vs_adamw_foreach", "ResNet-18: step / foreach AdamW step", None),
    ("resnet18_vs_fwd_bwd", "ResNet-18: step / forward+backward {batch}", 1.0),
    ("gpt2_tiny_vs_adamw_fused", "GPT-2 tiny ({gpt2} params): step / fused AdamW step", 5.0),
    ("many_per_coordinate", "per coordinate: {many} / {few} tensors", 1.5),
    ("many_vs_adamw_foreach", "{many} tensors: step / foreach AdamW step", 2.0),
    ("mixed_per_coordinate", "per coordinate: {mixed} mixed / {few}", None),
    ("mixed_vs_adamw_foreach", "{mixed} mixed: step / foreach AdamW step", 3.0),
    ("roofline_resnet18", "ResNet-18: roofline floor / step (achieved)", 0.30),
)
#: The ratios whose target is a lower limit: the fraction of the roofline a step achieves.
AT_LEAST = frozenset({"roofline_resnet18"})
MEMORY_TARGET = 2.0
#: A step at 10M+ parameters on the GPU (ResNet-18, the large case) / fused AdamW's step.
GPU_TARGET = 2.0


def is_met(key: str, value: float, limit: float) -> bool:
    """Whether ``value`` of the ratio ``key`` meets its target ``limit`` (see :data:`AT_LEAST`)."""
    return value >= limit if key in AT_LEAST else value <= limit


def target_text(key: str, limit: Optional[float]) -> str:
    """The target column: ``≤ 8×``, or ``≥ 30%`` for a ratio of :data:`AT_LEAST`."""
    if limit is None:
        return "–"
    return f"≥ {100 * limit:g}%" if key in AT_LEAST else f"≤ {limit:g}×"


def _ms(row: Optional[Dict[str, Any]]) -> Optional[float]:
    return row.get("step_ms") if row and row.get("status", "ok") == "ok" else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def case_info(s: Dict[str, Any]) -> Dict[str, Any]:
    """What each case is: parameters, tensors, ranks."""
    from benchmarks.step_speed.targets_runs import CASES, case_shapes

    info = {}
    for case in CASES:
        shapes = [shape for _, shape in case_shapes(case, s)]
        info[case] = {
            "params": sum(math.prod(shape) for shape in shapes),
            "tensors": len(shapes),
            "ranks": sorted({len(shape) for shape in shapes}),
            "largest_tensor": max(math.prod(shape) for shape in shapes),
        }
    info["resnet18"]["batch"] = s["batch"]
    info["resnet18"]["width"] = s["resnet_width"]
    info["memory"] = {"params": s["memory_numel"], "tensors": 1, "shape": memory_label(s)}
    return info


def _labels(s: Dict[str, Any]) -> Dict[str, str]:
    many, few, mixed = s["many"], s["few"], s["mixed"]
    values = {
        "batch": "×".join(map(str, s["batch"])),
        "many": f"{many[0]:,}×{many[1]:,}",
        "few": f"{few[0]:,}×{few[1]:,}",
        "mixed": f"{mixed[0]:,}",
        "gpt2": f"{sum(math.prod(shape) for _, shape in gpt2_tiny_shapes()):,}",
    }
    return {key: label.format(**values) for key, label, _ in CPU_RATIOS}


def _frozen_ratios(run: Dict[str, Any], case: Dict[str, Any], info: Dict[str, Any]) -> Dict:
    base = run["baseline"]
    adamw = base.get("adamw", {})
    fused = {c: _ms(adamw.get(c, {}).get("fused")) for c in info}
    foreach = {c: _ms(adamw.get(c, {}).get("foreach")) for c in info}
    t = {c: _ms(case.get(c)) for c in info}

    def per_coordinate(small: str) -> Optional[float]:
        a, b = t.get(small), t.get("few")
        if a is None or b is None:
            return None
        return _ratio(a / info[small]["params"], b / info["few"]["params"])

    return {
        "resnet18_vs_adamw_fused": _ratio(t["resnet18"], fused["resnet18"]),
        "resnet18_vs_adamw_foreach": _ratio(t["resnet18"], foreach["resnet18"]),
        "resnet18_vs_fwd_bwd": _ratio(t["resnet18"], _ms(base.get("fwd_bwd"))),
        "gpt2_tiny_vs_adamw_fused": _ratio(t.get("gpt2-tiny"), fused.get("gpt2-tiny")),
        "many_per_coordinate": per_coordinate("many"),
        "many_vs_adamw_foreach": _ratio(t["many"], foreach["many"]),
        "mixed_per_coordinate": per_coordinate("mixed"),
        "mixed_vs_adamw_foreach": _ratio(t["mixed"], foreach["mixed"]),
    }


def _roofline(doc: Dict[str, Any], run: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Floor and achieved fraction of every timed step (:func:`roofline.add_cost`)."""
    from benchmarks.step_speed.roofline import add_cost
    from benchmarks.step_speed.targets_runs import CASES, case_shapes
    from compiledopt.bench import Ceilings

    if "ceilings" not in run["baseline"]:
        return []
    ceilings = Ceilings(**run["baseline"]["ceilings"])
    # Each absent from older results (the AdamW one from more recent ones only).
    by_case = run["baseline"].get("bandwidth_by_case", {})
    adamw_by_case = run["baseline"].get("adamw_bandwidth_by_case", by_case)
    # The frozen rows' cost is the artifact's own (its spec and kwargs), not a catalog default.
    spec = doc["optimizer"]["spec"]
    family = spec.get("name", spec["kind"])
    rows = []
    for case in CASES:
        shapes = [shape for _, shape in case_shapes(case, doc["settings"])]
        timed = [
            (f"adamw-{v}", "adamw", None, r)
            for v, r in run["baseline"].get("adamw", {}).get(case, {}).items()
        ]
        for backend, result in run["frozen"].items():
            timed.append((backend, family, spec, result.get("cases", {}).get(case)))
        for name, rule, rule_spec, result in timed:
            if not _ms(result):
                continue
            row = {
                "case": case,
                "optimizer": name,
                "backend": result.get("resolved_backend") or name,
                "params": doc["cases"][case]["params"],
                "step_ms": result["step_ms"],
                "state_bytes": result["state_bytes"],
            }
            bandwidth = (adamw_by_case if rule == "adamw" else by_case).get(case)
            roofs = replace(ceilings, bandwidth_bytes_per_s=bandwidth) if bandwidth else ceilings
            row["bandwidth_bytes_per_s"] = roofs.bandwidth_bytes_per_s
            add_cost(row, rule, shapes, roofs, rule_spec)
            rows.append(row)
    return rows


def derive(doc: Dict[str, Any]) -> None:
    """Add the ratios, the roofline rows and the targets to ``doc``."""
    from benchmarks.step_speed.targets_runs import CASES

    info = {c: doc["cases"][c] for c in CASES if c in doc["cases"]}
    for run in doc["runs"]:
        ratios = {}
        for backend, result in run["frozen"].items():
            ratios[backend] = _frozen_ratios(run, result.get("cases", {}), info)
        foreach = {c: r.get("foreach") for c, r in run["baseline"].get("adamw", {}).items()}
        ratios["adamw-foreach"] = _frozen_ratios(run, foreach, info) if foreach else {}
        run["roofline"] = _roofline(doc, run)
        for row in run["roofline"]:
            if row["case"] == "resnet18" and row["optimizer"] in ratios:
                ratios[row["optimizer"]]["roofline_resnet18"] = row.get("achieved_fraction")
        run["ratios"] = ratios
    for row in doc["memory"]["rows"].values():
        if row.get("status") == "ok":
            # Held between steps + the rise within one; results from before ``held_bytes`` was
            # measured have the rise alone.
            peak = row.get("peak_beyond_state_bytes")
            peak = row["peak_step_bytes"] if peak is None else peak
            row["peak_over_state"] = _ratio(peak, row["state_bytes"])
    gpu = doc["gpu"]
    if gpu.get("status") == "ok":
        fwd_bwd = _ms(gpu["fwd_bwd"])
        for case, data in gpu["cases"].items():
            fused, foreach = (_ms(data["rows"].get(f"adamw-{v}")) for v in ("fused", "foreach"))
            data["ratios"] = {
                name: {
                    "vs_adamw_fused": _ratio(_ms(row), fused),
                    "vs_adamw_foreach": _ratio(_ms(row), foreach),
                    "vs_fwd_bwd": _ratio(_ms(row), fwd_bwd) if case == "resnet18" else None,
                }
                for name, row in data["rows"].items()
            }
    doc["targets"] = targets(doc)


def targets(doc: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each target per backend: the measured ratio, the limit and whether it is met (``None``:
    not measured). CPU ones at the largest thread count run."""
    backends = doc["settings"]["backends"]
    labels = _labels(doc["settings"])
    result = []
    top = max(doc["runs"], key=lambda run: run["threads"]) if doc["runs"] else None

    def add(name: str, what: str, limit: float, backend: str, threads: Any, value: Any) -> None:
        met = None if value is None else is_met(name, value, limit)
        result.append(
            {
                "name": name,
                "what": what,
                "limit": limit,
                "at_least": name in AT_LEAST,
                "backend": backend,
                "threads": threads,
                "measured": value,
                "met": met,
            }
        )

    for key, _, limit in CPU_RATIOS:
        if limit is None or top is None:
            continue
        for backend in backends:
            value = top["ratios"].get(backend, {}).get(key)
            add(key, labels[key], limit, backend, top["threads"], value)
    memory = doc["memory"]
    for backend in backends:
        value = memory["rows"].get(backend, {}).get("peak_over_state")
        what = f"peak memory beyond the state / state bytes ({memory_label(doc['settings'])})"
        add("memory_peak_over_state", what, MEMORY_TARGET, backend, memory["threads"], value)
    gpu = doc["gpu"]
    if gpu.get("status") == "ok":
        for case, data in gpu["cases"].items():
            for backend in [b for b in data["ratios"] if not b.startswith("adamw-")]:
                value = data["ratios"][backend]["vs_adamw_fused"]
                what = f"GPU {gpu['device']}: {case} step / fused AdamW step"
                add(f"gpu_{case}_vs_adamw_fused", what, GPU_TARGET, backend, "gpu", value)
    return result


# -- writing ----------------------------------------------------------------------------------


def write(doc: Dict[str, Any], out: Path) -> str:
    """Write ``targets.json``, ``targets.md`` and ``targets.png`` under ``out``; return the
    markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "targets.json").write_text(json.dumps(doc, indent=1, default=json_default) + "\n")
    markdown = render_markdown(doc)
    (out / "targets.md").write_text(markdown)
    plot(doc, out / "targets.png")
    return markdown


def _x(value: Optional[float]) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.3g}×"


def _mark(value: Optional[float], limit: Optional[float], key: str = "") -> str:
    text = _percent(value) if key in AT_LEAST else _x(value)
    if limit is None or value is None:
        return text
    return f"{text} {'✓' if is_met(key, value, limit) else '✗'}"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def headline(doc: Dict[str, Any]) -> List[str]:
    """The ratios: a row per ratio and thread count, a column per backend (✓/✗ against the
    target where it applies: the largest thread count), AdamW foreach's own where it has one."""
    s = doc["settings"]
    backends, labels = s["backends"], _labels(s)
    top = max(s["threads"])
    rows = []
    for key, _, limit in CPU_RATIOS:
        for run in doc["runs"]:
            judged = limit if run["threads"] == top else None
            cells = [_mark(run["ratios"].get(b, {}).get(key), judged, key) for b in backends]
            reference = run["ratios"].get("adamw-foreach", {}).get(key)
            if key in AT_LEAST:
                reference = None
            rows.append(
                [labels[key], target_text(key, limit), str(run["threads"]), *cells, _x(reference)]
            )
    memory = doc["memory"]["rows"]
    cells = [_mark(memory.get(b, {}).get("peak_over_state"), MEMORY_TARGET) for b in backends]
    reference = _x(memory.get("adamw-foreach", {}).get("peak_over_state"))
    label = f"memory: peak beyond the state / state ({memory_label(s)})"
    rows.append([label, f"≤ {MEMORY_TARGET:g}×", str(doc["memory"]["threads"]), *cells, reference])
    gpu = doc["gpu"]
    if gpu.get("status") == "ok":
        for case, data in gpu["cases"].items():
            ratios = data["ratios"]
            cells = [_mark(ratios.get(b, {}).get("vs_adamw_fused"), GPU_TARGET) for b in backends]
            reference = _x(ratios.get("adamw-foreach", {}).get("vs_adamw_fused"))
            label = f"GPU {case} ({data['params'] / 1e6:.1f}M): step / fused AdamW"
            rows.append([label, f"≤ {GPU_TARGET:g}×", "gpu", *cells, reference])
    return _table(["ratio", "target", "threads", *backends, "AdamW foreach"], rows)


def _percent(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.3g}%"


def _cell(row: Optional[Dict[str, Any]]) -> str:
    if not row:
        return "–"
    if row.get("status", "ok") != "ok":
        return row.get("status", "error")
    return f"{row['step_ms']:.3g}"


def render_markdown(doc: Dict[str, Any]) -> str:
    s, m = doc["settings"], doc["machine"]
    met = [t for t in doc["targets"] if t["met"] is not None]
    lines = [
        f"# Production targets of `{doc['optimizer']['name']}` ({doc['mode']} run)",
        "",
        f"`{doc['command']}` — {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"threads {', '.join(map(str, s['threads']))}; float32 matmul precision "
        f"{s.get('matmul_precision', 'highest')}; torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}, compiledopt {m['compiledopt']}; {m['timestamp']}; load average "
        f"{loads_text(m.get('load_average_start'))} at start, "
        f"{loads_text(m.get('load_average_end'))} at end; {doc['wall_s']:.0f} s.",
        "",
        f"Targets met: {sum(t['met'] for t in met)} of {len(met)} measured (judged at "
        f"{max(s['threads'])} thread(s); ✓ met, ✗ missed).",
        "",
        *headline(doc),
        "",
        "## Step medians (ms)",
        "",
    ]
    backends = s["backends"]
    header = ["threads", "case", "params", "tensors", "fwd+bwd", "AdamW fused", "AdamW foreach"]
    rows = []
    for run in doc["runs"]:
        base = run["baseline"]
        for case in ("resnet18", "many", "few", "mixed"):
            info = doc["cases"][case]
            adamw = base.get("adamw", {}).get(case, {})
            frozen = [_cell(run["frozen"][b].get("cases", {}).get(case)) for b in backends]
            fwd_bwd = _cell(base.get("fwd_bwd")) if case == "resnet18" else ""
            row = [str(run["threads"]), case, f"{info['params']:,}", str(info["tensors"])]
            rows.append([*row, fwd_bwd, _cell(adamw.get("fused")), _cell(adamw.get("foreach"))])
            rows[-1] += frozen
    lines += [*_table(header + backends, rows), ""]
    lines += ["## Memory: one step on one parameter", ""]
    rows = []
    for name, row in doc["memory"]["rows"].items():
        if row.get("status") != "ok":
            rows.append([name, "–", "–", row.get("reason") or row.get("status", "")])
            continue
        peak = _x(row["peak_over_state"])
        mib = [
            "–" if row.get(k) is None else f"{row[k] / 2**20:.1f}"
            for k in ("state_bytes", "held_bytes", "peak_step_bytes")
        ]
        rows.append([name, *mib, peak])
    lines += [
        "Held: resident between steps beyond the state (against the process before the optimizer",
        "existed); rise: the peak within a step above its start. Peak = held + rise.",
        "",
    ]
    header = ["optimizer", "state MiB", "held MiB", "rise MiB", "peak / state"]
    lines += [*_table(header, rows), ""]
    lines += ["## Roofline", ""]
    rows = []
    for run in doc["runs"]:
        for r in run["roofline"]:
            rows.append(
                [
                    str(run["threads"]),
                    r["case"],
                    r["optimizer"],
                    f"{r['flops_per_coordinate']:.3g}",
                    f"{r['bandwidth_bytes_per_s'] / 1e9:.3g}"
                    if "bandwidth_bytes_per_s" in r
                    else "",
                    f"{r['floor_ms']:.3g}",
                    f"{r['step_ms']:.3g}",
                    _percent(r.get("achieved_fraction")),
                ]
            )
    header = ["threads", "case", "optimizer", "FLOP/coord", "GB/s", "floor ms", "step ms"]
    lines += [
        "Floor: max(FLOPs / peak, bytes / bandwidth), the bandwidth measured on buffers of the",
        "step's own traffic in that case, the learned step's or AdamW's (where its arrays live:",
        "a small model's fit in cache).",
        "",
        *_table([*header, "achieved"], rows),
        "",
    ]
    lines += _gpu_lines(doc)
    errors = _errors(doc)
    if errors or doc["notes"]:
        lines += ["## Notes", "", *[f"- {n}" for n in doc["notes"] + errors], ""]
    return "\n".join(lines)


def _gpu_lines(doc: Dict[str, Any]) -> List[str]:
    gpu = doc["gpu"]
    lines = ["## GPU", ""]
    if gpu.get("status") != "ok":
        return [*lines, gpu.get("note") or f"error: {gpu.get('reason')}", ""]
    lines += [f"{gpu['device']}; forward+backward {_cell(gpu['fwd_bwd'])} ms.", ""]
    rows = []
    for case, data in gpu["cases"].items():
        for name, row in data["rows"].items():
            ratio = data["ratios"][name]
            rows.append([case, name, _cell(row), _x(ratio["vs_adamw_fused"])])
    return [*lines, *_table(["case", "optimizer", "step ms", "/ fused AdamW"], rows), ""]


def _errors(doc: Dict[str, Any]) -> List[str]:
    found = []
    for run in doc["runs"]:
        for name, row in [("AdamW/fwd+bwd", run["baseline"]), *run["frozen"].items()]:
            if row.get("status") != "ok":
                found.append(f"{run['threads']} threads, {name}: {row.get('reason')}")
            for case, result in row.get("cases", {}).items():
                if result.get("status") != "ok":
                    found.append(f"{run['threads']} threads, {name}, {case}: {result['reason']}")
    return found


def _positive(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def plot(doc: Dict[str, Any], path: Path) -> None:
    """Bars of each targeted ratio per backend and thread count, the target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["settings"]
    backends, labels = s["backends"], _labels(s)
    panels = [
        (k, labels[k], limit)
        for k, _, limit in CPU_RATIOS
        if limit is not None and k not in AT_LEAST
    ]
    panels.append(("memory", f"peak beyond state / state ({memory_label(s)})", MEMORY_TARGET))
    roofline = dict((k, limit) for k, _, limit in CPU_RATIOS)["roofline_resnet18"]
    panels.append(("roofline_resnet18", "ResNet-18: achieved fraction of the roofline", roofline))
    gpu = doc["gpu"]
    if gpu.get("status") == "ok":
        for case in gpu["cases"]:
            panels.append((f"gpu:{case}", f"GPU {case}: step / fused AdamW step", GPU_TARGET))
    fig, axes = plt.subplots(2, 4, figsize=(19, 8), squeeze=False)
    width = 0.8 / max(1, len(doc["runs"]))
    for ax, (key, title, limit) in zip(axes.flat, panels):
        if key == "memory":
            rows = [doc["memory"]["rows"].get(b, {}) for b in backends]
            series = [(f"{doc['memory']['threads']} thr", [r.get("peak_over_state") for r in rows])]
        elif key.startswith("gpu:"):
            ratios = gpu["cases"][key[4:]]["ratios"]
            values = [ratios.get(b, {}).get("vs_adamw_fused") for b in backends]
            series = [(gpu["device"], values)]
        else:
            series = [
                (f"{run['threads']} thr", [run["ratios"].get(b, {}).get(key) for b in backends])
                for run in doc["runs"]
            ]
        for i, (name, values) in enumerate(series):
            xs = [j + i * width for j in range(len(backends))]
            # A log axis shows positive finite ratios only; a missing or non-positive one is a gap.
            heights = [v if _positive(v) else math.nan for v in values]
            ax.bar(xs, heights, width, label=name, color=f"C{i}")
        shown = [v for _, values in series for v in values if _positive(v)]
        if limit is not None:
            ax.axhline(
                limit,
                color="k",
                linestyle="--",
                linewidth=1,
                label=f"target {target_text(key, limit)}",
            )
        ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(backends))])
        ax.set_xticklabels(backends, rotation=20)
        if shown:
            ax.set_yscale("log")
            bounds = shown + ([limit] if limit else [])
            ax.set_ylim(min(bounds) / 2, max(bounds) * 2)
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{doc['optimizer']['name']}: production targets ({doc['mode']} run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
