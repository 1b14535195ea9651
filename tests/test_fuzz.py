"""A bounded fuzz run: mutated model files fed to inspect and merge must give a clear error or a correct
result, never a crash, a hang, a memory blow-up or a read outside the model's folder."""
import json
import random
import shutil
import subprocess
import sys
import textwrap

import onnx
import pytest

from graphs import SAMPLES

DRIVER = textwrap.dedent("""
    import json, resource, sys, traceback
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))     # a memory blow-up fails, not the machine
    import onnx, onnxfuse
    partner, cases = sys.argv[1], sys.argv[2:]
    for path in cases:
        print(json.dumps({"case": path, "phase": "start"}), flush=True)
        try:
            onnxfuse.inspect([path])
            fused = onnxfuse.merge([path, partner])
            onnx.checker.check_model(fused, full_check=True)
            outcome = "ok"
        except onnxfuse.OnnxFuseError as exc:
            outcome = "error: " + str(exc).splitlines()[0]
        except Exception as exc:
            outcome = "CRASH: " + type(exc).__name__ + ": " + str(exc)[:300] + traceback.format_exc()[-800:]
        print(json.dumps({"case": path, "outcome": outcome}), flush=True)
""")


def byte_mutations(data: bytes, rng: random.Random, count: int):
    for i in range(count):
        kind = i % 4
        buf = bytearray(data)
        if kind == 0:
            buf = buf[:rng.randrange(len(buf))]
        elif kind == 1:
            for _ in range(rng.randint(1, 12)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif kind == 2:
            pos = rng.randrange(len(buf))
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:
            buf = bytearray(rng.randbytes(rng.randint(1, 4096)))
        yield f"bytes{i}", bytes(buf)


def structural_mutations(model: onnx.ModelProto):
    def mutant(fn):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        fn(m)
        return m.SerializeToString()

    w = model.graph.initializer[0].name

    def set_dtype(m):
        m.graph.initializer[0].data_type = onnx.TensorProto.INT8

    def cycle(m):
        m.graph.node[0].input[0] = m.graph.node[-1].output[0]

    def dangling(m):
        m.graph.node[1].input[0] = "nowhere"

    def absurd(m):
        t = m.graph.initializer[0]
        del t.dims[:]
        t.dims.extend([1 << 40, 1 << 20])

    def absurd_input(m):
        m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1 << 40

    def no_nodes(m):
        del m.graph.node[:]

    def duplicate_output(m):
        m.graph.node[1].output[0] = m.graph.node[0].output[0]

    def bad_attribute(m):
        m.graph.node[0].attribute.add(name="transB", type=onnx.AttributeProto.STRING, s=b"yes")

    def outside(location):
        def fn(m):
            t = m.graph.initializer[0]
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.add(key="location", value=location)
        return fn

    def huge_offset(m):
        outside("digits_cnn_0.onnx.data")(m)
        m.graph.initializer[0].external_data.add(key="offset", value=str(1 << 50))

    cases = {"dtype": set_dtype, "cycle": cycle, "dangling": dangling, "absurd_dims": absurd,
             "absurd_input": absurd_input, "no_nodes": no_nodes, "duplicate_output": duplicate_output,
             "bad_attribute": bad_attribute, "parent_dir": outside("../secret.bin"),
             "absolute": outside("/etc/passwd"), "huge_offset": huge_offset,
             "missing_file": outside("missing.bin"), "empty_location": outside("")}
    for name, fn in cases.items():
        yield name, mutant(fn)
    assert w


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_fuzzed_models_give_errors_not_crashes(family, tmp_path):
    rng = random.Random(1234)
    work = tmp_path / "models"
    work.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\x01" * 4096)      # outside the model folder: must never be read
    source = SAMPLES / f"digits_{family}_0.onnx"
    for extra in SAMPLES.glob(f"digits_{family}_0.onnx.data"):
        shutil.copy(extra, work / extra.name)
    partner = str(SAMPLES / f"digits_{family}_1.onnx")
    cases = []
    mutations = list(byte_mutations(source.read_bytes(), rng, 80)) + \
        list(structural_mutations(onnx.load(source)))
    for name, data in mutations:
        path = work / f"{name}.onnx"
        path.write_bytes(data)
        cases.append(str(path))
    proc = subprocess.run([sys.executable, "-c", DRIVER, partner, *cases], capture_output=True, text=True,
                          timeout=300)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    outcomes = {e["case"]: e["outcome"] for e in events if "outcome" in e}
    started = [e["case"] for e in events if e.get("phase") == "start"]
    assert proc.returncode == 0, f"the fuzz driver died (code {proc.returncode}) on {started[-1:]}: {proc.stderr[-2000:]}"
    assert len(outcomes) == len(cases)
    crashes = {c: o for c, o in outcomes.items() if o.startswith("CRASH")}
    assert not crashes, crashes
    by_name = {c.rsplit("/", 1)[1][:-5]: o for c, o in outcomes.items()}
    for name in ("parent_dir", "absolute"):
        assert "outside the model's folder" in by_name[name], by_name[name]
    for name in ("cycle", "dangling", "absurd_dims", "no_nodes", "huge_offset", "missing_file"):
        assert by_name[name].startswith("error"), (name, by_name[name])
