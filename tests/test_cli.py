"""The command line as a user types it, and its errors: one line, exit code 2, nothing written. Commands run in
this process (graphs.cli); the tests of the entry points and a merge and an error as the terminal sees them start
a process."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import SAMPLES, Builder, cli as onnxfuse, cnn, gemm_mlp

ROOT = Path(__file__).resolve().parent.parent
MLP = [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(3)]
CNN = [str(SAMPLES / f"digits_cnn_{i}.onnx") for i in range(3)]


def process(*args):
    """`python -m onnxfuse ARGS` in a process of its own."""
    return subprocess.run([sys.executable, "-m", "onnxfuse", *map(str, args)], capture_output=True, text=True)


def expect_error(tmp_path, *args, says, run=onnxfuse):
    out = tmp_path / "out.onnx"
    result = run(*args, "-o", out) if args[0] != "inspect" else run(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert says.lower() in lines[0].lower(), lines[0]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))] == []
    return lines[0]


def test_merge_prints_what_it_did(tmp_path):
    result = process("merge", MLP[0], MLP[1], "-o", tmp_path / "fused.onnx")
    assert result.returncode == 0, result.stderr
    assert "neuron transplantation" in result.stdout and "kept" in result.stdout
    onnx.checker.check_model(str(tmp_path / "fused.onnx"), full_check=True)


def test_json_summary(tmp_path):
    result = onnxfuse("merge", *CNN, "-o", tmp_path / "fused.onnx", "--json")
    summary = json.loads(result.stdout)
    assert summary["method"] == "nt" and len(summary["members"]) == 3
    assert all(g["kept"] == g["width"] for g in summary["groups"])


def test_quiet_prints_nothing(tmp_path):
    result = onnxfuse("concat", *MLP[:2], "-o", tmp_path / "wide.onnx", "--quiet")
    assert result.returncode == 0 and result.stdout == ""


def test_prune_and_inspect(tmp_path):
    assert onnxfuse("prune", CNN[0], "--keep", "0.5", "-o", tmp_path / "small.onnx").returncode == 0
    dims = {t.name: list(t.dims) for t in onnx.load(tmp_path / "small.onnx").graph.initializer}
    assert dims["0.weight"][0] == 4 and dims["4.weight"][:2] == [8, 4]
    report = json.loads(onnxfuse("inspect", *CNN, "--json").stdout)
    assert report["compatible"] and report["fusable"] and report["exact"]
    text = onnxfuse("inspect", CNN[0]).stdout
    assert "reaches graph output 'logits'" in text and "can be fused: yes" in text


@pytest.mark.slow                  # three processes
def test_entry_points_agree(tmp_path):
    via_module = process("--help").stdout
    via_shim = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--help"], capture_output=True, text=True)
    assert via_module == via_shim.stdout and "merge" in via_module
    for cmd in ("merge", "concat", "prune", "inspect"):
        assert onnxfuse(cmd, "--help").returncode == 0


def test_merge_does_not_import_torch(tmp_path):
    code = ("import sys, onnxfuse; onnxfuse.merge(sys.argv[1:3], output=sys.argv[3]); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code, *MLP[:2], str(tmp_path / "f.onnx")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- bad input

def test_missing_file(tmp_path):
    expect_error(tmp_path, "merge", MLP[0], tmp_path / "nope.onnx", says="nope.onnx: no such file", run=process)


def test_not_onnx_and_truncated(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("hello, I am not a model\n" * 20)
    expect_error(tmp_path, "merge", MLP[0], text, says="notes.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(Path(MLP[1]).read_bytes()[:3000])
    expect_error(tmp_path, "merge", MLP[0], truncated, says="truncated.onnx")
    expect_error(tmp_path, "inspect", tmp_path, says="not a regular file")


def test_different_architectures(tmp_path):
    msg = expect_error(tmp_path, "merge", MLP[0], CNN[0], says="digits_cnn_0.onnx")
    assert "digits_mlp_0.onnx" in msg


def test_different_widths_name_the_tensor(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(gemm_mlp(0, widths=(6, 8, 7, 3)), a)
    onnx.save(gemm_mlp(1, widths=(6, 9, 7, 3)), b)
    msg = expect_error(tmp_path, "merge", a, b, says="shape")
    assert "Gemm" in msg and "a.onnx" in msg and "b.onnx" in msg


def test_fewer_than_two_members(tmp_path):
    expect_error(tmp_path, "merge", MLP[0], says="at least 2 models")


def test_unsupported_op_touching_a_layer(tmp_path):
    paths = []
    for seed in range(2):
        b = Builder(seed)
        h = b.op("Gemm", ["x", b.weight((5, 4)), b.weight((5,))], transB=1)
        h = b.op("LpNormalization", [h], axis=1)
        h = b.op("Gemm", [h, b.weight((3, 5)), b.weight((3,))], transB=1)
        paths.append(tmp_path / f"m{seed}.onnx")
        onnx.save(b.model(["batch", 4], h, ["batch", 3]), paths[-1])
    msg = expect_error(tmp_path, "merge", *paths, says="LpNormalization")
    assert "node 'LpNormalization_" in msg
    report = json.loads(onnxfuse("inspect", *paths, "--json").stdout)
    assert not report["fusable"] and any("LpNormalization" in w for g in report["groups"] for w in g["why_fixed"])


def test_quantized_and_integer_models(tmp_path):
    model = gemm_mlp(0)
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("z", TensorProto.UINT8, [], [0])
    model.graph.initializer.extend([scale, zero])
    q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="quant")
    dq = helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dequant")
    model.graph.node[0].input[0] = "xd"
    model.graph.node.insert(0, dq)
    model.graph.node.insert(0, q)
    path = tmp_path / "q.onnx"
    onnx.save(model, path)
    expect_error(tmp_path, "merge", path, path, says="quantized")
    ints = tmp_path / "int.onnx"
    w = numpy_helper.from_array(np.ones((3, 3), np.int32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.INT32, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 3])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), ints)
    expect_error(tmp_path, "merge", ints, ints, says="integer-only")


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "exists.onnx"
    out.write_bytes(b"precious")
    result = onnxfuse("merge", *MLP[:2], "-o", out)
    assert result.returncode == 2 and "--force" in result.stderr and out.read_bytes() == b"precious"
    assert onnxfuse("merge", *MLP[:2], "-o", out, "--force").returncode == 0
    onnx.checker.check_model(str(out))


def test_output_equal_to_input(tmp_path):
    a = tmp_path / "a.onnx"
    a.write_bytes(Path(MLP[0]).read_bytes())
    before = a.read_bytes()
    result = onnxfuse("merge", a, MLP[1], "-o", a, "--force")
    assert result.returncode == 2 and "overwrite the input" in result.stderr
    assert a.read_bytes() == before


def test_external_data_outside_the_folder_is_refused(tmp_path):
    model = cnn(0)
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.data", size_threshold=0)
    m = onnx.load(tmp_path / "ext.onnx", load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    onnx.save(m, tmp_path / "evil.onnx")
    expect_error(tmp_path, "inspect", tmp_path / "evil.onnx", says="outside the model's folder")
