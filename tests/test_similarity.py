"""How alike members are (onnxfuse.similarity, `inspect --data`): identical, one basin, or independent."""
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import onnxfuse
from onnxfuse.cli import main
from graphs import SAMPLES

MLP = [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(2)]
TRAIN, VAL = str(SAMPLES / "digits_train.npz"), str(SAMPLES / "digits_val.npz")


def test_independent_members_have_a_loss_barrier():
    s = onnxfuse.inspect(MLP, data=VAL)["similarity"]
    assert s["regime"] == "independent"
    path = s["pairs"][0]["path"]
    assert path["loss"][2] > max(path["loss"][0], path["loss"][-1])      # the midpoint is worse than both ends
    assert s["pairs"][0]["barrier"] > 0.1
    assert onnxfuse.inspect(MLP)["similarity"]["regime"] == "independent"  # from the weight distance alone


def test_finetunes_of_one_checkpoint_are_one_basin(finetunes):
    s = onnxfuse.inspect(finetunes, data=VAL)["similarity"]
    assert s["regime"] == "one basin", s["why"]
    assert s["pairs"][0]["relative_distance"] < 0.2
    assert onnxfuse.inspect(finetunes)["similarity"]["regime"] == "one basin"


def test_identical_and_partly_shared_members(finetunes, tmp_path):
    assert onnxfuse.inspect([MLP[0], MLP[0]], data=VAL)["similarity"]["regime"] == "identical"
    frozen = onnx.load(finetunes[1])                 # its first layer frozen: member 0's tensors
    first = onnx.load(finetunes[0])
    names = [t.name for t in first.graph.initializer][:2]
    for t in frozen.graph.initializer:
        if t.name in names:
            t.CopyFrom(next(u for u in first.graph.initializer if u.name == t.name))
    path = tmp_path / "frozen.onnx"
    onnx.save(frozen, path)
    pair = onnxfuse.inspect([finetunes[0], str(path)], data=VAL)["similarity"]["pairs"][0]
    assert pair["shared_tensors"] == 2 and 0 < pair["shared_weights"] < 1


def test_inspect_prints_the_regime_in_one_line(finetunes):
    result = CliRunner().invoke(main, ["inspect", *MLP, "--data", VAL])
    assert result.exit_code == 0, result.output
    lines = [l for l in result.output.splitlines() if l.startswith("regime:")]
    assert len(lines) == 1 and lines[0].startswith("regime: independent (a loss barrier")
