import pytest
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def finetunes(tmp_path_factory):
    """Sample MLP member 0 fine-tuned twice with different seeds (SGD 0.05, 2 epochs): fine-tunes of one
    checkpoint, as tests of the regimes and of --method auto need them."""
    import onnxfuse
    from graphs import SAMPLES
    root = tmp_path_factory.mktemp("finetunes")
    paths = [root / f"ft_{seed}.onnx" for seed in range(2)]
    for seed, path in enumerate(paths):
        onnxfuse.finetune(str(SAMPLES / "digits_mlp_0.onnx"), str(SAMPLES / "digits_train.npz"), output=path,
                          epochs=2, seed=seed, lr=0.05, holdout=0)
    return [str(p) for p in paths]
