"""--distill with labels mixes the two losses (Hinton et al.): distill_weight 0 is exactly label training,
1 is the teacher alone; without labels it is the teacher alone whatever the weight."""
import numpy as np
import pytest

import onnxfuse
from onnxfuse.training import TrainingError
from graphs import SAMPLES

MLP = [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(2)]
TRAIN = str(SAMPLES / "digits_train.npz")


def tuned(data=TRAIN, **training):
    fusion = onnxfuse.fuse(MLP, "nt", data=data, training={"epochs": 1, "lr": 0.05, **training})
    return fusion.model


def weights(model):
    from onnx import numpy_helper
    return [numpy_helper.to_array(t) for t in model.graph.initializer]


def test_weight_zero_is_label_training_and_one_is_the_teacher_alone():
    labels, mixed = tuned(), tuned(distill=True)
    zero, one = tuned(distill=True, distill_weight=0.0), tuned(distill=True, distill_weight=1.0)
    assert all(np.array_equal(a, b) for a, b in zip(weights(labels), weights(zero)))
    assert not all(np.array_equal(a, b) for a, b in zip(weights(one), weights(mixed)))
    assert not all(np.array_equal(a, b) for a, b in zip(weights(labels), weights(mixed)))


def test_without_labels_the_weight_does_not_matter():
    x = dict(np.load(TRAIN))["x"]
    a, b = tuned({"x": x}, distill=True), tuned({"x": x}, distill=True, distill_weight=1.0)
    assert all(np.array_equal(p, q) for p, q in zip(weights(a), weights(b)))


def test_a_weight_outside_0_1_is_refused():
    with pytest.raises(TrainingError, match="between 0 and 1"):
        tuned(distill=True, distill_weight=1.5)


def _tuned_with_teacher(teacher_class_offset, margin=60.0, **training):
    """Fine-tune member 0 on the digits with a teacher whose logit for class (y + offset) % 10 is `margin` above
    the others'."""
    import onnx
    from onnxfuse.data import load_data
    from onnxfuse.training import TrainOptions, finetune
    model = onnx.load(MLP[0])
    data = load_data(TRAIN, model)
    teacher = np.zeros((len(data), 10), np.float32)
    teacher[np.arange(len(data)), (data.y + teacher_class_offset) % 10] = margin
    options = TrainOptions(**{"epochs": 1, "lr": 0.05, "holdout": 0, **training})
    return finetune(model, data, options, teacher_logits=teacher).model


def test_members_teach_a_sample_as_far_as_they_get_it_right():
    """Per sample, the distillation term is weighted by the teacher's probability of the true label where it
    exceeds the student's: a teacher that is wrong everywhere leaves plain label training, as does one that is
    right but less sure than the student everywhere; one that is surer than the student teaches."""
    labels = _tuned_with_teacher(1)
    wrong = _tuned_with_teacher(1, distill=True)
    right = _tuned_with_teacher(0, margin=6.0, distill=True)       # p(label) = 0.98: above most students'
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(weights(labels), weights(wrong)))
    assert not all(np.allclose(a, b, atol=1e-3) for a, b in zip(weights(labels), weights(right)))


def test_members_less_sure_than_the_student_do_not_teach():
    import types

    import torch
    import torch.nn.functional as F
    from onnxfuse.training import TrainOptions, _Loop
    loop = types.SimpleNamespace(options=TrainOptions(distill=True), regression=False)
    loop.distill_loss = types.MethodType(_Loop.distill_loss, loop)
    y = torch.tensor([0, 1])
    student = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])            # p(label) = 0.91
    unsure = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])             # p(label) = 0.58
    surer = torch.tensor([[6.0, 0.0, 1.0], [0.0, 6.0, 1.0]])              # p(label) = 0.99, another shape
    ce = F.cross_entropy(student, y)
    assert torch.allclose(_Loop.mixed_loss(loop, student, unsure, y), ce)
    assert not torch.allclose(_Loop.mixed_loss(loop, student, surer, y), ce)
