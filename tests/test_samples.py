"""The shipped sample models: concat is their ensemble, merge honours the output contract."""
import hashlib
import json

import numpy as np
import onnx
import pytest

import onnxfuse
from graphs import SAMPLES, mean_of, run

FAMILIES = {"mlp": "digits_val.npz", "cnn": "digits_images_val.npz"}


def members(family, n):
    return [str(SAMPLES / f"digits_{family}_{i}.onnx") for i in range(n)]


def val(family):
    data = np.load(SAMPLES / FAMILIES[family])
    return data["x"], data["y"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [2, 3])
def test_concat_is_mean_of_members_on_real_data(family, n, tmp_path):
    paths = members(family, n)
    out = tmp_path / "wide.onnx"
    fusion = onnxfuse.fuse(paths, "concat", output=out)
    assert fusion.summary["exact"] is True
    x, y = val(family)
    loaded = [onnx.load(p) for p in paths]
    expected = mean_of(loaded, x)
    np.testing.assert_allclose(run(onnx.load(out), x), expected, atol=1e-4, rtol=0)
    ensemble_acc = (expected.argmax(1) == y).mean()
    assert ensemble_acc > max((run(m, x).argmax(1) == y).mean() for m in loaded) - 0.02


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [2, 3])
def test_merge_output_contract(family, n, tmp_path):
    paths = members(family, n)
    out = tmp_path / "fused.onnx"
    onnxfuse.merge(paths, output=out)
    onnx.checker.check_model(str(out), full_check=True)
    fused, ref = onnx.load(out), onnx.load(paths[0])
    assert fused.graph.input == ref.graph.input and fused.graph.output == ref.graph.output
    assert [(t.name, list(t.dims), t.data_type) for t in fused.graph.initializer] == \
        [(t.name, list(t.dims), t.data_type) for t in ref.graph.initializer]
    assert fused.opset_import == ref.opset_import and fused.ir_version == ref.ir_version
    meta = {p.key: p.value for p in fused.metadata_props}
    assert meta["onnxfuse.method"] == "neuron-transplantation"
    recorded = json.loads(meta["onnxfuse.members"])
    assert [r["sha256"] for r in recorded] == [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]
    x, _ = val(family)
    assert run(fused, x).shape == (len(x), 10)


def test_merge_is_byte_identical_across_runs(tmp_path):
    paths = members("cnn", 3)
    onnxfuse.merge(paths, output=tmp_path / "a.onnx")
    onnxfuse.merge(paths, output=tmp_path / "b.onnx", keep=None)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_members_matched_by_structure_not_names(tmp_path):
    """Rename every tensor of member 1: the fusion is the same."""
    paths = members("mlp", 2)
    renamed = onnx.load(paths[1])
    mapping = {t.name: "renamed_" + t.name for t in renamed.graph.initializer}
    for t in renamed.graph.initializer:
        t.name = mapping[t.name]
    for node in renamed.graph.node:
        node.input[:] = [mapping.get(i, i) for i in node.input]
    a = onnxfuse.merge(paths)
    b = onnxfuse.merge([paths[0], renamed])
    assert [t.raw_data for t in a.graph.initializer] == [t.raw_data for t in b.graph.initializer]


def test_fused_model_beats_chance_without_finetuning():
    x, y = val("mlp")
    fused = onnxfuse.merge(members("mlp", 2))
    assert (run(fused, x).argmax(1) == y).mean() > 0.5


def test_summary_times_each_phase(tmp_path):
    """Benchmarks compare methods on the fusion phase alone (the paper's measure), so each phase is timed."""
    written = onnxfuse.fuse(members("mlp", 2), "nt", output=tmp_path / "f.onnx").summary
    assert list(written["phases"]) == ["load", "fuse", "save"]
    assert all(v >= 0 for v in written["phases"].values())
    assert sum(written["phases"].values()) <= written["seconds"] + 1e-3
    in_memory = onnxfuse.fuse(members("mlp", 2), "ot").summary
    assert list(in_memory["phases"]) == ["import", "load", "fuse"]      # POT's import is not fusion work


def test_streamed_file_equals_the_serialized_model(tmp_path):
    """Weights are streamed into the file; the bytes are those protobuf itself would write."""
    for family in FAMILIES:
        fusion = onnxfuse.fuse(members(family, 2), "nt", output=tmp_path / f"{family}.onnx")
        assert (tmp_path / f"{family}.onnx").read_bytes() == fusion.model.SerializeToString(deterministic=True)


def test_large_outputs_use_one_external_data_file(tmp_path, monkeypatch):
    from onnxfuse.model_io import saving
    monkeypatch.setattr(saving, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "fused.onnx"
    fusion = onnxfuse.fuse(members("mlp", 2), "nt", output=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.onnx", "fused.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)
    x, _ = val("mlp")
    np.testing.assert_array_equal(run(onnx.load(out), x), run(fusion.model, x))
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in tmp_path.glob("fused.onnx*"):
        p.rename(moved / p.name)                      # the data location is relative
    np.testing.assert_array_equal(run(str(moved / "fused.onnx"), x), run(fusion.model, x))
