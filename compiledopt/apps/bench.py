"""Timing an artifact's optimizer step per backend on a built-in model, against AdamW: what
``compiledopt bench`` runs (:func:`compiledopt.bench.benchmark`), its table printed and its
result written, as asked, as JSON and as a bar chart (which needs matplotlib, the ``bench``
extra). Everything (matplotlib, the output paths, the artifact and its backends) is checked
before the minutes of timing."""

import json
import os
from pathlib import Path
from typing import IO, Any, List, Optional, Sequence

from compiledopt.apps.backends import check_loadable
from compiledopt.apps.paths import OVERWRITE_HINT, check_output_file, write_whole
from compiledopt.apps.requirements import require
from compiledopt.apps.trust import open_trusted

__all__ = ["MODELS", "check_outputs", "plot", "run_bench"]

#: The built-in models (:func:`compiledopt.bench.example_model`).
MODELS = ("mlp", "convnet", "transformer")


def check_outputs(
    json_path: Optional[str], plot_path: Optional[str], overwrite: bool = False
) -> None:
    """Refuse, before any work, a plot without matplotlib, a plot whose file name does not end
    in an image format matplotlib writes here (``.png``, ``.svg``, ``.pdf``...: the format is
    the extension's, and without one matplotlib would add ``.png`` to the name), both outputs
    to one file, or an output file that cannot be written, or that exists unless ``overwrite``
    (named by its option, ``--json`` or ``--plot``)."""
    if plot_path:
        require("matplotlib", "bench")
        _check_plot_format(plot_path)
        if json_path and os.path.abspath(json_path) == os.path.abspath(plot_path):
            raise ValueError(f"--plot {plot_path}: the same file as --json {json_path}")
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        if path is not None:
            check_output_file(path, option, overwrite, OVERWRITE_HINT)


def _check_plot_format(path: str) -> None:
    """Refuse ``path`` unless matplotlib can write a figure in the format its extension names
    (tried on a figure of one word, in memory: a format may need Pillow, or LaTeX for text)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suffix = Path(path).suffix.lstrip(".").lower()
    figure = plt.figure()
    try:
        formats = figure.canvas.get_supported_filetypes()
        if suffix not in formats:
            given = f"ends in .{suffix}" if suffix else "has no extension"
            raise ValueError(
                f"--plot {path}: {given}; name the image format by its extension (one of "
                f"{', '.join('.' + f for f in sorted(formats))})"
            )
        figure.text(0.5, 0.5, "ms")
        try:
            figure.savefig(io.BytesIO(), format=suffix)
        except Exception as error:  # the format's own dependencies (Pillow, LaTeX)
            raise ValueError(
                f"--plot {path}: matplotlib cannot write .{suffix} here ({type(error).__name__}: "
                f"{str(error)[:200]})"
            ) from None
    finally:
        plt.close(figure)


def run_bench(
    artifact: str,
    model: str = "mlp",
    backends: Optional[Sequence[str]] = None,
    threads: Optional[List[int]] = None,
    repeats: int = 20,
    warmup: int = 3,
    json_path: Optional[str] = None,
    plot_path: Optional[str] = None,
    trust_code: bool = False,
    trusted_keys: Optional[Sequence[str]] = None,
    out: Optional[IO[str]] = None,
    overwrite: bool = False,
) -> Any:
    """Benchmark ``artifact`` (a directory or a packaged name, opened with the trust given:
    :func:`~compiledopt.apps.trust.open_trusted`) on the built-in ``model``
    (:func:`compiledopt.bench.benchmark`), print its table to ``out`` and write ``json_path``
    and ``plot_path`` when given (an existing file replaced only with ``overwrite``); returns
    the :class:`~compiledopt.bench.BenchResult`."""
    from compiledopt import bench

    check_outputs(json_path, plot_path, overwrite)
    opened = open_trusted(artifact, trust_code, trusted_keys)
    check_loadable(opened, backends or (), "--backends")
    result = bench.benchmark(
        opened,
        bench.example_model(model),
        backends=None if backends is None else list(backends),
        threads=threads,
        repeats=repeats,
        warmup=warmup,
    )
    print(f"compiledopt bench: {model} model", file=out)
    print(result, file=out)
    if json_path:
        text = json.dumps(result.to_dict(), indent=1) + "\n"
        write_whole(json_path, lambda staging: Path(staging).write_text(text))
        print(f"wrote {json_path}", file=out)
    if plot_path:
        write_whole(plot_path, lambda staging: plot(result, model, Path(staging)))
        print(f"wrote {plot_path}", file=out)
    return result


def plot(result: Any, model: str, path: Path) -> None:
    """Step time per backend (bars), one group per thread count, log scale, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(row.backend for row in result.rows))
    counts = list(result.ceilings)
    width = 0.8 / max(1, len(counts))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 4))
    for i, count in enumerate(counts):
        times = {r.backend: r.step_ms for r in result.rows if r.threads == count}
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [times.get(n, 0.0) for n in names], width, label=f"{count} thread(s)")
    ax.set_xticks([j + width * (len(counts) - 1) / 2 for j in range(len(names))], names)
    ax.set(yscale="log", ylabel="step (ms, median)", title=f"{result.rule} on {model}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
