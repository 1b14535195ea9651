"""--method auto, and members that share tensors (fine-tunes of one checkpoint, frozen layers)."""
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import onnxfuse
from onnxfuse.cli import main
from graphs import SAMPLES, mean_of, run

MLP = [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(2)]
TRAIN, VAL = str(SAMPLES / "digits_train.npz"), str(SAMPLES / "digits_val.npz")


def sharing(paths, tmp_path, layers: int):
    """Copies of the members whose first `layers` weight layers are member 0's (frozen layers)."""
    models = [onnx.load(p) for p in paths]
    first = {t.name: t for t in models[0].graph.initializer}
    names = [t.name for t in models[0].graph.initializer][:2 * layers]
    out = []
    for i, m in enumerate(models):
        for t in m.graph.initializer:
            if t.name in names:
                t.CopyFrom(first[t.name])
        out.append(tmp_path / f"shared_{layers}_{i}.onnx")
        onnx.save(m, out[-1])
    return [str(p) for p in out]


def test_independent_members_with_fine_tuning_get_nt():
    s = onnxfuse.fuse(MLP, "auto", data=TRAIN, training={"epochs": 1, "lr": 0.05}).summary
    assert s["method"] == "nt" and s["auto"]["method"] == "nt" and s["auto"]["regime"] == "independent"


def test_finetunes_of_one_checkpoint_get_averaged(finetunes):
    s = onnxfuse.fuse(finetunes, "auto", data=TRAIN, val=VAL, training={"epochs": 0}).summary
    assert s["method"] == "average" and s["auto"]["regime"] == "one basin"
    acc = s["accuracy"]
    assert acc["result before fine-tuning"]["accuracy"] >= min(acc[f"ft_{i}.onnx"]["accuracy"] for i in range(2))


def test_without_fine_tuning_independent_members_get_the_best_averaging_method_on_the_held_out_slice():
    s = onnxfuse.fuse(MLP, "auto", data=TRAIN, training={"epochs": 0}).summary
    candidates = s["auto"]["candidates"]
    assert set(candidates) == {"weight-matching", "ot", "average"}
    assert s["method"] == max(candidates, key=candidates.get)


def test_auto_is_the_cli_default_with_data_and_needs_data(tmp_path):
    runner = CliRunner()
    out = tmp_path / "f.onnx"
    result = runner.invoke(main, ["merge", *MLP, "-o", str(out), "--data", TRAIN, "--epochs", "1", "--lr", "0.05"])
    assert result.exit_code == 0, result.output
    assert "--method auto chose nt:" in result.output
    plain = runner.invoke(main, ["merge", *MLP, "-o", str(tmp_path / "g.onnx"), "--json"])
    assert plain.exit_code == 0 and '"method": "nt"' in plain.output and '"auto"' not in plain.output
    refused = runner.invoke(main, ["merge", *MLP, "-o", str(tmp_path / "h.onnx"), "--method", "auto"])
    assert refused.exit_code == 2 and "--method auto measures the members on --data" in refused.output


@pytest.mark.parametrize("layers", [1, 2])          # some layers frozen; all but the last layer frozen
def test_every_method_fuses_members_that_share_tensors(finetunes, tmp_path, layers):
    paths = sharing(finetunes, tmp_path, layers)
    x = np.load(VAL)["x"][:64]
    loaded = [onnx.load(p) for p in paths]
    wide = onnxfuse.concat(paths)
    np.testing.assert_allclose(run(wide, x), mean_of(loaded, x), atol=1e-4)
    for method in ("nt", "average", "weight-matching", "ot"):
        fused = onnxfuse.merge(paths, method=method)
        assert run(fused, x).shape == (64, 10), method
    averaged = {t.name: numpy_helper.to_array(t) for t in onnxfuse.merge(paths, method="average").graph.initializer}
    first = {t.name: numpy_helper.to_array(t) for t in loaded[0].graph.initializer}
    for name in [t.name for t in loaded[0].graph.initializer][:2 * layers]:     # shared: kept as it is
        assert np.array_equal(averaged[name], first[name]), name
    tuned = onnxfuse.fuse(paths, "nt", data=TRAIN, val=VAL, training={"epochs": 1, "lr": 0.05}).summary
    acc = tuned["accuracy"]                               # the bridge trains the shared-tensor members' fusion
    assert acc["result after fine-tuning"]["accuracy"] > acc["result before fine-tuning"]["accuracy"]
