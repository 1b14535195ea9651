"""Hostile and careless input (issue 17): every bad input is one line on stderr, exit code 2, and no file
written; no file outside a model's folder is ever read; no read is larger than the graph declares."""
import errno
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxfuse
from onnxfuse.cli import main
from graphs import SAMPLES, gemm_mlp

MLP = [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(2)]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def files_under(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if not p.is_symlink()
            and p.is_file()} | {p: "dir" for p in folder.rglob("*") if p.is_dir()}


def refused(folder: Path, *args, says: str) -> str:
    """Run the CLI; it must exit 2 with one `onnxfuse: error:` line that says `says`, and change no file."""
    before = files_under(folder)
    result = cli(*args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("onnxfuse: error: "), result.stderr
    assert says.lower() in lines[0].lower(), lines[0]
    assert files_under(folder) == before, "a file was written or changed"
    return lines[0]


def tiny(seed=0, **kw) -> onnx.ModelProto:
    return gemm_mlp(seed, widths=(4, 6, 3), **kw)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def pair(tmp_path, first: onnx.ModelProto, second: onnx.ModelProto | None = None) -> list[Path]:
    return [save(first, tmp_path / "a.onnx"), save(second or tiny(1), tmp_path / "b.onnx")]


def external(t: TensorProto, location: str, offset=None, length=None) -> None:
    t.ClearField("raw_data")
    del t.float_data[:]
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    if offset is not None:
        t.external_data.add(key="offset", value=str(offset))
    if length is not None:
        t.external_data.add(key="length", value=str(length))


# --------------------------------------------------------------------------- security

def test_constant_node_external_data_is_confined_to_the_model_folder(tmp_path, monkeypatch):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(24, dtype=np.float32).tobytes())     # the size of the 6x4 weight
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.chdir(folder)                    # onnx's helpers would resolve against the working directory
    for location in ("../secret.bin", str(secret), "secret.bin"):
        model = tiny(0, constants_as_nodes=True)
        external(model.graph.node[0].attribute[0].t, location)
        a, b = save(model, folder / "a.onnx"), save(tiny(1, constants_as_nodes=True), folder / "b.onnx")
        message = refused(tmp_path, "merge", a, b, "-o", folder / "wide.onnx", says=location)
        assert "outside the model's folder" in message or "missing" in message
    # a tensor inside a subgraph (an If branch) is confined alike
    leak = numpy_helper.from_array(np.zeros(24, np.float32), "leak")
    external(leak, "../secret.bin")
    branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=leak)], "branch", [],
                               [helper.make_tensor_value_info("c", TensorProto.FLOAT, [24])])
    model = tiny(0)
    model.graph.node.append(helper.make_node("If", ["flag"], ["unused"], then_branch=branch, else_branch=branch))
    model.graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    refused(tmp_path, "inspect", save(model, folder / "if.onnx"), says="outside the model's folder")
    model = tiny(0)                              # and inside a model-local function
    model.functions.append(helper.make_function("local", "leaky", [], ["c"],
                                                [helper.make_node("Constant", [], ["c"], value=leak)],
                                                [helper.make_opsetid("", 17)]))
    refused(tmp_path, "inspect", save(model, folder / "function.onnx"), says="outside the model's folder")


def test_constant_external_data_inside_the_folder_is_read(tmp_path):
    model = tiny(0, constants_as_nodes=True)
    value = model.graph.node[0].attribute[0].t
    (tmp_path / "w.bin").write_bytes(value.raw_data)
    external(value, "w.bin")
    a, b = pair(tmp_path, model, tiny(1, constants_as_nodes=True))
    result = cli("merge", a, b, "-o", tmp_path / "fused.onnx")
    assert result.exit_code == 0, result.stderr
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(tmp_path / "fused.onnx", moved / "fused.onnx")
    onnx.checker.check_model(onnx.load(moved / "fused.onnx"), full_check=True)     # self-contained


def test_output_may_not_be_an_input_or_its_external_data(tmp_path):
    for name in ("digits_cnn_0.onnx", "digits_cnn_0.onnx.data", "digits_cnn_1.onnx", "digits_cnn_1.onnx.data"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    a, b = tmp_path / "digits_cnn_0.onnx", tmp_path / "digits_cnn_1.onnx"
    (tmp_path / "link.data").symlink_to(tmp_path / "digits_cnn_0.onnx.data")
    os.link(tmp_path / "digits_cnn_0.onnx.data", tmp_path / "hard.data")
    for out in ("digits_cnn_0.onnx.data", "link.data", "hard.data", "digits_cnn_0.onnx"):
        refused(tmp_path, "merge", a, b, "-o", tmp_path / out, "--force", says="overwrite")
    train = tmp_path / "train.npz"
    shutil.copy(SAMPLES / "digits_images_train.npz", train)
    refused(tmp_path, "merge", a, b, "-o", train, "--force", "--data", train, "--epochs", "0", says="overwrite")


def test_output_may_not_be_a_teachers_external_data(tmp_path):
    pytest.importorskip("torch")
    for name in ("digits_cnn_0.onnx", "digits_cnn_0.onnx.data", "digits_cnn_1.onnx", "digits_cnn_1.onnx.data"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    refused(tmp_path, "finetune", tmp_path / "digits_cnn_0.onnx", "--distill", "--teacher",
            tmp_path / "digits_cnn_1.onnx", "--data", SAMPLES / "digits_images_val.npz", "-o",
            tmp_path / "digits_cnn_1.onnx.data", "--force", says="overwrite")


# --------------------------------------------------------------------------- malformed weights

def weight(model):
    return next(t for t in model.graph.initializer if len(t.dims) == 2)


def mutated(fn):
    model = tiny(0)
    fn(model)
    return model


@pytest.mark.parametrize("case,says", [
    ("negative_dims", "negative"), ("overflowing_dims", "invalid ONNX model"), ("wrong_field", "double_data"),
    ("nul_location", "malformed"), ("long_location", "malformed"), ("loop", "cannot be used"),
    ("directory", "not a regular file"), ("fifo", "not a regular file"), ("huge_length", "holds"),
])
def test_malformed_weights(tmp_path, case, says):
    model = tiny(0)
    w = weight(model)
    if case == "negative_dims":
        w.dims[0] = -6
    elif case == "overflowing_dims":
        w.ClearField("raw_data")
        del w.dims[:]
        w.dims.extend([2 ** 32, 2 ** 32])
    elif case == "wrong_field":
        values = numpy_helper.to_array(w).ravel().tolist()
        w.ClearField("raw_data")
        w.double_data.extend(values)
    elif case == "nul_location":
        external(w, "w\0.bin")
    elif case == "long_location":
        external(w, "x" * 5000)
    elif case == "loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        external(w, "loop")
    elif case == "directory":
        (tmp_path / "dir").mkdir()
        external(w, "dir")
    elif case == "fifo":
        os.mkfifo(tmp_path / "fifo")
        external(w, "fifo")
    elif case == "huge_length":
        with open(tmp_path / "big.bin", "wb") as f:        # sparse: 10 GB declared, nothing on disk
            f.truncate(10 << 30)
        external(w, "big.bin", 0, 10 << 30)
    a, b = pair(tmp_path, model)
    refused(tmp_path, "merge", a, b, "-o", tmp_path / "out.onnx", says=says)


def test_a_file_of_zero_bytes_is_refused_at_once(tmp_path):
    zeros = tmp_path / "zeros.onnx"
    with open(zeros, "wb") as f:
        f.write(bytes(8 << 20))
    with open(tmp_path / "sparse.onnx", "wb") as f:
        f.truncate(10 << 30)
    for path in (zeros, tmp_path / "sparse.onnx"):
        start = time.perf_counter()
        refused(tmp_path, "inspect", path, says="not a readable ONNX model")
        assert time.perf_counter() - start < 1.0


def test_unused_initializer_in_one_member_only(tmp_path):
    model = tiny(1)
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "stray"))
    a, b = pair(tmp_path, tiny(0), model)
    refused(tmp_path, "merge", a, b, "-o", tmp_path / "out.onnx", says="stray")
    first = tiny(0)                               # the same unused tensor in every member: fused as the rest
    first.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "idle"))
    a, b = pair(tmp_path, first, model)
    assert cli("merge", a, b, "-o", tmp_path / "fused.onnx").exit_code == 0


def test_legacy_models_that_list_initializers_as_inputs_fuse(tmp_path):
    def legacy(seed):
        model = tiny(seed)
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in model.graph.initializer)
        model.ir_version = 3
        del model.opset_import[:]
        model.opset_import.add(domain="", version=7)
        onnx.checker.check_model(model)
        return model
    a, b = pair(tmp_path, legacy(0), legacy(1))
    result = cli("merge", a, b, "-o", tmp_path / "fused.onnx")
    assert result.exit_code == 0, result.stderr
    onnx.checker.check_model(onnx.load(tmp_path / "fused.onnx"), full_check=True)


# --------------------------------------------------------------------------- members

def with_opset(model, version):
    model.opset_import[0].version = version
    return model


def test_structural_difference_is_named_before_opsets(tmp_path):
    a, b = pair(tmp_path, tiny(0), with_opset(gemm_mlp(1, widths=(4, 6, 5, 3)), 13))
    message = refused(tmp_path, "merge", a, b, "-o", tmp_path / "out.onnx", says="nodes")
    assert "opset" not in message
    refused(tmp_path, "inspect", a, b, says="cannot be fused together")


def test_one_architecture_at_two_opsets_fuses_when_its_ops_mean_the_same(tmp_path):
    a, b = pair(tmp_path, tiny(0), with_opset(tiny(1), 16))       # Gemm, Relu, Identity: the same at 16 and 17
    result = cli("merge", a, b, "-o", tmp_path / "fused.onnx")
    assert result.exit_code == 0, result.stderr
    a, b = pair(tmp_path, tiny(0), with_opset(tiny(1), 15))       # Identity changed at 16
    refused(tmp_path, "merge", a, b, "-o", tmp_path / "out.onnx", says="opsets differ")


# --------------------------------------------------------------------------- options and usage

@pytest.fixture(autouse=True)
def _signal_handlers():
    """The CLI installs SIGTERM/SIGHUP handlers in this process; put pytest's back."""
    import signal
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


TRAIN = str(SAMPLES / "digits_train.npz")


@pytest.mark.parametrize("args,says", [
    ([], "missing argument"),
    (["--bogus"], "no such option"),
    (["--keep", "nan"], "finite"), (["--keep", "inf"], "finite"), (["--keep", "1e400"], "finite"),
    (["--keep", "0"], "finite number > 0"), (["--keep", "1.5"], "<= 1"),
    (["--lr", "-1", "--data", TRAIN], "--lr"), (["--lr", "nan", "--data", TRAIN], "--lr"),
    (["--seed", str(10 ** 23), "--data", TRAIN], "--seed"),
    (["--epochs", "-1"], "--epochs"), (["--epochs", "2"], "needs --data"),
    (["--distill"], "needs --data"), (["--batch-size", "0", "--data", TRAIN], "--batch-size"),
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--checkpoint-dir", MLP[0], "--data", TRAIN], "is a file"),
])
def test_bad_merge_options(tmp_path, args, says):
    models = MLP if args else []
    message = refused(tmp_path, "merge", *models, "-o", tmp_path / "out.onnx", *args, says=says)
    assert "Usage:" not in message and "Traceback" not in message


@pytest.mark.parametrize("args,says", [
    ([], "--data is required"),
    (["--data", TRAIN, "--epochs", "0"], "at least 1"),
    (["--data", TRAIN, "--teacher", MLP[1]], "--teacher is used only with --distill"),
])
def test_bad_finetune_options(tmp_path, args, says):
    refused(tmp_path, "finetune", MLP[0], "-o", tmp_path / "out.onnx", *args, says=says)


def test_fine_tuning_without_torch_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)      # `import torch` now fails
    refused(tmp_path, "merge", *MLP, "-o", tmp_path / "out.onnx", "--data", TRAIN, "--epochs", "1",
            says="fine-tuning needs torch: pip install 'onnxfuse[train]'")
    refused(tmp_path, "finetune", MLP[0], "-o", tmp_path / "out.onnx", "--data", TRAIN,
            says="pip install 'onnxfuse[train]'")


def test_api_refuses_empty_and_wrong_sources(tmp_path):
    for call in (lambda: onnxfuse.concat([]), lambda: onnxfuse.inspect([]),
                 lambda: onnxfuse.evaluate([], TRAIN), lambda: onnxfuse.merge(b"not a model"),
                 lambda: onnxfuse.merge([b"a", b"b"]), lambda: onnxfuse.finetune(b"x", TRAIN)):
        with pytest.raises(onnxfuse.OnnxFuseError):
            call()


# --------------------------------------------------------------------------- data

def test_bad_data_files(tmp_path):
    model = MLP[0]
    x = np.load(TRAIN)["x"][:8]
    cases = {}
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    cases["text.npz"] = "not an .npz file"
    np.savez(tmp_path / "nan.npz", x=np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x), y=np.zeros(8, int))
    cases["nan.npz"] = "NaN"
    np.savez(tmp_path / "huge_label.npz", x=x, y=np.full(8, 2 ** 64 - 1, np.uint64))
    cases["huge_label.npz"] = "too large"
    np.savez(tmp_path / "range.npz", x=x, y=np.full(8, 12))
    cases["range.npz"] = "range.npz: labels range over [12, 12]"
    np.savez(tmp_path / "unnamed.npz", features=x)
    cases["unnamed.npz"] = "name it 'x')"
    for name, says in cases.items():
        refused(tmp_path, "eval", model, "--data", tmp_path / name, says=says)


def zip_entry(archive: zipfile.ZipFile, name: str, header_shape, payload: bytes, declared: int | None = None):
    header = np.lib.format.header_data_from_array_1_0(np.zeros(0, np.float32))
    header["shape"] = tuple(header_shape)
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    archive.writestr(name, buf.getvalue() + payload)


def test_npz_reads_only_the_arrays_it_needs_and_no_more_than_they_declare(tmp_path):
    x = np.load(TRAIN)["x"][:8].astype(np.float32)
    path = tmp_path / "bomb.npz"
    np.savez(path, x=x, y=np.zeros(8, np.int64))
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive:    # 4 GB of zeros, never to be read
        zip_entry(archive, "junk.npy", (1 << 30,), b"")
    rows = onnxfuse.evaluate([MLP[0]], str(path))
    assert rows[0]["accuracy"] is not None
    liar = tmp_path / "liar.npz"
    with zipfile.ZipFile(liar, "w") as archive:              # its header claims 4 GB in an entry of 80 bytes
        zip_entry(archive, "x.npy", (1 << 28, 4), b"\0" * 16)
    refused(tmp_path, "eval", MLP[0], "--data", liar, says="declares shape")


# --------------------------------------------------------------------------- output files

def test_output_file_errors_are_clean(tmp_path, monkeypatch):
    from onnxfuse.model_io import saving
    out = tmp_path / "out.onnx"
    refused(tmp_path, "merge", *MLP, "-o", tmp_path / ("n" * 300 + ".onnx"), says="not a usable output path")
    long_name = tmp_path / ("n" * 250 + ".onnx")
    assert cli("merge", *MLP, "-o", long_name).exit_code == 0 and long_name.is_file()
    long_name.unlink()

    def fail(error):
        def raiser(*args, **kwargs):
            raise OSError(error, os.strerror(error))
        return raiser
    with monkeypatch.context() as m:                          # root ignores permissions: simulate them
        m.setattr(saving.tempfile, "mkdtemp", fail(errno.EACCES))
        refused(tmp_path, "merge", *MLP, "-o", out, says="permission denied")
    with monkeypatch.context() as m:
        m.setattr(saving, "_write_streaming", fail(errno.ENOSPC))
        refused(tmp_path, "merge", *MLP, "-o", out, says="no space left")
    with monkeypatch.context() as m:
        m.setattr(saving.os, "link", fail(errno.EXDEV))
        m.setattr(saving.os, "replace", fail(errno.EXDEV))
        refused(tmp_path, "merge", *MLP, "-o", out, says="cross-device")


def test_two_runs_racing_on_one_new_output_cannot_both_succeed(tmp_path, monkeypatch):
    from onnxfuse.model_io import saving
    out = tmp_path / "out.onnx"
    streaming = saving._write_streaming

    def the_other_run_finishes_first(f, *args):
        out.write_bytes(b"the other run's model")
        streaming(f, *args)
    monkeypatch.setattr(saving, "_write_streaming", the_other_run_finishes_first)
    result = cli("merge", *MLP, "-o", out)
    assert result.exit_code == 2 and "already exists" in result.stderr, result.stderr
    assert out.read_bytes() == b"the other run's model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_external_data_file_is_never_replaced_without_force_nor_left_mismatched(tmp_path, monkeypatch):
    from onnxfuse.model_io import saving
    monkeypatch.setattr(saving, "EXTERNAL_DATA_THRESHOLD", 1000)
    out, data = tmp_path / "out.onnx", tmp_path / "out.onnx.data"
    data.write_bytes(b"someone's weights")
    refused(tmp_path, "merge", *MLP, "-o", out, says="out.onnx.data: already exists")
    out.write_bytes(b"old model")
    replace = os.replace

    def interrupted_before_the_model(source, target):
        if Path(target) == out:
            raise KeyboardInterrupt
        replace(source, target)
    monkeypatch.setattr(saving.os, "replace", interrupted_before_the_model)
    result = cli("merge", *MLP, "-o", out, "--force")
    assert result.exit_code == 130
    assert not out.exists() and data.read_bytes() != b"someone's weights"     # never old .onnx + new .data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx.data"]     # no temporary folder left


def test_sighup_while_writing_leaves_no_temporary_file(tmp_path, monkeypatch):
    import signal
    from onnxfuse.model_io import saving
    streaming = saving._write_streaming

    def hangup(f, *args):
        streaming(f, *args)
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(1)
    monkeypatch.setattr(saving, "_write_streaming", hangup)
    result = cli("merge", *MLP, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_paths_read_by_eval_teacher_and_val_are_checked_like_members(tmp_path):
    model = tiny(0)
    external(weight(model), "../secret.bin")
    folder = tmp_path / "models"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(bytes(96))
    evil = save(model, folder / "evil.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((4, 4), np.float32), y=np.zeros(4, np.int64))
    refused(tmp_path, "eval", save(tiny(1), folder / "good.onnx"), evil, "--data", data, says="outside the model's folder")


# --------------------------------------------------------------------------- checkpoints

class Pwn:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_never_unpickles_code_and_refuses_a_corrupt_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    marker = tmp_path / "pwned"
    args = ("merge", *MLP, "-o", tmp_path / "out.onnx", "--data", TRAIN, "--epochs", "1", "--checkpoint-dir",
            folder, "--resume")
    torch.save({"fingerprint": "x", "epoch": Pwn(marker)}, folder / "onnxfuse-finetune.pt")
    refused(tmp_path, *args, says="not a readable onnxfuse checkpoint")
    assert not marker.exists()
    (folder / "onnxfuse-finetune.pt").write_bytes(os.urandom(1000))
    refused(tmp_path, *args, says="not a readable onnxfuse checkpoint")


def test_resume_from_a_weights_only_checkpoint_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from onnxfuse import training
    base = ("merge", *MLP, "--data", TRAIN, "--batch-size", "256", "--optimizer", "adam", "--epochs", "2", "--quiet")
    ckpt = tmp_path / "ckpt"
    save_state = training.Checkpoints.save

    def stop_after_epoch_1(self, epoch, *args):
        save_state(self, epoch, *args)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(training.Checkpoints, "save", stop_after_epoch_1)
        assert cli(*base, "-o", tmp_path / "resumed.onnx", "--checkpoint-dir", ckpt).exit_code == 130
    refused(tmp_path, *base, "-o", tmp_path / "x.onnx", "--lr", "0.01", "--checkpoint-dir", ckpt, "--resume",
            says="belongs to another run")
    result = cli(*base, "-o", tmp_path / "resumed.onnx", "--checkpoint-dir", ckpt, "--resume")
    assert result.exit_code == 0, result.stderr
    assert cli(*base, "-o", tmp_path / "straight.onnx").exit_code == 0
    assert (tmp_path / "resumed.onnx").read_bytes() == (tmp_path / "straight.onnx").read_bytes()


def test_a_symlinked_model_reads_its_data_from_one_folder_everywhere(tmp_path):
    real, links = tmp_path / "real", tmp_path / "links"
    real.mkdir()
    links.mkdir()
    for i in range(2):
        model = tiny(i)
        onnx.save(model, real / f"m{i}.onnx", save_as_external_data=True, location=f"m{i}.data", size_threshold=0)
        (links / f"m{i}.onnx").symlink_to(real / f"m{i}.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((4, 4), np.float32), y=np.zeros(4, np.int64))
    paths = [links / "m0.onnx", links / "m1.onnx"]
    assert cli("merge", *paths, "-o", tmp_path / "fused.onnx").exit_code == 0
    result = cli("eval", *paths, "--data", data)
    assert result.exit_code == 0, result.stderr


def test_a_shared_tensor_error_names_the_model(tmp_path):
    def shared(seed):
        model = gemm_mlp(seed, widths=(4, 4, 4, 3))
        unused = model.graph.node[2].input[1]
        model.graph.node[2].input[1] = model.graph.node[0].input[1]     # one weight for two layers
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == unused))
        return model
    a, b = pair(tmp_path, shared(0), shared(1))
    refused(tmp_path, "merge", a, b, "-o", tmp_path / "out.onnx", says="a.onnx: tensor 'w1' is shared")


# --------------------------------------------------------------------------- reports

def test_reports_say_what_was_done(tmp_path):
    import json
    val = str(SAMPLES / "digits_val.npz")
    result = cli("merge", *MLP, "-o", tmp_path / "f.onnx", "--val", val, "--json")
    summary = json.loads(result.stdout)
    assert summary["keep"] == 0.5 and "tune" not in summary["phases"] and "score" in summary["phases"]
    text = cli("merge", *MLP, "-o", tmp_path / "g.onnx", "--val", val).stdout
    assert "before fine-tuning" not in text and "  result " in text
    assert list(onnxfuse.fuse(MLP, "ot").summary["phases"]) == ["import", "load", "fuse"]   # POT: not "fuse"


def test_millions_of_tiny_fields_are_refused_before_protobuf_parses_them(tmp_path):
    model = onnx.load(MLP[0])
    graph = model.graph.SerializeToString() + b"\x6a\x00" * 1_200_000      # empty value_info entries
    model.ClearField("graph")
    stuffed = tmp_path / "stuffed.onnx"
    from google.protobuf.internal.encoder import _VarintBytes
    stuffed.write_bytes(model.SerializeToString() + b"\x3a" + _VarintBytes(len(graph)) + graph)
    start = time.perf_counter()
    refused(tmp_path, "inspect", stuffed, says="more than 1000000 entries of field 13")
    assert time.perf_counter() - start < 15


def test_eval_of_models_with_other_inputs_or_bad_weights_is_a_clean_error(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((4, 4), np.float32), y=np.zeros(4, np.int64))
    other = gemm_mlp(1, widths=(5, 6, 3))                                  # 5 inputs, not 4
    refused(tmp_path, "eval", save(tiny(0), tmp_path / "a.onnx"), save(other, tmp_path / "b.onnx"), "--data", data,
            says="b.onnx: onnxruntime cannot run it")


def test_without_onnxruntime_inspect_works_and_what_runs_models_names_the_extra(tmp_path):
    """merge runs its result in onnxruntime before writing it (never a file that does not run): without
    onnxruntime it says which extra to install and writes nothing, like eval."""
    import json
    import subprocess
    import sys
    script = (
        "import json, sys; sys.modules['onnxruntime'] = None\n"        # `import onnxruntime` now fails
        "from click.testing import CliRunner\n"
        "from onnxfuse.cli import main\n"
        "a, b, out, data = sys.argv[1:]\n"
        "runs = [CliRunner().invoke(main, args) for args in (['inspect', a, b], ['merge', a, b, '-o', out],\n"
        "                                                    ['eval', a, '--data', data])]\n"
        "print(json.dumps([[r.exit_code, r.stderr] for r in runs]))\n")
    result = subprocess.run([sys.executable, "-c", script, *MLP, str(tmp_path / "f.onnx"), TRAIN],
                            capture_output=True, text=True, timeout=120)
    (inspected, inspect_err), (merged, merge_err), (evaluated, eval_err) = json.loads(result.stdout.splitlines()[-1])
    assert inspected == 0, inspect_err
    needs = "onnxfuse: error: this needs onnxruntime: pip install 'onnxfuse[cpu]' (or 'onnxfuse[gpu]' for CUDA; never both)"
    assert merged == 2 and merge_err.strip() == needs and not (tmp_path / "f.onnx").exists(), merge_err
    assert evaluated == 2 and eval_err.strip() == needs, eval_err
