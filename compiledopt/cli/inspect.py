"""The ``compiledopt inspect`` command: a human-readable summary of an artifact's manifest."""

import argparse
import json
from typing import TextIO

__all__ = ["add_parser", "run"]


def add_parser(
    commands: "argparse._SubParsersAction[argparse.ArgumentParser]",
) -> argparse.ArgumentParser:
    """Add the ``inspect`` subparser."""
    parser = commands.add_parser("inspect", help="summarise an artifact's manifest")
    parser.add_argument("artifact", help="an artifact directory")
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``inspect`` command: load (and so verify the checksums of) the artifact; summarise it."""
    from compiledopt.export import load_artifact

    artifact = load_artifact(args.artifact)
    m = artifact.manifest
    print(f"{artifact.path}: compiledopt artifact, format version {m['format_version']}", file=out)
    print(f"  transform  {json.dumps(m['transform'])}", file=out)
    print(f"  kind       {m['kind']} ({m['dtype']}), suggested lr {m['lr']:g}", file=out)
    if artifact.kind == "bound":
        print(f"  bindings   {len(artifact.bindings)} parameters", file=out)
        for b in artifact.bindings:
            state = ", ".join(f"{s['name']}{tuple(s['shape'])}" for s in b["state"]) or "-"
            print(f"    {b['name']:<24} {tuple(b['shape'])!s:<18} state: {state}", file=out)
    else:
        print(f"  ranks      {m['ranks']}", file=out)
        print(f"  state      {', '.join(m['state_names']) or '-'} (per parameter)", file=out)
    for backend, files in m["backends"].items():
        print(f"  {backend:<10} {', '.join(files)}", file=out)
    producer = ", ".join(f"{k} {v}" for k, v in m["producer"].items())
    print(f"  producer   {producer}", file=out)
    print("  checksums  verified (sha256 of every file)", file=out)
    return 0
