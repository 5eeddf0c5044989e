"""Re-export the packaged default (``normalized-mlp``) from its meta-trained weights with a
chosen harness, routes and recommended lr, keeping the weights bit-identical.

    .venv/bin/python scripts/package_default.py --harness --lr 0.003 \\
        --selection benchmarks/results/routes_image-mlp.json \\
        --selection benchmarks/results/routes_text-lm.json

The weights are read from the packaged artifact (verified as any load is), the transform is
rebuilt with the harness flags (``orthogonalize`` and ``adam_vectors``: Newton–Schulz on matrix
updates, the Adam-like rule on vectors), and the artifact is written again (TorchScript and ONNX
graphs of the configured rule) over the packaged folder. The manifest's ``training`` block keeps
the meta-training provenance and gains ``packaging``: the harness, the routes, the lr and the
measurement they were chosen from (a held-out split of a meta-training family, never the
learning-quality benchmark's tasks).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from compiledopt import pretrained
from compiledopt.export import export_shape_agnostic
from compiledopt.learned.catalog import build_transform

NAME = "normalized-mlp"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--harness", action="store_true", help="orthogonalize + adam_vectors")
    parser.add_argument("--lr", type=float, required=True, help="the recommended lr")
    parser.add_argument(
        "--routes", default="{}", help='JSON object role -> rule, e.g. {"embedding": "adam"}'
    )
    parser.add_argument(
        "--selection",
        action="append",
        default=[],
        help="a JSON result of benchmarks.routes the choice was made from (repeatable)",
    )
    parser.add_argument("--output", help="where to write (default: over the packaged folder)")
    args = parser.parse_args(argv)

    source = pretrained.load(NAME)
    spec = source.spec
    (trained,) = source.transforms()
    kwargs = {key: value for key, value in spec.get("kwargs", {}).items()}
    for flag in ("orthogonalize", "adam_vectors", "elementwise"):
        kwargs.pop(flag, None)
    if args.harness:
        kwargs.update(orthogonalize=True, adam_vectors=True)
    transform = build_transform(spec["name"], kwargs)
    transform.load_state_dict(trained.state_dict())
    for mine, theirs in zip(transform.state_dict().values(), trained.state_dict().values()):
        if not torch.equal(mine, theirs):
            raise SystemExit("the rebuilt transform's weights differ from the packaged ones")

    training = dict(source.training)
    packaging = {
        "harness": {"orthogonalize": args.harness, "adam_vectors": args.harness},
        "routes": json.loads(args.routes),
        "lr": args.lr,
        "weights": "unchanged from meta-training",
    }
    packaging["selected_on"] = []
    for selection in args.selection:
        result = json.loads(Path(selection).read_text())
        summary = result.get("summary", {})
        packaging["selected_on"].append(
            {
                "file": Path(selection).as_posix(),
                "family": result.get("family"),
                "split": result.get("split"),
                "steps": result.get("steps"),
                "command": result.get("command"),
                "geomean_ratio_to_tuned_adamw": {
                    name: entry.get("geomean_ratio_to_tuned_adamw")
                    for name, entry in summary.items()
                },
            }
        )
    training["packaging"] = packaging
    output = Path(args.output) if args.output else pretrained.path(NAME)
    export_shape_agnostic(
        output,
        {"kind": "shape_agnostic", "name": spec["name"], "kwargs": kwargs},
        transform,
        backends=list(source.backends),
        lr=args.lr,
        overwrite=True,
        training=training,
        routes=packaging["routes"] or None,
    )
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
