"""`onnxfuse bench`: latency / throughput / size / memory rows for models, an ensemble and its wide graph."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxfuse
from onnxfuse._bench_probe import make_session, random_feeds
from onnxfuse.bench import _Entry, _time_interleaved, check_providers
from onnxfuse.errors import OnnxFuseError

from graphs import SAMPLES, cli

MLP = [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(2)]
CNN = [str(SAMPLES / f"digits_cnn_{i}.onnx") for i in range(2)]
FAST = ["--seconds", "0.02", "--warmup", "1"]
FIELDS = {"name", "kind", "sessions", "batch_size", "provider", "providers", "threads", "p50_ms", "p90_ms", "p99_ms",
          "mean_ms", "throughput", "runs", "file_bytes", "peak_memory_bytes", "p50_vs_first", "note"}


def onnxfuse_cli(*args):
    return cli("bench", *args)


def test_json_rows_for_models_ensemble_and_wide_graph():
    result = onnxfuse_cli(MLP[0], "--ensemble", *MLP, "--batch-size", "1,4", "--json", *FAST)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["kind"], r["batch_size"]) for r in rows] == [
        ("model", 1), ("ensemble", 1), ("wide", 1), ("model", 4), ("ensemble", 4), ("wide", 4)]
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["providers"][0] == "CPUExecutionProvider" and r["provider"] == "cpu" and r["threads"] == 1
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["runs"] >= 3 and r["throughput"] > 0
        assert r["peak_memory_bytes"] > 0
    model, ens, wide = rows[:3]
    assert model["name"] == "digits_mlp_0.onnx" and model["p50_vs_first"] == 1.0 and model["sessions"] == 1
    assert ens["sessions"] == 2 and ens["file_bytes"] == 2 * model["file_bytes"]
    assert wide["sessions"] == 1 and wide["name"].startswith("wide graph of 2") and wide["note"] is None
    assert ens["p50_ms"] > model["p50_ms"]       # two session runs per request cost more than one


def test_table_and_file_size_with_external_data():
    result = onnxfuse_cli(CNN[0], CNN[1], "--batch-size", "2", "--no-memory", *FAST)
    assert result.returncode == 0, result.stderr
    assert "CPUExecutionProvider" in result.stdout and "p50 ms" in result.stdout
    assert "digits_cnn_0.onnx" in result.stdout and "digits_cnn_1.onnx" in result.stdout
    rows = onnxfuse.benchmark(CNN[:1], batch_sizes=[2], seconds=0.02, warmup=0, memory=False)
    size = (SAMPLES / "digits_cnn_0.onnx").stat().st_size + (SAMPLES / "digits_cnn_0.onnx.data").stat().st_size
    assert rows[0]["file_bytes"] == size and rows[0]["peak_memory_bytes"] is None


def test_wide_row_skipped_with_a_note_when_members_cannot_be_concatenated():
    result = onnxfuse_cli("--ensemble", CNN[0], MLP[0], "--batch-size", "1", "--json", "--no-memory", *FAST)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["kind"] for r in rows] == ["ensemble", "wide"]
    assert rows[1]["skipped"] and rows[1]["p50_ms"] is None and "cannot be concatenated" in rows[1]["note"]
    text = onnxfuse_cli("--ensemble", CNN[0], MLP[0], "--batch-size", "1", "--no-memory", *FAST).stdout
    assert "note: wide graph of 2 (concat): skipped" in text


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_without_cuda_is_one_line_and_exit_2():
    result = onnxfuse_cli(MLP[0], "--provider", "cuda", *FAST)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_silent_fallback_to_cpu_is_refused():
    check_providers("m", "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    check_providers("m", "cpu", ["CPUExecutionProvider"])
    with pytest.raises(OnnxFuseError, match="fell back to CPUExecutionProvider"):
        check_providers("m", "cuda", ["CPUExecutionProvider"])


@pytest.mark.parametrize("args, says", [
    ((), "nothing to benchmark"),
    (("--ensemble", MLP[0]), "at least 2"),
    (("missing.onnx",), "no such file"),
])
def test_errors_are_one_line(args, says):
    result = onnxfuse_cli(*args, *FAST)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr


def test_ensemble_option_takes_the_files_that_follow_it():
    rows = json.loads(onnxfuse_cli(MLP[1], "--ensemble", *MLP, "--batch-size", "1", "--json", "--no-memory",
                                   *FAST).stdout)
    assert [r["name"] for r in rows] == ["digits_mlp_1.onnx", "ensemble of 2 (2 sessions)", "wide graph of 2 (concat)"]


def test_random_inputs_follow_the_graph_inputs(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["x", "ids_f"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    path = tmp_path / "two_inputs.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    feeds = random_feeds(make_session(str(path), ["CPUExecutionProvider"], 1), batch=5)
    assert feeds["x"].shape == (5, 3) and feeds["x"].dtype == np.float32 and feeds["x"].std() > 0
    assert feeds["ids"].shape == (5, 1) and feeds["ids"].dtype == np.int64 and not feeds["ids"].any()
    rows = onnxfuse.benchmark([path], batch_sizes=[5], seconds=0.02, warmup=1, memory=False)
    assert rows[0]["runs"] > 0


def test_timing_rounds_interleave_the_models():
    calls = []
    entries = [_Entry(name, "model", [], 0) for name in "ABC"]
    for e in entries:
        e.request = (lambda name: lambda feeds: calls.append(name))(e.name)
    times = _time_interleaved(entries, [None] * 3, warmup=0, seconds=0.0003)
    assert all(len(t) >= 3 for t in times)
    runs = [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]   # one letter per time slice
    assert len(runs) >= 9 and set(runs[:3]) == set("ABC") and runs[3] == "B"


def test_float_int8_and_fp16_side_by_side_with_accuracy_and_a_plot(tmp_path):
    calib, val = str(SAMPLES / "digits_images_train.npz"), str(SAMPLES / "digits_images_val.npz")
    int8, fp16 = tmp_path / "m.int8.onnx", tmp_path / "m.fp16.onnx"
    onnxfuse.quantize(CNN[0], int8, calibrate=calib)
    onnxfuse.quantize(CNN[0], fp16, mode="fp16")
    plot = tmp_path / "edge.png"
    out = onnxfuse_cli(CNN[0], int8, fp16, "--ensemble", *CNN, "--data", val, "--plot", plot, "--batch-size", "1",
                       "--no-memory", *FAST, "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    expected = {p: onnxfuse.evaluate([p], val)[0]["accuracy"] for p in (CNN[0], int8, fp16)}
    for path, acc in expected.items():
        assert rows[onnx_name(path)]["accuracy"] == pytest.approx(acc)
    assert rows["ensemble of 2 (2 sessions)"]["accuracy"] == pytest.approx(
        onnxfuse.evaluate(CNN, val, ensemble=True)[-1]["accuracy"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_data = onnxfuse_cli(CNN[0], "--plot", tmp_path / "p.png", *FAST)
    assert no_data.returncode == 2 and no_data.stderr.count("\n") == 1 and "--plot needs --data" in no_data.stderr


def onnx_name(path):
    return __import__("pathlib").Path(path).name
