"""Data-parallel fine-tuning: two CPU processes under torchrun (gloo), rank 0 writes, the ranks agree."""
import json
import socket
import subprocess
import sys

import numpy as np
import onnx
import pytest

from graphs import SAMPLES, run

pytest.importorskip("torch")
pytestmark = pytest.mark.slow       # torchrun and fresh processes: start-ups dominate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "fused.onnx"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()),
           "-m", "onnxfuse", "merge", str(SAMPLES / "digits_cnn_0.onnx"), str(SAMPLES / "digits_cnn_1.onnx"),
           "-o", str(out), "--data", str(SAMPLES / "digits_images_train.npz"),
           "--val", str(SAMPLES / "digits_images_val.npz"), "--epochs", "3", "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    start = result.stdout.index("{")
    summary = json.loads(result.stdout[start:])                 # one summary: rank 0 only prints
    assert result.stdout.count('"phases"') == 1
    options = summary["training"]["options"]
    assert options["processes"] == 2 and options["ranks_agree"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["fused.onnx"]
    onnx.checker.check_model(str(out), full_check=True)
    val = np.load(SAMPLES / "digits_images_val.npz")
    accuracy = (run(onnx.load(out), val["x"]).argmax(1) == val["y"]).mean()
    assert accuracy == pytest.approx(summary["accuracy"]["result after fine-tuning"]["accuracy"])
    assert accuracy > summary["accuracy"]["result before fine-tuning"]["accuracy"] + 0.3


def test_cuda_requests_say_clearly_when_there_is_no_cuda(tmp_path):
    import torch
    import onnxruntime as ort
    data = str(SAMPLES / "digits_val.npz")
    model = str(SAMPLES / "digits_mlp_0.onnx")
    evaluated = subprocess.run([sys.executable, "-m", "onnxfuse", "eval", model, "--data", data, "--provider", "cuda"],
                               capture_output=True, text=True)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert evaluated.returncode == 0, evaluated.stderr
    else:
        assert evaluated.returncode == 2 and "CUDA was asked for" in evaluated.stderr
    tuned = subprocess.run([sys.executable, "-m", "onnxfuse", "finetune", model, "--data",
                            str(SAMPLES / "digits_train.npz"), "-o", str(tmp_path / "t.onnx"), "--epochs", "1",
                            "--device", "cuda"], capture_output=True, text=True)
    if torch.cuda.is_available():
        assert tuned.returncode == 0, tuned.stderr
    else:
        assert tuned.returncode == 2 and "torch sees no CUDA device" in tuned.stderr
        assert not (tmp_path / "t.onnx").exists()


def test_torchrun_soup_one_copy_per_process_equals_the_one_process_soup(tmp_path):
    """--soup 2 under torchrun with 2 processes: each trains one copy alone (no gradient all-reduce), averaged
    after every epoch (periodic averaging: the processes exchange their copies each round); the soup written by
    rank 0 is byte for byte the soup one process makes of the same copies in turn."""
    args = ["merge", str(SAMPLES / "digits_mlp_0.onnx"), str(SAMPLES / "digits_mlp_1.onnx"), "--data",
            str(SAMPLES / "digits_train.npz"), "--epochs", "1", "--soup", "2", "--soup-epochs", "2",
            "--soup-average-every", "1", "--lr", "0.05", "--json"]
    two, one = tmp_path / "two.onnx", tmp_path / "one.onnx"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(free_port()), "-m", "onnxfuse"]
    result = subprocess.run(torchrun + args + ["-o", str(two)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["soup"]["processes"] == 2 and summary["soup"]["kept"] == [0, 1]
    assert summary["soup"]["rounds"] == 2 and summary["soup"]["averaged_every"] == 1
    single = subprocess.run([sys.executable, "-m", "onnxfuse", *args, "-o", str(one)], capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert two.read_bytes() == one.read_bytes()
    wrong = subprocess.run(torchrun[:4] + ["3"] + torchrun[5:8] + [str(free_port())] + torchrun[9:] + args +
                           ["-o", str(tmp_path / "three.onnx")], capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "start 2 processes, not 3" in wrong.stderr
