"""``compiledopt demo`` (the main job end to end) and ``compiledopt finetune``, at small sizes."""

import io

import pytest

from compiledopt import cli
from compiledopt.apps.finetune import run_finetune
from compiledopt.apps.pipeline import run_pipeline


def test_pipeline_runs_every_stage(tmp_path):
    out = io.StringIO()
    result = run_pipeline(
        str(tmp_path),
        meta_steps=2,
        backends=("torchscript", "onnx"),
        finetune_steps=12,
        out=out,
        progress=False,
    )
    text = out.getvalue()
    for stage in ("[1/4 meta-train]", "[2/4 export]", "[3/4 verify]", "[4/4 fine-tune]", "done:"):
        assert stage in text
    assert set(result["verify"]) == {"torchscript", "onnx"}
    assert all(error <= 1e-6 for error in result["verify"].values())
    runs = result["finetune"]
    assert set(runs) == {
        "frozen/eager",
        "frozen/compiled",
        "frozen/torchscript",
        "frozen/onnx",
        "AdamW (best lr)",
        "AdamW (lr 1e-3)",
    }
    assert runs["AdamW (lr 1e-3)"]["lr"] == 1e-3
    for name, run in runs.items():
        assert 0.0 <= run["accuracy"] <= 1.0 and run["step_ms"] > 0, name
    # The shipped artifact's TorchScript graph was scripted when the eager rule's inference
    # network still summed its products in the (N, 5) order: the same fine-tuning up to rounding.
    eager, scripted = runs["frozen/eager"], runs["frozen/torchscript"]
    assert eager["heldout_loss"] == pytest.approx(scripted["heldout_loss"], rel=1e-5)
    assert (tmp_path / "artifact" / "manifest.json").is_file()

    out = io.StringIO()
    args = cli.build_parser().parse_args(
        ["finetune", str(tmp_path / "artifact"), "--steps", "5", "--backends", "eager"]
    )
    runs = run_finetune(args.artifact, args.steps, ["eager"], out=out)
    assert set(runs) == {"frozen/eager", "AdamW (best lr)", "AdamW (lr 1e-3)"}
    assert "AdamW" in out.getvalue() and "cosine" in out.getvalue()
