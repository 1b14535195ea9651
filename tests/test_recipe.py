"""The fine-tuning recipe: lr auto, the best epoch kept, the check against the best member, threads, regression
targets and in-memory data (issue 16). onnxruntime scores every result."""
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxfuse
import onnxfuse.api
from graphs import SAMPLES, cli, gemm_mlp, run

torch = pytest.importorskip("torch")
from onnxfuse import training  # noqa: E402

MLP = [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(2)]
TRAIN, VAL = SAMPLES / "digits_train.npz", SAMPLES / "digits_val.npz"


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_auto_lr_reports_its_choice_and_equals_the_run_at_that_rate():
    auto = onnxfuse.fuse(MLP, "nt", data=TRAIN, training={"epochs": 2})
    options = auto.summary["training"]["options"]
    choice = options["lr_choice"]
    assert choice["how"] == "auto" and options["lr"] in training.CANDIDATES["sgd"]
    assert str(options["lr"]) in choice["why"] or f"{options['lr']:g}" in choice["why"]
    assert choice["probe_steps"] <= 0.3 * choice["run_steps"]
    assert {p["lr"] for p in choice["probes"]} == set(training.CANDIDATES["sgd"])
    best = min(p["holdout_loss"] for p in choice["probes"])
    assert options["lr"] == max(p["lr"] for p in choice["probes"]
                                if p["holdout_loss"] <= best * (1 + training.TOLERANCE["sgd"]))
    fixed = onnxfuse.fuse(MLP, "nt", data=TRAIN, training={"epochs": 2, "lr": options["lr"]})
    assert fixed.summary["training"]["options"]["lr_choice"] == {"how": "given (--lr)"}
    assert auto.model.SerializeToString() == fixed.model.SerializeToString()


def test_auto_lr_drops_a_rate_that_diverges(monkeypatch):
    monkeypatch.setitem(training.CANDIDATES, "sgd", (1e4, 0.01))
    fusion = onnxfuse.fuse(MLP, "nt", data=TRAIN, training={"epochs": 1})
    options = fusion.summary["training"]["options"]
    assert options["lr"] == 0.01
    assert [p["holdout_loss"] for p in options["lr_choice"]["probes"] if p["lr"] == 1e4] == [None]


def test_sgd_candidates_shrink_with_the_square_root_of_a_small_batch():
    assert training.candidate_rates("sgd", 64) == training.candidate_rates("sgd", 512) == training.CANDIDATES["sgd"]
    assert training.candidate_rates("sgd", 16) == pytest.approx([lr / 2 for lr in training.CANDIDATES["sgd"]])
    assert training.candidate_rates("adam", 8) == training.CANDIDATES["adam"]


def test_small_batches_do_not_collapse_the_sample_cnns():
    # batch 8 with the batch-64 grid: the probes chose SGD 0.1, and the run collapsed to 29% on the held-out
    # slice (the probe is too short to show it) where the members score 98%
    cnns = [str(SAMPLES / f"digits_cnn_{i}.onnx") for i in range(2)]
    images = SAMPLES / "digits_images_train.npz"
    fusion = onnxfuse.fuse(cnns, "nt", data=images, training={"epochs": 3, "batch_size": 8})
    choice = fusion.summary["training"]["options"]["lr_choice"]
    assert [p["lr"] for p in choice["probes"]] == list(training.candidate_rates("sgd", 8))
    versus = fusion.summary["versus_best_member"]
    assert versus["result"] >= versus["best_member_score"] - 0.02, versus
    val = np.load(SAMPLES / "digits_images_val.npz")
    assert (run(fusion.model, val["x"]).argmax(1) == val["y"]).mean() > 0.93


def test_optimizer_auto_is_sgd_without_attention_and_adam_with_it():
    from onnx import TensorProto, helper
    fusion = onnxfuse.fuse(MLP, "nt", data=TRAIN, training={"epochs": 1})
    options = fusion.summary["training"]["options"]
    assert options["optimizer"] == "sgd" and options["optimizer_choice"]["how"] == "auto"
    given = onnxfuse.fuse(MLP, "nt", data=TRAIN, training={"epochs": 1, "optimizer": "adam"})
    assert given.summary["training"]["options"]["optimizer_choice"] == {"how": "given (--optimizer)"}
    adam = given.summary["training"]["options"]        # Adam's own probe tolerance, tighter than SGD's
    best = min(p["holdout_loss"] for p in adam["lr_choice"]["probes"])
    assert adam["lr"] == max(p["lr"] for p in adam["lr_choice"]["probes"]
                             if p["holdout_loss"] <= best * (1 + training.TOLERANCE["adam"]))
    assert f"{1 + training.TOLERANCE['adam']:g} x the best" in adam["lr_choice"]["why"]

    def graph(second):       # x [B, T, 4] times a transposed weight (a layer) or times itself (attention)
        w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
        nodes = [helper.make_node("Transpose", [second], ["t"], perm=[1, 0] if second == "w" else [0, 2, 1]),
                 helper.make_node("MatMul", ["x", "t"], ["y"], name="scores")]
        return helper.make_model(helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w]))
    assert training.choose_optimizer(graph("w"))[0] == "sgd"
    name, why = training.choose_optimizer(graph("x"))
    assert name == "adam" and "'scores'" in why


def test_auto_lr_never_looks_at_val(tmp_path):
    bad_val = tmp_path / "val.npz"
    v = np.load(VAL)
    np.savez(bad_val, x=v["x"], y=(v["y"] + 1) % 10)          # wrong labels: would steer a choice made on val
    a = onnxfuse.fuse(MLP, "nt", data=TRAIN, val=VAL, training={"epochs": 1})
    b = onnxfuse.fuse(MLP, "nt", data=TRAIN, val=bad_val, training={"epochs": 1})
    choice = [{k: v for k, v in f.summary["training"]["options"]["lr_choice"].items() if k != "cpu_seconds"} for f in (a, b)]
    assert choice[0] == choice[1]


def test_the_best_epoch_is_kept_not_the_last():
    # members fine-tuned at a destructive constant rate: every epoch is worse than the model as given
    result = onnxfuse.api.finetune_with_report(MLP[0], TRAIN, val=VAL, epochs=2, lr=3.0, schedule="constant")
    options, history = result.summary["training"]["options"], result.summary["training"]["history"]
    assert options["selected_on"] == "val"
    best = max(history, key=lambda h: (h["accuracy"], -h["loss"]))
    assert options["selected_epoch"] == best["epoch"] == 0, history
    assert all(np.array_equal(w, weights(onnx.load(MLP[0]))[k]) for k, w in weights(result.model).items())
    x, y = np.load(VAL)["x"], np.load(VAL)["y"]
    assert (run(result.model, x).argmax(1) == y).mean() == pytest.approx(best["accuracy"])


def test_without_val_the_epoch_is_chosen_on_the_held_out_slice():
    fusion = onnxfuse.fuse(MLP, "nt", data=TRAIN, training={"epochs": 2, "lr": 0.05})
    options = fusion.summary["training"]["options"]
    assert options["selected_on"] == "holdout"
    assert options["held_out"] == round(0.1 * 1257) and options["trained_on"] == 1257 - options["held_out"]
    assert fusion.summary["versus_best_member"]["on"].startswith("held-out 0.1 of")
    none = onnxfuse.fuse(MLP, "nt", data=TRAIN, training={"epochs": 1, "lr": 0.05, "holdout": 0})
    assert none.summary["training"]["options"]["selected_on"] is None and "beats_best_member" not in none.summary
    with pytest.raises(onnxfuse.OnnxFuseError, match="held-out slice"):
        onnxfuse.fuse(MLP, "nt", data=TRAIN, training={"epochs": 1, "holdout": 0})


def weak_member(tmp_path):
    """A member of the same architecture with random weights: fusing it with a good one and barely training
    leaves the result below the good member."""
    model = onnx.load(MLP[1])
    rng = np.random.default_rng(0)
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(rng.normal(size=t.dims).astype(np.float32), t.name))
    path = tmp_path / "weak.onnx"
    onnx.save(model, path)
    return path


def test_below_the_best_member_warns_and_require_gain_exits_3(tmp_path):
    weak = weak_member(tmp_path)
    args = ["merge", MLP[0], weak, "--data", TRAIN, "--val", VAL, "--epochs", "1", "--lr", "1e-5", "--json"]
    warned = cli(*args, "-o", tmp_path / "a.onnx")
    assert warned.returncode == 0, warned.stderr
    summary = json.loads(warned.stdout)
    v = summary["versus_best_member"]
    assert summary["beats_best_member"] is False and v["best_member"] == "digits_mlp_0.onnx"
    x, y = np.load(VAL)["x"], np.load(VAL)["y"]
    assert v["best_member_score"] == pytest.approx((run(onnx.load(MLP[0]), x).argmax(1) == y).mean())
    assert v["result"] == pytest.approx((run(onnx.load(tmp_path / "a.onnx"), x).argmax(1) == y).mean())
    assert v["result"] < v["best_member_score"]
    warning = [line for line in warned.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "below the best member digits_mlp_0.onnx" in warning[0]
    assert "caveat" not in v and "fair comparison" not in warning[0]      # --val: no model saw it

    refused = cli(*args, "-o", tmp_path / "b.onnx", "--require-gain")
    assert refused.returncode == 3 and not (tmp_path / "b.onnx").exists()
    assert json.loads(refused.stdout)["beats_best_member"] is False
    assert "--require-gain" in refused.stderr and "nothing was written" in refused.stderr


def test_without_val_the_verdict_says_the_members_may_have_seen_its_samples(tmp_path):
    weak = weak_member(tmp_path)
    done = cli("merge", MLP[0], weak, "-o", tmp_path / "a.onnx", "--data", TRAIN, "--epochs", "1", "--lr", "1e-5",
               "--json")
    assert done.returncode == 0, done.stderr
    v = json.loads(done.stdout)["versus_best_member"]
    assert "held-out 0.1 of" in v["on"] and "--val" in v["caveat"]
    warning = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and v["caveat"] in warning[0]


def test_a_result_that_beats_the_best_member_passes_require_gain(tmp_path):
    out = tmp_path / "f.onnx"
    ok = cli("merge", *MLP, "-o", out, "--data", TRAIN, "--val", VAL, "--epochs", "3", "--require-gain", "--json")
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["beats_best_member"] is True and "warning" not in ok.stderr and out.exists()
    assert summary["versus_best_member"]["result"] >= summary["versus_best_member"]["best_member_score"]


def test_threads_are_used_restored_and_deterministic():
    torch.set_num_threads(1)
    a = onnxfuse.merge(MLP, data=TRAIN, epochs=1, lr=0.05, threads=2)
    assert torch.get_num_threads() == 1
    b = onnxfuse.merge(MLP, data=TRAIN, epochs=1, lr=0.05, threads=2)
    assert a.SerializeToString() == b.SerializeToString()
    assert cli("merge", *MLP, "-o", "x.onnx", "--data", TRAIN, "--threads", "0").returncode == 2
    assert cli("merge", *MLP, "-o", "x.onnx", "--data", TRAIN, "--lr", "fast").returncode == 2


# --------------------------------------------------------------------------- regression

def regressors():
    members = [gemm_mlp(s, widths=(6, 16, 16, 2)) for s in range(2)]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 6)).astype(np.float32)
    y = (np.stack([np.sin(x[:, 0]) + x[:, 1] * x[:, 2], np.tanh(x[:, 3] - x[:, 4])], 1)).astype(np.float32)
    return members, x, y


def test_regression_targets_train_by_mse_and_eval_reports_mse_and_mae():
    members, x, y = regressors()
    fusion = onnxfuse.fuse(members, "nt", data={"x": x[:400], "y": y[:400]}, val={"x": x[400:], "y": y[400:]},
                           training={"epochs": 20})
    acc = fusion.summary["accuracy"]
    mse = float(((run(fusion.model, x[400:]) - y[400:]) ** 2).mean())
    assert acc["result after fine-tuning"]["mse"] == pytest.approx(mse, rel=1e-5)
    assert mse < 0.5 * acc["result before fine-tuning"]["mse"]
    assert fusion.summary["versus_best_member"]["metric"] == "mse"
    rows = onnxfuse.evaluate([fusion.model, *members], {"x": x[400:], "y": y[400:]}, ensemble=True)
    assert rows[0]["mse"] == pytest.approx(mse, rel=1e-5)
    assert rows[0]["mae"] == pytest.approx(float(np.abs(run(fusion.model, x[400:]) - y[400:]).mean()), rel=1e-5)
    assert "accuracy" not in rows[0]


def test_regression_distillation_fits_the_members_mean():
    members, x, _ = regressors()
    # without labels a 2-D output is taken for class logits: say that it is a regression
    fusion = onnxfuse.fuse(members, "nt", data=x[:400], training={"epochs": 5, "distill": True, "task": "regression"})
    assert fusion.summary["training"]["options"]["task"] == "regression"
    mean = np.mean([run(m, x[400:]) for m in members], 0)
    before = onnxfuse.fuse(members, "nt").model
    assert ((run(fusion.model, x[400:]) - mean) ** 2).mean() < 0.5 * ((run(before, x[400:]) - mean) ** 2).mean()
    history = fusion.summary["training"]["history"]
    assert history[-1]["distill_loss"] < 0.5 * history[0]["distill_loss"]


def test_regression_targets_of_the_wrong_shape_are_refused(tmp_path):
    members, x, y = regressors()
    with pytest.raises(onnxfuse.OnnxFuseError, match=r"targets 'y' have shape \['batch', 3\].*\['batch', 2\]"):
        onnxfuse.fuse(members, "nt", data={"x": x[:400], "y": np.zeros((400, 3), np.float32)},
                      training={"epochs": 1})
    f = tmp_path / "r.npz"
    np.savez(f, x=x[400:], y=y[400:])
    shown = cli("eval", str(SAMPLES / "digits_mlp_0.onnx"), "--data", f)
    assert shown.returncode == 2 and "shape" in shown.stderr


# --------------------------------------------------------------------------- data without files

def test_arrays_dicts_and_torch_data_give_the_same_model_as_the_file():
    from torch.utils.data import DataLoader, TensorDataset
    d = np.load(TRAIN)
    x, y = d["x"], d["y"]
    ref = onnxfuse.merge(MLP, data=TRAIN, epochs=1, lr=0.05).SerializeToString()
    dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    for source in ({"x": x, "y": y}, dataset, DataLoader(dataset, batch_size=100)):
        assert onnxfuse.merge(MLP, data=source, epochs=1, lr=0.05).SerializeToString() == ref, type(source)
    calib_file = onnxfuse.merge(MLP, calibrate=TRAIN, calib_samples=500)
    calib_array = onnxfuse.merge(MLP, calibrate=x, calib_samples=500)
    assert weights(calib_file).keys() == weights(calib_array).keys()
    assert all(np.array_equal(a, weights(calib_array)[k]) for k, a in weights(calib_file).items())
    with pytest.raises(onnxfuse.OnnxFuseError, match="must be an .npz path"):
        onnxfuse.merge(MLP, data=42, epochs=1)
