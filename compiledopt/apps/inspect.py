"""A human-readable summary of an artifact's manifest, and the list of the optimizers packaged
with compiledopt: what ``compiledopt inspect`` prints.

Every string that comes from the manifest is printed through
:func:`~compiledopt.apps.text.printable`, newlines escaped too: an artifact cannot print control
sequences, nor a line of its own.
"""

import json
from typing import IO, Any, Optional

from compiledopt.apps.text import printable
from compiledopt.apps.trust import restore_interrupted

__all__ = ["describe_artifact", "list_packaged", "lr_basis"]


def describe_artifact(artifact: str, out: Optional[IO[str]] = None) -> None:
    """Load ``artifact`` (a directory or a packaged optimizer's name; loading verifies the
    checksum of every file) and print a summary of its manifest to ``out``: transform, kind,
    bindings or ranks and state, backends, training provenance, producer."""
    from compiledopt import pretrained
    from compiledopt.export import load_artifact

    restore_interrupted(artifact)
    loaded = load_artifact(pretrained.resolve(artifact))
    m = loaded.manifest

    def show(value: Any) -> str:  # every string from the artifact, escaped (newlines too)
        return printable(value)

    def shape(value: Any) -> str:
        return show(tuple(value))

    path = show(loaded.path)
    print(f"{path}: compiledopt artifact, format version {show(m['format_version'])}", file=out)
    print(f"  transform  {show(json.dumps(m['transform']))}", file=out)
    kind = f"{show(m['kind'])} ({show(m['dtype'])})"
    print(f"  kind       {kind}, suggested lr {m['lr']:g}, weight decay 0 (default)", file=out)
    if loaded.kind == "bound":
        print(f"  bindings   {len(loaded.bindings)} parameters", file=out)
        for b in loaded.bindings:
            state = ", ".join(f"{show(s['name'])}{shape(s['shape'])}" for s in b["state"]) or "-"
            print(f"    {show(b['name']):<24} {shape(b['shape']):<18} state: {state}", file=out)
    else:
        print(f"  ranks      {show(m['ranks'])}", file=out)
        names = ", ".join(show(name) for name in m["state_names"]) or "-"
        print(f"  state      {names} (per parameter)", file=out)
    for backend, files in m["backends"].items():
        print(f"  {show(backend):<10} {', '.join(show(f) for f in files)}", file=out)
    basis = lr_basis(loaded.training)
    if basis:
        print(f"  lr         start at {m['lr']:g}: {show(basis)}", file=out)
    if loaded.training:
        print(f"  training   {show(pretrained.summary(loaded.training, m['lr']))}", file=out)
        for key, value in loaded.training.items():
            print(f"    {show(key):<22} {show(json.dumps(value))}", file=out)
    producer = ", ".join(f"{show(k)} {show(v)}" for k, v in m["producer"].items())
    print(f"  producer   {producer}", file=out)
    print("  checksums  verified (sha256 of every file)", file=out)


def lr_basis(training: Any) -> Optional[str]:
    """Where the artifact's lr was chosen, from its training block's ``packaging.selected_on``
    (each entry's ``family``, ``split`` and ``steps``), or ``None`` where the block does not say.
    The block is data from the artifact: anything of another shape is passed over."""
    packaging = training.get("packaging") if isinstance(training, dict) else None
    selected = packaging.get("selected_on") if isinstance(packaging, dict) else None
    if not isinstance(selected, list):
        return None
    places = []
    for entry in selected:
        if not isinstance(entry, dict) or not isinstance(entry.get("family"), str):
            continue
        details = [entry[k] for k in ("split",) if isinstance(entry.get(k), str)]
        steps = entry.get("steps")
        if isinstance(steps, int) and not isinstance(steps, bool):
            details.append(f"{steps} steps")
        places.append(entry["family"] + (f" ({', '.join(details)})" if details else ""))
    if not places:
        return None
    return "the lr it was selected at, against tuned AdamW, on " + "; ".join(places)


def list_packaged(out: Optional[IO[str]] = None) -> None:
    """Print the optimizers packaged with compiledopt to ``out``, one block each (name,
    summary, lr, backends), the default marked."""
    from compiledopt import pretrained

    names = pretrained.names()
    print(f"{len(names)} packaged optimizer(s); use a name wherever an artifact is taken", file=out)
    for name in names:
        info = pretrained.info(name)
        mark = " (default)" if name == pretrained.DEFAULT else ""
        print(f"  {name}{mark}", file=out)
        print(f"    {info['summary']}", file=out)
        print(f"    lr {info['lr']:g}, backends {', '.join(info['backends'])}", file=out)
