"""Model soups: the weight average of models that share one graph (`onnxfuse soup`, onnxfuse.soup)."""
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import onnxfuse
from onnxfuse.cli import main
from graphs import SAMPLES, conv_concat, random_input, run

MLP = [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(2)]
TRAIN, VAL = str(SAMPLES / "digits_train.npz"), str(SAMPLES / "digits_val.npz")


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """One transplanted model fine-tuned three times with different seeds: soup ingredients."""
    root = tmp_path_factory.mktemp("soup")
    fused = root / "fused.onnx"
    onnxfuse.merge(MLP, output=fused)
    paths = []
    for seed in range(3):
        paths.append(root / f"tuned_{seed}.onnx")
        onnxfuse.finetune(str(fused), TRAIN, output=paths[-1], epochs=1, seed=seed, lr=0.05)
    return [str(p) for p in paths]


def weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def test_soup_of_a_model_with_itself_is_that_model(copies, tmp_path):
    out = tmp_path / "self.onnx"
    onnxfuse.soup([copies[0], copies[0]], output=out)
    for name, value in weights(copies[0]).items():
        assert np.array_equal(weights(str(out))[name], value), name
    x = np.load(VAL)["x"]
    np.testing.assert_array_equal(run(onnx.load(out), x), run(onnx.load(copies[0]), x))


def test_uniform_soup_is_the_mean_of_the_weights(copies, tmp_path):
    out = tmp_path / "soup.onnx"
    onnxfuse.soup(copies, output=out)
    ws = [weights(p) for p in copies]
    for name, value in weights(str(out)).items():
        np.testing.assert_allclose(value, np.mean([w[name] for w in ws], axis=0), atol=1e-6)
    onnx.checker.check_model(str(out), full_check=True)


def test_greedy_soup_reports_every_ingredient_and_never_scores_below_its_best(copies, tmp_path):
    fusion = onnxfuse.api.soup_with_report(copies, tmp_path / "greedy.onnx", mode="greedy", val=VAL)
    r = fusion.summary["soup"]
    expected = [row["accuracy"] for row in onnxfuse.evaluate(copies, VAL)]
    assert r["ingredient_scores"] == pytest.approx(expected, abs=1e-6)
    assert r["soup_score"] >= max(expected)
    assert int(np.argmax(expected)) in r["kept"]
    written = onnxfuse.evaluate([str(tmp_path / "greedy.onnx")], VAL)[0]["accuracy"]
    assert written == pytest.approx(r["soup_score"], abs=1e-6)


def test_models_that_do_not_share_one_graph_are_refused_naming_the_difference(copies, tmp_path):
    runner = CliRunner()
    out = tmp_path / "bad.onnx"
    cnn = str(SAMPLES / "digits_cnn_0.onnx")
    result = runner.invoke(main, ["soup", copies[0], cnn, "-o", str(out)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "differ" in result.output
    model = conv_concat(0)                       # two branches: their nodes may come in either order
    nodes = list(model.graph.node)
    left, right = nodes[2:4], nodes[4:6]          # Conv+Relu of each branch
    permuted = onnx.ModelProto()
    permuted.CopyFrom(model)
    del permuted.graph.node[:]
    permuted.graph.node.extend(nodes[:2] + right + left + nodes[6:])
    onnx.checker.check_model(permuted, full_check=True)
    x = random_input(model)
    np.testing.assert_array_equal(run(permuted, x), run(model, x))         # equal functions ...
    paths = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    onnx.save(model, paths[0])
    onnx.save(permuted, paths[1])
    result = runner.invoke(main, ["soup", *map(str, paths), "-o", str(out)])
    assert result.exit_code == 2 and "at node 2 (Conv" in result.output   # ... but not one graph
    greedy = runner.invoke(main, ["soup", *copies, "-o", str(out), "--mode", "greedy"])
    assert greedy.exit_code == 2 and "needs held-out data" in greedy.output
    assert not out.exists()


def test_merge_soup_branches_copies_from_the_fine_tuned_model_and_writes_their_average(tmp_path):
    out = tmp_path / "soup.onnx"
    fusion = onnxfuse.fuse(MLP, output=out, data=TRAIN, val=VAL, training={"epochs": 1, "lr": 0.05}, soup=2)
    s = fusion.summary
    soup_acc = s["accuracy"]["uniform soup of 2"]["accuracy"]
    assert onnxfuse.evaluate([str(out)], VAL)[0]["accuracy"] == pytest.approx(soup_acc)
    assert s["soup"]["kept"] == [0, 1] and s["soup"]["epochs_per_copy"] == 1
    assert [k for k in s["accuracy"] if k.startswith("copy")] == ["copy 0 (+1 epochs, seed 1)",
                                                                  "copy 1 (+1 epochs, seed 2)"]
    # the written weights are the mean of two copies fine-tuned from the same fine-tuned model, each its last
    # epoch (kept at their best epoch, copies that did not improve on the held-out slice were the start itself)
    start = tmp_path / "start.onnx"
    onnxfuse.merge(MLP, output=start, data=TRAIN, epochs=1, lr=0.05)
    ones = [onnxfuse.finetune(str(start), TRAIN, epochs=1, lr=0.05, seed=1 + i, last_epoch=True)
            for i in range(2)]
    soup = weights(str(out))
    for t in ones[0].graph.initializer:
        other = next(u for u in ones[1].graph.initializer if u.name == t.name)
        np.testing.assert_allclose(soup[t.name], (numpy_helper.to_array(t) + numpy_helper.to_array(other)) / 2,
                                   atol=1e-6)
    refused = CliRunner().invoke(main, ["merge", *MLP, "-o", str(tmp_path / "x.onnx"), "--soup", "2"])
    assert refused.exit_code == 2 and "--soup needs --data" in refused.output


def test_periodic_averaging_restarts_the_copies_from_their_average(tmp_path):
    """--soup-average-every 1 with 2 epochs per copy: round 1 fine-tunes both copies from the average of round 0's
    (seeds 3 and 4); averaging only at the end is the same as not asking."""
    def soup(**kw):
        return onnxfuse.fuse(MLP, data=TRAIN, training={"epochs": 1, "lr": 0.05}, soup=2, soup_epochs=2, **kw)
    plain, at_end, periodic = soup(), soup(soup_average_every=2), soup(soup_average_every=1)
    assert plain.model.SerializeToString() == at_end.model.SerializeToString()
    assert periodic.summary["soup"]["rounds"] == 2 and plain.summary["soup"]["rounds"] == 1
    # by hand: round 0 copies from the fine-tuned start, their mean, round 1 copies from it, their mean
    start = onnxfuse.merge(MLP, data=TRAIN, epochs=1, lr=0.05)
    mean = lambda models: onnxfuse.soup(models)                     # noqa: E731
    first = mean([onnxfuse.finetune(start, TRAIN, epochs=1, lr=0.05, seed=1 + i, last_epoch=True) for i in (0, 1)])
    second = mean([onnxfuse.finetune(first, TRAIN, epochs=1, lr=0.05, seed=3 + i, last_epoch=True) for i in (0, 1)])
    got = {t.name: numpy_helper.to_array(t) for t in periodic.model.graph.initializer}
    for t in second.graph.initializer:
        np.testing.assert_allclose(got[t.name], numpy_helper.to_array(t), atol=1e-6)


def test_soup_batchnorm_reestimation_is_reported():
    fusion = onnxfuse.fuse(MLP, data=TRAIN, training={"epochs": 1, "lr": 0.05}, soup=2, soup_batchnorm="reestimate")
    assert fusion.summary["soup"]["batchnorm"]["batchnorm_nodes"] == 0        # the digits MLP has none
