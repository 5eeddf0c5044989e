"""The trust model: an artifact is data unless the user vouches for its code.

Each test crafts what a stranger could send (a payload in a graph's metadata, a TorchScript
program with a side effect, a file swapped after loading, a manifest implying huge tensors) and
re-computes the manifest's checksums as its author would, since checksums prove integrity, not
origin.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import compiledopt as co
from compiledopt import cli
from compiledopt.export import (
    ArtifactError,
    UntrustedCodeError,
    build_shape_agnostic,
    export_shape_agnostic,
    load_artifact,
)
from compiledopt.export.signature import SIGNATURE_KEY, Expression, Signature, parse_size
from compiledopt.export.verify import verify_artifact

SPEC = {"kind": "shape_agnostic", "name": "coordinate-mlp", "kwargs": {"hidden_sizes": [8]}}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    transform = build_shape_agnostic(SPEC)
    path = tmp_path_factory.mktemp("trust") / "artifact"
    return export_shape_agnostic(path, SPEC, transform, ["torchscript", "onnx"], ranks=(1, 2))


@pytest.fixture()
def artifact(tmp_path, exported):
    target = tmp_path / "artifact"
    shutil.copytree(exported, target)
    return target


def _rehash(path: Path) -> None:
    """Recompute every checksum, as whoever edited a file would."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


def _call(runner, shape=(4, 3)):
    param = torch.randn(shape)
    state = build_shape_agnostic(SPEC).init_state(param)
    return runner(torch.randn(shape), param, state, torch.tensor(0))


# -- no string from an artifact is evaluated ------------------------------------------------


PAYLOADS = [
    "__import__('pathlib').Path('{marker}').touch() or 3",
    "exec(\"open('{marker}', 'w')\")",
    "s0.__class__",
    "lambda: 0",
    "s0**2",
    "s0; s1",
    "'s0'",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_size_is_parsed_never_evaluated(payload, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match="Invalid size"):
        parse_size(payload.format(marker=marker))
    assert not marker.exists()


@pytest.mark.parametrize(
    "text, values, expected",
    [
        ("s10*s18*s2", {"s10": 2, "s18": 3, "s2": 5}, 30),
        ("(s1+2)*s3//2", {"s1": 3, "s3": 4}, 10),
        ("s4 - 1", {"s4": 7}, 6),
    ],
)
def test_derived_sizes_evaluate_by_the_grammar(text, values, expected):
    expression = parse_size(text)
    assert isinstance(expression, Expression)
    assert expression.symbols == frozenset(values)
    assert expression.evaluate(values) == expected
    assert parse_size("s7") == "s7" and parse_size(4) == 4 and parse_size("12") == 12


def test_a_metadata_payload_in_an_onnx_graph_never_runs(artifact, tmp_path, capsys):
    import onnx

    marker = tmp_path / "payload-ran"
    graph = artifact / "rule_rank2.onnx"
    model = onnx.load(str(graph))
    entry = next(p for p in model.metadata_props if p.key == SIGNATURE_KEY)
    signature = json.loads(entry.value)
    signature["shapes"][2][1] = PAYLOADS[0].format(marker=marker)
    entry.value = json.dumps(signature)
    onnx.save(model, str(graph))
    _rehash(artifact)
    loaded = load_artifact(artifact)  # data: it loads, nothing in it has run
    with pytest.raises(ArtifactError, match="unreadable rule signature"):
        _call(loaded.runner("onnx"))
    assert cli.main(["verify", str(artifact)]) == 2
    assert "unreadable rule signature" in capsys.readouterr().err
    model = torch.nn.Linear(3, 4)
    with pytest.raises(ArtifactError, match="unreadable rule signature"):
        optimizer = co.FrozenOptimizer(model.parameters(), artifact, backend="onnx")
        model(torch.randn(2, 3)).sum().backward()
        optimizer.step()  # the rank-2 graph loads at its first use
    assert not marker.exists()


def test_a_stored_signature_is_checked_field_by_field():
    good = Signature(True, 1, 0, ["float32", "float32", "int64"], [["s0"], ["s0"], []])
    assert Signature.from_json(good.to_json(), "g").shapes == good.shapes
    for bad in (
        {**json.loads(good.to_json()), "dtypes": ["float32", "os.system", "int64"]},
        {**json.loads(good.to_json()), "shapes": [["s0"], ["s0"]]},
        {**json.loads(good.to_json()), "directions": True},
        {**json.loads(good.to_json()), "extra": 1},
        [1, 2],
    ):
        with pytest.raises(ValueError, match="unreadable rule signature"):
            Signature.from_json(json.dumps(bad), "g")


# -- graphs that are code run only when trusted -------------------------------------------


class _Loud(torch.nn.Module):
    """A 'rule' with a side effect: it prints when it runs."""

    def forward(
        self, grad: torch.Tensor, param: torch.Tensor, state: list[torch.Tensor], step: torch.Tensor
    ):
        print("SIDE EFFECT")
        return grad, state


def test_a_side_effecting_torchscript_rule_is_never_run_untrusted(artifact, capfd):
    torch.jit.save(torch.jit.script(_Loud()), str(artifact / "rule.pt"))
    _rehash(artifact)
    loaded = load_artifact(artifact)
    assert not loaded.code_trusted and not loaded.may_load("torchscript")
    assert loaded.may_load("onnx")
    with pytest.raises(UntrustedCodeError, match="--trust-code"):
        loaded.runner("torchscript")
    model = torch.nn.Linear(3, 4)
    with pytest.raises(UntrustedCodeError):
        co.FrozenOptimizer(model.parameters(), artifact, backend="torchscript")
    optimizer = co.FrozenOptimizer(model.parameters(), artifact)  # auto: never code
    assert optimizer.backend in ("compiled", "onnx", "eager")
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    assert verify_artifact(artifact, steps=2).keys() == {"onnx"}
    assert "SIDE EFFECT" not in capfd.readouterr().out
    # The user who trusts its source opts in, and gets what they asked for.
    _call(load_artifact(artifact, trust_code=True).runner("torchscript"))
    assert "SIDE EFFECT" in capfd.readouterr().out


# -- the bytes that are loaded are the bytes that were hashed ---------------------------------


def test_a_graph_swapped_after_loading_is_refused(artifact):
    loaded = load_artifact(artifact)
    runner = loaded.runner("onnx")  # per-rank graphs load on first use
    _call(runner, (4, 3))  # rank 2 is loaded now
    (artifact / "rule_rank1.onnx").write_bytes((artifact / "rule_rank2.onnx").read_bytes())
    with pytest.raises(ArtifactError, match=r"checksum mismatch for rule_rank1\.onnx"):
        _call(runner, (5,))


def test_weights_swapped_after_loading_are_refused(artifact):
    loaded = load_artifact(artifact)
    data = bytearray((artifact / "weights.safetensors").read_bytes())
    data[-1] ^= 1
    (artifact / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for weights\.safetensors"):
        loaded.transforms()


_ALLOCATION = textwrap.dedent(
    """
    import json, resource, sys
    from compiledopt.export import ArtifactError, load_artifact
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_artifact(sys.argv[1]).transforms()
        outcome = "built"
    except ArtifactError as error:
        outcome = str(error)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"outcome": outcome, "grown_mb": grown / 1024}))
    """
)


def test_sizes_the_manifest_implies_are_checked_before_allocating(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["transform"]["kwargs"]["hidden_sizes"] = [12000, 12000]  # 576 MB of weights
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    done = subprocess.run(
        [sys.executable, "-c", _ALLOCATION, str(artifact)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "weights do not fit the transform spec" in result["outcome"]
    assert result["grown_mb"] < 200, result


# -- signatures --------------------------------------------------------------------------------


@pytest.fixture()
def keys(tmp_path):
    pytest.importorskip("cryptography")
    from compiledopt.export.signing import generate_keypair

    made = {}
    for who in ("author", "stranger"):
        private, public = tmp_path / f"{who}.pem", tmp_path / f"{who}.pub.pem"
        made[who] = (private, public, generate_keypair(private, public))
    assert (made["author"][0].stat().st_mode & 0o777) == 0o600
    return made


def test_a_signature_by_a_trusted_key_trusts_the_code(artifact, keys):
    from compiledopt.export.signing import sign_artifact

    private, public, fingerprint = keys["author"]
    assert sign_artifact(artifact, private) == fingerprint
    loaded = load_artifact(artifact, trusted_keys=[public])
    assert loaded.code_trusted and loaded.signed_by == fingerprint
    _call(loaded.runner("torchscript"))
    model = torch.nn.Linear(3, 4)
    optimizer = co.FrozenOptimizer(
        model.parameters(), artifact, backend="torchscript", trusted_keys=[public]
    )
    assert optimizer.backend == "torchscript"
    # Unsigned use needs no key and trusts no code.
    assert not load_artifact(artifact).code_trusted


def test_a_signature_is_refused_when_anything_changed(artifact, keys):
    from compiledopt.export.signing import sign_artifact

    sign_artifact(artifact, keys["author"][0])
    public = keys["author"][1]
    with pytest.raises(ArtifactError, match="not among the trusted keys"):
        load_artifact(artifact, trusted_keys=[keys["stranger"][1]])
    original = (artifact / "manifest.json").read_bytes()
    manifest = json.loads(original)
    manifest["lr"] = 1.0
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"does not match manifest\.json"):
        load_artifact(artifact, trusted_keys=[public])
    (artifact / "manifest.json").write_bytes(original)
    load_artifact(artifact, trusted_keys=[public])
    # A graph changed and re-hashed: the manifest changes, so the signature no longer verifies.
    torch.jit.save(torch.jit.script(_Loud()), str(artifact / "rule.pt"))
    _rehash(artifact)
    with pytest.raises(ArtifactError, match=r"does not match manifest\.json"):
        load_artifact(artifact, trusted_keys=[public])


def test_a_missing_or_malformed_signature_is_refused_when_keys_are_given(artifact, keys):
    public = keys["author"][1]
    with pytest.raises(ArtifactError, match="not signed"):
        load_artifact(artifact, trusted_keys=[public])
    for text in ("{", "[]", json.dumps({"format": "x"}), "A" * 10_000):
        (artifact / "signature.json").write_text(text)
        with pytest.raises(ArtifactError, match=r"signature\.json is malformed"):
            load_artifact(artifact, trusted_keys=[public])
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_artifact(artifact, trusted_keys=[keys["author"][0]])  # a private key
    with pytest.raises(FileNotFoundError):
        load_artifact(artifact, trusted_keys=[artifact / "nope.pem"])
    with pytest.raises(ValueError, match="empty"):
        load_artifact(artifact, trusted_keys=[])
