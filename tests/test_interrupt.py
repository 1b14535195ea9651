"""Interruption: Ctrl-C or a kill during fine-tuning leaves no output; --resume continues to the same result."""
import signal
import subprocess
import sys
import time

import pytest

from graphs import SAMPLES

pytest.importorskip("torch")
pytestmark = pytest.mark.slow       # signals need a process of their own; each trains for seconds
CNN = [str(SAMPLES / f"digits_cnn_{i}.onnx") for i in range(2)]
TRAIN = str(SAMPLES / "digits_images_train.npz")


def command(out, *extra):
    return [sys.executable, "-m", "onnxfuse", "merge", *CNN, "-o", str(out), "--data", TRAIN, "--epochs", "6",
            "--batch-size", "8", "--quiet", *extra]


def _as_from_a_terminal():
    """Ctrl-C reaches a process run from a terminal; a job started in the background by a non-interactive shell
    (as CI may start this suite) inherits SIGINT ignored, and Python then keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_interrupted_finetuning_writes_nothing_and_resumes_to_the_same_model(tmp_path, sig):
    out, checkpoints = tmp_path / "fused.onnx", tmp_path / "checkpoints"
    proc = subprocess.Popen(command(out, "--checkpoint-dir", str(checkpoints)), stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_terminal)
    deadline = time.time() + 120
    while not (checkpoints / "onnxfuse-finetune.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted; nothing was written" in stderr and "Traceback" not in stderr
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoints"]          # no output, no temporary files

    if sig == signal.SIGTERM:
        return
    resumed = subprocess.run(command(out, "--checkpoint-dir", str(checkpoints), "--resume"), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(command(tmp_path / "straight.onnx"), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    assert out.read_bytes() == (tmp_path / "straight.onnx").read_bytes()


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    first = subprocess.run(command(tmp_path / "a.onnx", "--checkpoint-dir", str(checkpoints)), capture_output=True,
                           text=True)
    assert first.returncode == 0, first.stderr
    other = subprocess.run(command(tmp_path / "b.onnx", "--checkpoint-dir", str(checkpoints), "--resume",
                                   "--lr", "0.01"), capture_output=True, text=True)
    assert other.returncode == 2 and "belongs to another run" in other.stderr
    assert not (tmp_path / "b.onnx").exists()
