"""Refactors must not change what onnxfuse writes: the sample outputs are pinned by their sha256.

If a change is *meant* to change these bytes (a new rule, a different selection), update the pins in the
same commit and say why in its message. Fine-tuned outputs are not pinned here (the recipe may evolve);
test_samples checks that they are reproducible."""
import hashlib

import pytest

import onnxfuse
from graphs import SAMPLES

MLP = [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(2)]
CNN = [str(SAMPLES / f"digits_cnn_{i}.onnx") for i in range(2)]

CASES = {
    "merge-mlp": lambda out: onnxfuse.merge(MLP, output=out),
    "merge-cnn": lambda out: onnxfuse.merge(CNN, output=out),
    "concat-mlp": lambda out: onnxfuse.concat(MLP, output=out),
    "concat-cnn": lambda out: onnxfuse.concat(CNN, output=out),
    "prune-mlp": lambda out: onnxfuse.prune(MLP[0], keep=0.5, output=out),
    "prune-cnn": lambda out: onnxfuse.prune(CNN[0], keep=0.5, output=out),
    "calibrate-mlp": lambda out: onnxfuse.merge(MLP, output=out, calibrate=str(SAMPLES / "digits_train.npz")),
    "calibrate-cnn": lambda out: onnxfuse.merge(CNN, output=out,
                                                calibrate=str(SAMPLES / "digits_images_train.npz")),
}

PINNED = {
    "merge-mlp": "4dbfdfe58282dc4a5cb66ac70674f502b288bb60477709a9e25fc47ee4b21079",
    "merge-cnn": "eed1b3b117f584a73037b90ae22d95ccb718fa55eaad4adc86125064a50c55fb",
    "concat-mlp": "ed1abda6a433e00e3584608b2b0a1a88c0472f1d4e2a97bd9d35ea467d51e06d",
    "concat-cnn": "4727951ecd82f5adf867f9e0a18fc7e3f0020f8c2ffb51787408241df1f873f8",
    "prune-mlp": "70d4c2bf4a7817551203a757a423226b87ae0deac5600f1dce87a71597915463",
    "prune-cnn": "f9615c0f267a031347c0992f3ee74ebc37766b892971fbe6a49a1dce4736f612",
    "calibrate-mlp": "77f523982a534022ac878e781381fb2bb45c34e00e7b4585161e0f7c092c6332",
    "calibrate-cnn": "4abdea23ba4e72f0657496a8c7faffb0b9fef3f3e010fe40e3f7e349448e72d2",
}


def _sha256(path) -> str:
    """The model file and its external data, if any, in one digest."""
    digest = hashlib.sha256(path.read_bytes())
    data = path.with_name(path.name + ".data")
    if data.exists():
        digest.update(data.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("case", CASES)
def test_sample_outputs_are_byte_identical_to_the_pinned_ones(case, tmp_path):
    out = tmp_path / "out.onnx"
    CASES[case](out)
    assert _sha256(out) == PINNED[case]
