"""Two versions of the package, one optimizer step, alternating processes: is a change faster?

``python -m benchmarks.step_speed.compare --before REF`` times the packaged default learned
optimizer's step on one case of the targets suite (the tiny GPT-2 by default) with the package as
it is at git ``REF`` (checked out into a temporary worktree) and as it is in this checkout,
in ``--rounds`` pairs of fresh processes that alternate the two versions. Each process builds
the optimizer, takes ``--warmup`` steps, then times ``--steps`` steps, and times fused AdamW's
step on the same parameters in the same process.

On a shared or throttling machine two runs minutes apart differ by more than most changes; the
alternation puts both versions under the same conditions, and the verdict is a ratio of medians
over the rounds (after / before), with each version's step over fused AdamW's beside it.

Outputs under ``--out`` (default ``benchmarks/results/compare``): ``compare.json`` (settings,
machine, both commits, every process), ``compare.md`` and ``compare.png`` (each round's median).
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
PROG = "python -m benchmarks.step_speed.compare"
BACKENDS = ("eager", "compiled", "torchscript", "onnx", "auto")


def child(job: Dict[str, Any]) -> Dict[str, Any]:
    """In a fresh process whose ``compiledopt`` is the version under test: the medians (and
    tenth percentiles) of ``job["steps"]`` steps of the learned optimizer and of fused AdamW."""
    import torch

    import compiledopt

    torch.set_num_threads(job["threads"])
    generator = torch.Generator().manual_seed(job["seed"])
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in job["shapes"]]
    grads = [torch.randn(s, generator=generator) for s in job["shapes"]]
    learned = compiledopt.FrozenOptimizer(params, "normalized-mlp", backend=job["backend"])
    fused = torch.optim.AdamW(params, lr=1e-3, fused=True)

    def timed(optimizer: torch.optim.Optimizer, steps: int) -> List[float]:
        times = []
        for _ in range(steps):
            for p, g in zip(params, grads):
                p.grad = g
            began = time.perf_counter()
            optimizer.step()
            times.append((time.perf_counter() - began) * 1e3)
        return times

    timed(learned, job["warmup"])
    timed(fused, job["warmup"])
    steps, adamw = timed(learned, job["steps"]), timed(fused, job["steps"])
    return {
        "step_ms": statistics.median(steps),
        "step_ms_p10": sorted(steps)[len(steps) // 10],
        "adamw_fused_ms": statistics.median(adamw),
        "package": str(Path(compiledopt.__file__).resolve().parent),
    }


def parser() -> argparse.ArgumentParser:
    from benchmarks.step_speed.targets import OneLineParser
    from benchmarks.step_speed.targets_runs import CASES

    p = OneLineParser(prog=PROG, description=(__doc__ or "").splitlines()[0])
    p.add_argument("--before", default="HEAD", help="the git ref to compare with (default HEAD)")
    p.add_argument("--case", default="gpt2-tiny", choices=CASES, help="the targets suite's case")
    p.add_argument("--backend", default="compiled", choices=BACKENDS, help="default: compiled")
    p.add_argument("--rounds", type=int, default=5, help="process pairs (default 5)")
    p.add_argument("--steps", type=int, default=200, help="timed steps a process (default 200)")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first (default 30)")
    p.add_argument("--threads", type=int, default=1, help="threads a process (default 1)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a process (default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compare"))
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    return p


def _settings(argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    from benchmarks.step_speed import targets
    from benchmarks.step_speed.targets_runs import case_shapes

    p = parser()
    args = p.parse_args(argv)
    for name in ("rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"invalid --{name}: {getattr(args, name)} (a positive integer)")
    if args.warmup < 0:
        p.error(f"invalid --warmup: {args.warmup} (an integer >= 0)")
    if not args.timeout > 0:
        p.error(f"invalid --timeout: {args.timeout} (a positive number of seconds)")
    commit = _git("rev-parse", "--verify", "--quiet", f"{args.before}^{{commit}}")
    if commit is None:
        p.error(f"invalid --before: {args.before!r} is not a commit of {ROOT}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"invalid --out: {str(out)!r} is a file, not a folder")
    suite = targets.settings_of(targets.parser().parse_args([]), targets.parser())
    return {
        **vars(args),
        "before_commit": commit,
        "after_commit": _git("rev-parse", "HEAD"),
        "after_modified": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "shapes": [list(shape) for _, shape in case_shapes(args.case, suite)],
        "seed": 0,
    }


def _git(*args: str) -> Optional[str]:
    """:func:`~benchmarks.step_speed.runner.git`, its output stripped (a worktree's checkout
    may take longer than a query)."""
    from benchmarks.step_speed.runner import git

    out = git(*args, timeout=60.0)
    return None if out is None else out.strip()


def _run(tree: Path, job: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """One process of the version in ``tree``: this file run as a script (its folder first on
    the path, so ``compiledopt`` comes from ``tree``), the job on stdin, the result on stdout."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(job["threads"]))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(tree),
        env=env,
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        return {"status": "error", "reason": lines[-1]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["package"]).is_relative_to(tree.resolve()):  # timed the wrong version
        return {"status": "error", "reason": f"compiledopt came from {result['package']}"}
    return {"status": "ok", **result}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Every round, then the JSON document, written and printed as a table."""
    from benchmarks.step_speed.runner import machine_info

    s = _settings(argv)
    started = time.perf_counter()
    job = {k: s[k] for k in ("shapes", "backend", "threads", "steps", "warmup", "seed")}
    runs: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="compiledopt-compare-") as work:
        before = Path(work) / "before"
        if _git("worktree", "add", "--detach", str(before), s["before_commit"]) is None:
            raise SystemExit(f"{PROG}: error: could not check out {s['before']} into {before}")
        try:
            for round_ in range(s["rounds"]):
                for version, tree in (("before", before), ("after", ROOT)):
                    row = _run(tree, job, s["timeout"])
                    runs.append({"round": round_, "version": version, **row})
                    elapsed = time.perf_counter() - started
                    print(f"[{elapsed:5.0f} s] {version} {row}", file=sys.stderr)
        finally:
            _git("worktree", "remove", "--force", str(before))
            shutil.rmtree(before, ignore_errors=True)
    doc = {
        "command": " ".join([PROG, *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "settings": {k: v for k, v in s.items() if k != "shapes"},
        "tensors": len(s["shapes"]),
        "machine": machine_info(),
        "runs": runs,
        "summary": summary(runs),
        "wall_s": time.perf_counter() - started,
    }
    out = Path(s["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(doc, indent=1) + "\n")
    text = markdown(doc)
    (out / "compare.md").write_text(text)
    if not s["no_plot"]:
        plot(doc, out / "compare.png")
    print(text)
    return doc


def summary(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per version: the median over its processes of their medians, and of their step over
    fused AdamW's; ``after_over_before``, the ratio of the two medians (``None`` where a version
    has no successful process)."""
    out: Dict[str, Any] = {}
    for version in ("before", "after"):
        ok = [r for r in runs if r["version"] == version and r["status"] == "ok"]
        out[version] = {
            "processes": len(ok),
            "step_ms": statistics.median(r["step_ms"] for r in ok) if ok else None,
            "over_adamw_fused": (
                statistics.median(r["step_ms"] / r["adamw_fused_ms"] for r in ok) if ok else None
            ),
        }
    b, a = out["before"]["step_ms"], out["after"]["step_ms"]
    out["after_over_before"] = a / b if a is not None and b else None
    return out


def markdown(doc: Dict[str, Any]) -> str:
    s, m = doc["settings"], doc["summary"]
    after = s["after_commit"][:9] + (" + uncommitted changes" if s["after_modified"] else "")
    lines = [
        f"# {s['case']} on `{s['backend']}`: {s['before']} against this checkout",
        "",
        f"`{doc['command']}` — {doc['machine'].get('cpu')}, {s['threads']} thread(s), "
        f"{s['rounds']} rounds of two processes, {s['steps']} timed steps each; "
        f"{doc['wall_s']:.0f} s.",
        "",
        "| version | commit | processes | median step ms | step / fused AdamW's |",
        "|---|---|---|---|---|",
    ]
    for version, commit in (("before", s["before_commit"][:9]), ("after", after)):
        row = m[version]
        ms = "–" if row["step_ms"] is None else f"{row['step_ms']:.3f}"
        ratio = "–" if row["over_adamw_fused"] is None else f"{row['over_adamw_fused']:.1f}×"
        lines.append(f"| {version} | {commit} | {row['processes']} | {ms} | {ratio} |")
    verdict = m["after_over_before"]
    lines += ["", f"after / before: {'–' if verdict is None else f'{verdict:.3f}'}"]
    return "\n".join(lines) + "\n"


def plot(doc: Dict[str, Any], path: Path) -> None:
    """Each process's median step, by round, one line per version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for version in ("before", "after"):
        rows = [r for r in doc["runs"] if r["version"] == version and r["status"] == "ok"]
        ax.plot([r["round"] for r in rows], [r["step_ms"] for r in rows], "o-", label=version)
    ax.set_xlabel("round")
    ax.set_ylabel("median step (ms)")
    ax.set_title(f"{doc['settings']['case']}, {doc['settings']['backend']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        print(json.dumps(child(json.loads(sys.stdin.read()))))
    else:
        main()
