"""The ``compiledopt inspect`` command: a human-readable summary of an artifact's manifest, or
(``--list``) of the optimizers packaged with compiledopt."""

import argparse
import json
from typing import Any, TextIO

from compiledopt.apps.trust import restore_interrupted
from compiledopt.cli.arguments import Commands
from compiledopt.cli.text import printable

__all__ = ["add_parser", "run"]


def add_parser(commands: Commands) -> argparse.ArgumentParser:
    """Add the ``inspect`` subparser."""
    parser = commands.add_parser(
        "inspect",
        help="summarise an artifact's manifest, or list the packaged optimizers",
        description="Verify an artifact's checksums and summarise its manifest (transform, "
        "backends, how it was meta-trained); with --list, the optimizers packaged with "
        "compiledopt, which any command or FrozenOptimizer takes by name.",
    )
    parser.add_argument(
        "artifact", nargs="?", help="an artifact directory or a packaged optimizer's name"
    )
    parser.add_argument(
        "--list", action="store_true", help="list the packaged optimizers (name, summary, lr)"
    )
    return parser


def run(args: argparse.Namespace, out: TextIO) -> int:
    """The ``inspect`` command: load (and so verify the checksums of) the artifact; summarise it.
    Every string that comes from the manifest is printed through
    :func:`~compiledopt.cli.text.printable`: an artifact cannot print control sequences."""
    from compiledopt import pretrained
    from compiledopt.export import load_artifact

    if args.list:
        if args.artifact is not None:
            raise ValueError(f"--list takes no artifact, got {args.artifact!r}")
        return _list(out)
    if args.artifact is None:
        raise ValueError("name an artifact directory or a packaged optimizer, or pass --list")
    restore_interrupted(args.artifact)
    artifact = load_artifact(pretrained.resolve(args.artifact))
    m = artifact.manifest

    def show(value: Any) -> str:  # every string from the artifact, escaped (newlines too)
        return printable(value)

    def shape(value: Any) -> str:
        return show(tuple(value))

    path = show(artifact.path)
    print(f"{path}: compiledopt artifact, format version {show(m['format_version'])}", file=out)
    print(f"  transform  {show(json.dumps(m['transform']))}", file=out)
    kind = f"{show(m['kind'])} ({show(m['dtype'])})"
    print(f"  kind       {kind}, suggested lr {m['lr']:g}", file=out)
    if artifact.kind == "bound":
        print(f"  bindings   {len(artifact.bindings)} parameters", file=out)
        for b in artifact.bindings:
            state = ", ".join(f"{show(s['name'])}{shape(s['shape'])}" for s in b["state"]) or "-"
            print(f"    {show(b['name']):<24} {shape(b['shape']):<18} state: {state}", file=out)
    else:
        print(f"  ranks      {show(m['ranks'])}", file=out)
        names = ", ".join(show(name) for name in m["state_names"]) or "-"
        print(f"  state      {names} (per parameter)", file=out)
    for backend, files in m["backends"].items():
        print(f"  {show(backend):<10} {', '.join(show(f) for f in files)}", file=out)
    if artifact.training:
        print(f"  training   {show(pretrained.summary(artifact.training, m['lr']))}", file=out)
        for key, value in artifact.training.items():
            print(f"    {show(key):<22} {show(json.dumps(value))}", file=out)
    producer = ", ".join(f"{show(k)} {show(v)}" for k, v in m["producer"].items())
    print(f"  producer   {producer}", file=out)
    print("  checksums  verified (sha256 of every file)", file=out)
    return 0


def _list(out: TextIO) -> int:
    """``inspect --list``: one block per packaged optimizer, the default marked."""
    from compiledopt import pretrained

    names = pretrained.names()
    print(f"{len(names)} packaged optimizer(s); use a name wherever an artifact is taken", file=out)
    for name in names:
        info = pretrained.info(name)
        mark = " (default)" if name == pretrained.DEFAULT else ""
        print(f"  {name}{mark}", file=out)
        print(f"    {info['summary']}", file=out)
        print(f"    lr {info['lr']:g}, backends {', '.join(info['backends'])}", file=out)
    return 0
