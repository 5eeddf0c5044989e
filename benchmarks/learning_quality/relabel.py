"""Recompute a learning-quality result for another default lr of the learned optimizer.

    python -m benchmarks.learning_quality.relabel benchmarks/results/learning_quality.json \\
        --learned-lr 0.003 --output benchmarks/results/learning_quality_lr3e-3

When an optimizer's recommended lr changes to one its sweep already measured, the runs need not
be repeated: the per-task summaries and aggregates are recomputed from the recorded runs with the
new default (the lr must be one of the sweep's). The stress checks ran at the old default and are
kept as they are (they are noted as such). The result says it was relabelled, from which file.
"""

import argparse
import json
from typing import List

from benchmarks.learning_quality import analysis, report


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", help="a learning_quality JSON file")
    parser.add_argument("--learned-lr", type=float, required=True)
    parser.add_argument("--output", required=True, help="path prefix of the new JSON/md/PNGs")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    with open(args.result, encoding="utf-8") as handle:
        doc = json.load(handle)
    if args.learned_lr not in doc["sweeps"]["learned"]:
        parser.exit(
            2,
            f"relabel: --learned-lr {args.learned_lr:g} was not measured "
            f"(the sweep: {doc['sweeps']['learned']})\n",
        )
    defaults = {**doc["default_lrs"], "learned": args.learned_lr}
    seeds = doc["settings"].get("task_seeds") or doc["settings"]["seeds"]
    summaries = analysis.summarize(doc["runs"], seeds, defaults)
    doc["default_lrs"] = defaults
    doc["optimizers"]["learned"]["default_lr"] = args.learned_lr
    for name, summary in summaries.items():
        doc["tasks"][name]["summary_of_runs"] = summary
    doc["aggregates"] = analysis.aggregate(summaries, doc["runs"])
    doc["lr_spread"] = analysis.lr_spread(summaries)
    doc["notes"] = [
        *doc.get("notes", []),
        f"relabelled from {args.result}: the learned optimizer's default lr is "
        f"{args.learned_lr:g} (runs unchanged; the stress check ran at the earlier default)",
    ]
    doc["command"] = f"{doc['command']}  # then: python -m benchmarks.learning_quality.relabel " + (
        f"{args.result} --learned-lr {args.learned_lr:g} --output {args.output}"
    )
    text = report.tables(doc)
    print(text)
    written = report.write(doc, text, args.output)
    if not args.no_plots:
        from benchmarks.learning_quality import plots

        written += plots.write(doc, args.output)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
