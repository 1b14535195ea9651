"""The fusion-method registry, the typed options and report, and the hooks for experiments (issue 13)."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxfuse
from graphs import SAMPLES, run
from onnxfuse import api, cli
from onnxfuse.methods import METHODS, FusionMethod
from onnxfuse.methods.nt import transplanted

MLP = [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(2)]
TRAIN = str(SAMPLES / "digits_train.npz")
X = np.load(SAMPLES / "digits_val.npz")["x"][:16]


def member_zero(job):
    """A toy selection: every neuron of member 0, none of the others."""
    return {g.id: np.arange(g.width) for g in job.groups}


TOY = FusionMethod("first", label="member 0's neurons (a toy)", verb="kept member 0's neurons",
                   help="every neuron of member 0 (a test's toy)", reference="tests/test_method_registry.py",
                   build=lambda job: transplanted(job, member_zero(job)), keep=False)


@pytest.fixture
def toy(monkeypatch):
    """The toy method, registered for one test only."""
    monkeypatch.setitem(METHODS, TOY.name, TOY)
    return TOY


def test_a_registered_method_runs_through_fuse(toy, tmp_path):
    fusion = onnxfuse.fuse(MLP, "first", output=tmp_path / "first.onnx")
    s = fusion.summary
    assert s["method"] == "first" and all(g["kept_per_member"] == [g["width"], 0] for g in s["groups"])
    meta = {p.key: p.value for p in onnx.load(tmp_path / "first.onnx").metadata_props}
    assert meta["onnxfuse.method"] == toy.label
    with pytest.raises(onnxfuse.OnnxFuseError, match="--keep applies"):       # its flags are validated
        onnxfuse.fuse(MLP, "first", keep=0.5)


def test_a_registered_method_is_a_cli_choice_with_its_help_and_verb(toy, tmp_path):
    runner = CliRunner()
    helptext = runner.invoke(cli.main, ["merge", "--help"]).output
    assert "[auto|nt|average|weight-matching|ot|first]" in helptext
    assert "first: every neuron of member 0 (a test's toy)." in " ".join(helptext.split())
    result = runner.invoke(cli.main, ["merge", *MLP, "-o", str(tmp_path / "f.onnx"), "--method", "first"])
    assert result.exit_code == 0, result.output
    assert "kept member 0's neurons" in result.output


def test_the_registry_is_left_as_it_was():
    assert "first" not in METHODS
    assert list(METHODS) == ["nt", "concat", "prune", "average", "weight-matching", "ot"]
    result = CliRunner().invoke(cli.main, ["merge", *MLP, "-o", "x.onnx", "--method", "first"])
    assert result.exit_code == 2


def test_kept_hook_replaces_the_selection(tmp_path):
    seen = {}

    def first_member(analysis, scores, n):
        seen["groups"] = sorted(scores)
        return {g.id: np.arange(g.width) for g in analysis.groups() if g.prunable}
    hooked = onnxfuse.fuse(MLP, "nt", kept=first_member)
    assert seen["groups"] and all(g["kept_per_member"] == [g["width"], 0] for g in hooked.summary["groups"])
    with pytest.raises(onnxfuse.OnnxFuseError, match="apply to the methods that select"):
        onnxfuse.fuse(MLP, "average", kept=first_member)


def test_importance_is_pluggable():
    def smallest_first(a, load, n, widened):        # the opposite of magnitude: the weakest neurons win
        from onnxfuse.select import channel_scores
        return {root: -s for root, s in channel_scores(a, load, n, widened).items()}
    weak = onnxfuse.fuse(MLP, "nt", importance=smallest_first).model
    strong = onnxfuse.merge(MLP)
    assert not np.allclose(run(weak, X), run(strong, X))
    with pytest.raises(onnxfuse.OnnxFuseError, match="unknown importance 'nope' \\(magnitude\\)"):
        onnxfuse.fuse(MLP, "nt", importance="nope")


def test_fuse_options_object_and_keywords_give_the_same_bytes(tmp_path):
    onnxfuse.fuse(MLP, onnxfuse.FuseOptions("nt", keep=0.75, output=tmp_path / "a.onnx"))
    onnxfuse.merge(MLP, tmp_path / "b.onnx", keep=0.75)
    onnxfuse.fuse(MLP, "nt", 0.75, tmp_path / "c.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes() == \
        (tmp_path / "c.onnx").read_bytes()
    with pytest.raises(TypeError):
        onnxfuse.fuse(MLP, onnxfuse.FuseOptions("nt"), keep=0.5)


def test_report_is_a_dataclass_whose_dict_is_the_summary():
    fusion = onnxfuse.fuse(MLP, "concat")
    assert isinstance(fusion.report, onnxfuse.FusionReport)
    assert fusion.summary == fusion.report.to_dict() and "training" not in fusion.summary
    assert fusion.report.exact is True and fusion.summary["method"] == "concat"


def test_calibrate_loads_every_member_once(monkeypatch, tmp_path):
    loads = []
    real = api.load_member
    monkeypatch.setattr(api, "load_member", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    onnxfuse.merge(MLP, output=tmp_path / "c.onnx", calibrate=TRAIN)
    assert loads == MLP


def test_api_and_bench_do_not_import_each_other():
    code = "import sys, onnxfuse.api; assert 'onnxfuse.bench' not in sys.modules; import onnxfuse.bench"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    source = open(api.__file__).read()
    assert "from .bench" not in source and "import bench" not in source


def test_every_training_option_is_a_flag_with_help():
    from onnxfuse.options import cli_fields
    from onnxfuse.training import TrainOptions
    helptext = CliRunner().invoke(cli.main, ["merge", "--help"]).output
    for f in cli_fields(TrainOptions):
        assert f"--{f.name.replace('_', '-')}" in helptext
    assert {"momentum", "weight_decay", "temperature"} <= {f.name for f in cli_fields(TrainOptions)}
    refused = CliRunner().invoke(cli.main, ["merge", *MLP, "-o", "x.onnx", "--momentum", "0.5"])
    assert refused.exit_code == 2 and "--momentum applies to fine-tuning" in refused.output


def test_generated_training_flags_reach_the_training(tmp_path):
    pytest.importorskip("torch")
    result = CliRunner().invoke(cli.main, ["merge", *MLP, "-o", str(tmp_path / "t.onnx"), "--data", TRAIN,
                                           "--epochs", "1", "--lr", "0.01", "--momentum", "0.5",
                                           "--weight-decay", "0.001", "--json"])
    assert result.exit_code == 0, result.output
    options = json.loads(result.stdout)["training"]["options"]
    assert options["momentum"] == 0.5 and options["weight_decay"] == 0.001
