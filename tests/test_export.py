"""End to end: a tiny search, then export_best and predict on what it exported."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image
from sklearn import metrics as skm

import tuner
from data_tools.errors import run_cli
from tests.conftest import frozen, rebuilt_val_accuracy
from tests.wandb_files import read_runs
from tuner import export_best, predict, search
from tuner.report import evaluate, export, rebuild

# The tests that export from the ``searched`` fixture run in one test process (pytest's
# --dist loadgroup), so the fixture's search runs once, not once per process.
ON_SEARCHED = pytest.mark.xdist_group("searched")


@pytest.fixture(scope="module")
def searched(tmp_path_factory, demo_dir, pretrained_t0) -> Path:
    """Three frozen T0 trials (3 epochs of a head on cached features) on the demo digits
    (W&B offline): export treats every trial's model alike, and these take seconds."""
    root = tmp_path_factory.mktemp("export")
    argv = [
        "--results",
        str(root),
        "--cache",
        str(demo_dir.parent),
        "--name",
        "tiny",
        "--set",
        "backbones=[T0]",
        *frozen(pretrained_t0),
        "--algorithm",
        "random",
        "--set",
        "epochs=3",
        "--set",
        "max_trials=3",
        "--budget",
        "10m",
        "--wandb-mode",
        "offline",
    ]
    assert run_cli(search.main, argv) == 0
    return root / "tiny"


def fresh_copy(searched: Path, tmp_path: Path) -> Path:
    target = tmp_path / "tiny"
    shutil.copytree(searched, target)
    return target


@ON_SEARCHED
def test_export_writes_best_and_every_form_predicts_the_same(
    searched, tmp_path, capsys, pretrained_t0
):
    folder = fresh_copy(searched, tmp_path)
    argv = ["--results", str(folder), "--tflite", "--wandb-mode", "offline"]
    assert run_cli(export_best.main, argv) == 0
    printed = capsys.readouterr().out
    best = folder / "best"
    assert sorted(p.name for p in best.iterdir()) == [
        "labels.txt",
        "metrics.json",
        "model.keras",
        "model.tflite",
        "model_card.md",
        "pareto.png",
        "saved_model",
    ]
    record = json.loads((best / "metrics.json").read_text())
    assert record["exported"] == "trial" and "refit" not in record and "trial_test" not in record
    ids = set(pd.read_csv(folder / "trials.csv", dtype={"trial_id": str}).trial_id)
    assert record["within_se"] == 1.0 and record["rule_pick"] in ids
    assert f"chosen: trial {record['trial_id']}. knee:" in printed
    assert "model: rebuilt it with its best-epoch weights" in printed
    # Every trial keeps what it trained (a head: kilobytes), not its model or its backbone.
    assert not list(folder.glob("trials/*/*.keras")) and not list(folder.rglob("*.weights.h5"))
    saved = list(folder.glob("keras_tuner/trial_*/checkpoint.trained.npz"))
    assert len(saved) == 3
    backbone_bytes = (pretrained_t0 / "T0.weights.h5").stat().st_size
    assert all(f.stat().st_size < backbone_bytes / 4 for f in saved)
    config, trials = rebuild.load_search(folder)
    row = trials[trials.trial_id.astype(str) == record["trial_id"]].iloc[0]
    in_memory, _ = rebuild.trial_model(folder, row, config)
    pixels, labels, table = evaluate.test_pixels(config, 32)
    assert len(labels) == record["test"]["count"] == 110

    expected = evaluate.probabilities(in_memory, pixels)
    from_file = evaluate.probabilities(keras.models.load_model(best / "model.keras"), pixels)
    serve = tf.saved_model.load(str(best / "saved_model")).signatures["serving_default"]
    raw = np.stack(
        [tf.io.decode_image(tf.io.read_file(p), channels=3).numpy() for p in table["path"]]
    )  # the demo images are 8x8: one batch
    served = serve(tf.constant(raw))["probabilities"].numpy()
    np.testing.assert_allclose(from_file, expected, atol=1e-6)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert record["tflite"]["max_abs_difference"] < 1e-4
    assert record["tflite"]["same_predictions"] == 1.0

    predicted = expected.argmax(1)
    test = record["test"]
    assert test["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert test["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(labels, predicted)
    )
    assert test["loss"] == pytest.approx(skm.log_loss(labels, expected, labels=range(10)), rel=1e-4)
    assert test["confusion_matrix"] == skm.confusion_matrix(labels, predicted).tolist()
    f1 = skm.f1_score(labels, predicted, average=None)
    assert [test["per_class"][str(c)]["f1"] for c in range(10)] == pytest.approx(f1)
    assert (best / "labels.txt").read_text().split() == [str(d) for d in range(10)]
    card = (best / "model_card.md").read_text()
    assert f"trial {record['trial_id']}" in card and "## Why this trial" in card
    assert "**chosen**" in card and "serving_default" in card
    # A frozen trial's phase-2 factor did nothing: marked, in the card and its record.
    assert "| finetune_lr_factor | - |" in card
    assert record["hyperparameters"]["finetune_lr_factor"] == "-"

    # The exported model was logged as a W&B artifact on the search's run.
    search_runs = [r for r in read_runs(folder / "wandb") if r.job_type == "search"]
    artifacts = [a for r in search_runs for a in r.artifacts]
    assert artifacts and set(artifacts[-1].aliases) >= {"best", "knee"}
    assert artifacts[-1].type == "model"


@ON_SEARCHED
def test_a_pruned_model_is_rebuilt_or_retrained_and_a_refit_trains_on_train_and_validation(
    searched, tmp_path, capsys, monkeypatch
):
    """A trial's model comes from its checkpoint when pruned; with neither it is retrained.
    ``--refit`` then trains the configuration again on train + validation for the trial's
    best epochs, never sees a test row, and each model is evaluated on test once."""
    from tuner.model import hypermodel

    folder = fresh_copy(searched, tmp_path)

    def export(out: str, *extra: str) -> dict:
        argv = ["--results", str(folder), "--rule", "max-accuracy", "--out", str(tmp_path / out)]
        assert run_cli(export_best.main, [*argv, "--wandb-mode", "disabled", *extra]) == 0
        return json.loads((tmp_path / out / "metrics.json").read_text())

    record = export("o")
    assert "model: rebuilt it with its best-epoch weights" in capsys.readouterr().out
    assert record["model_source"].startswith("rebuilt") and record["rule"] == "max-accuracy"
    # The checkpoint on the rebuilt backbone is the trial's best epoch: its row's accuracy.
    config, trials = rebuild.load_search(folder)
    recorded = trials.set_index(trials.trial_id.astype(str)).val_accuracy
    for trial_id in recorded.index:
        accuracy, _ = rebuilt_val_accuracy(folder, trial_id)
        assert accuracy == pytest.approx(recorded[trial_id], abs=1e-6)

    # Without its checkpoint, it is retrained, and says so; then refit.
    for checkpoint in folder.glob("keras_tuner/trial_*/checkpoint.trained.npz"):
        checkpoint.unlink()
    tables, evaluated, fits = [], [], []
    split_data_init = hypermodel.SplitData.__init__
    monkeypatch.setattr(
        hypermodel.SplitData,
        "__init__",
        lambda self, table, *a, **k: tables.append(table) or split_data_init(self, table, *a, **k),
    )
    metrics = evaluate.test_metrics
    monkeypatch.setattr(
        evaluate,
        "test_metrics",
        lambda labels, probs, classes: evaluated.append(probs) or metrics(labels, probs, classes),
    )
    fit = hypermodel.EffNetHyperModel.fit

    def spied_fit(self, hp, model, *args, **kwargs):
        result = fit(self, hp, model, *args, **kwargs)
        fits.append((self.stop_after, self.last_fit["epochs_run"], model))
        return result

    monkeypatch.setattr(hypermodel.EffNetHyperModel, "fit", spied_fit)
    record = export("p", "--refit")
    printed = capsys.readouterr().out
    assert "model: retrained it from its hyperparameters (its checkpoint was not kept)" in printed
    assert record["refit"]["trial_model_source"].startswith("retrained")
    assert record["model_source"] == "refit on train + validation"
    config, trials = rebuild.load_search(folder)
    row = trials[trials.trial_id.astype(str) == record["trial_id"]].iloc[0]

    # The retrain saw train and validation; the refit trained on both: no test row in either.
    test_paths = set(evaluate.split_table(config, ("test",))[0]["path"])
    seen = set(evaluate.split_table(config, ("train", "validation"))[0]["path"])
    assert len(tables) == 2 and all(set(t["path"]) == seen for t in tables)
    assert not test_paths & seen
    rows = config["split_counts"]["train"] + config["split_counts"]["validation"]
    assert (tables[1]["type"] == "train").sum() == rows == len(seen)
    # The refit ran the epochs its trial found best and kept the last of them.
    best_epoch = int(row["best_epoch"])
    assert [(stop, run) for stop, run, _ in fits] == [(None, 3), (best_epoch, best_epoch)]
    assert record["refit"]["trials"] == [
        {"trial_id": record["trial_id"], "stage": "frozen", "solver": "adam", "epochs": best_epoch}
    ]
    assert record["refit"]["train_rows"] == rows
    # Each model evaluated on test once: the trial's, then the refit that is exported.
    assert len(evaluated) == 2 and record["exported"] == "refit"
    pixels, labels, _ = evaluate.test_pixels(config, 32)
    shipped = evaluate.probabilities(
        keras.models.load_model(tmp_path / "p" / "model.keras"), pixels
    )
    np.testing.assert_allclose(shipped, evaluated[1], atol=1e-6)
    np.testing.assert_allclose(shipped, evaluate.probabilities(fits[1][2], pixels), atol=1e-6)
    np.testing.assert_allclose(evaluated[0], evaluate.probabilities(fits[0][2], pixels), atol=1e-6)
    assert not np.allclose(evaluated[0], evaluated[1], atol=1e-3)
    assert record["test"]["accuracy"] == pytest.approx((shipped.argmax(1) == labels).mean())
    assert record["trial_test"]["accuracy"] == pytest.approx(
        (evaluated[0].argmax(1) == labels).mean()
    )
    assert (
        f"refit: trial {record['trial_id']} (frozen, {best_epoch} epoch(s)) on {rows:,}" in printed
    )
    assert "test, the trial's model: accuracy" in printed
    card = (tmp_path / "p" / "model_card.md").read_text()
    assert "## Refit on train + validation" in card
    assert f"refit model (exported) | {record['test']['accuracy']:.4f}" in card
    assert f"the trial's model (not exported) | {record['trial_test']['accuracy']:.4f}" in card


@ON_SEARCHED
def test_predict_prints_labels_and_a_folder_gives_a_csv(searched, tmp_path, demo_dir, capsys):
    """Exported through the Python API (tuner.load -> Search.export -> Model), then
    predicted by the command and by Model.predict from paths, a folder, PIL images and an
    array: the same probabilities every way."""
    folder = fresh_copy(searched, tmp_path)
    found = tuner.load(folder)
    assert len(found.trials) == 3 and found.path == folder
    front = found.front
    assert set(front.trial_id) <= set(found.trials.trial_id) and len(front) >= 1
    assert front.latency_ms.is_monotonic_increasing
    model = found.export(wandb_mode="disabled")
    assert isinstance(model, tuner.Model) and model.path == folder / "best"
    assert model.classes == [str(d) for d in range(10)]
    assert model.metrics["trial_id"] in set(found.trials.trial_id)
    assert "chosen: trial" in capsys.readouterr().out  # the command's own lines
    # The search's report.html, written again by the export with the shipped trial starred.
    report = (folder / "report.html").read_text()
    assert re.search(rf"<td>★</td>\s*<td>{model.metrics['trial_id']}</td>", report)
    assert report.count("<td>★</td>") == 1
    labels = pd.read_csv(demo_dir / "label.csv", dtype=str).head(3)
    files = [str(demo_dir / "images" / f"{oid}.png") for oid in labels.objectId]
    assert run_cli(predict.main, ["--model", str(folder / "best"), *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == files
    assert all(
        re_label.split(" (")[0].isdigit() for re_label in (line.split(": ")[1] for line in lines)
    )
    out = tmp_path / "p.csv"
    images = tmp_path / "some"
    images.mkdir()
    for f in files:
        shutil.copy(f, images)
    (images / "broken.png").write_bytes(b"nope")
    assert (
        run_cli(predict.main, ["--model", str(folder / "best"), str(images), "--out", str(out)])
        == 1
    )  # one image could not be read
    table = pd.read_csv(out)
    assert len(table) == 4 and list(table.columns[:3]) == ["path", "label", "probability"]
    assert table.filter(regex=r"^\d$").shape[1] == 10
    readable = table.dropna(subset=["label"])
    np.testing.assert_allclose(readable.filter(regex=r"^\d$").sum(axis=1), 1.0, atol=1e-5)

    by_paths = model.predict(files)
    assert by_paths.path.tolist() == files
    by_folder = model.predict(images).set_index("path")
    assert len(by_folder) == 4 and by_folder.label.isna().sum() + (by_folder.label == "").sum() == 1
    pil = [Image.open(f) for f in files]
    by_pil = model.predict(pil)
    by_array = model.predict(np.stack([np.asarray(p.convert("RGB")) for p in pil]))
    assert list(by_array.columns) == ["label", "probability", *model.classes]
    expected = by_paths[model.classes].to_numpy()
    for other in (by_pil, by_array, model.predict(pil[0]).iloc[[0]]):
        np.testing.assert_allclose(
            other[model.classes].to_numpy()[: len(other)], expected[: len(other)], atol=1e-6
        )
    np.testing.assert_allclose(
        by_folder.loc[[str(images / Path(f).name) for f in files], model.classes].to_numpy(),
        expected,
        atol=1e-6,
    )
    assert by_paths.label.tolist() == by_array.label.tolist()
    with pytest.raises(tuner.InputError, match="uint8 \\[N, H, W, 3\\]"):
        model.predict(np.zeros((1, 8, 8, 3), np.float32))


@ON_SEARCHED
@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--results", "/nowhere/x"], "/nowhere/x is not a search's results folder"),
        (
            ["--max-latency-ms", "0.000001"],
            "no finished trial has a latency <= 1e-06 ms; the fastest are",
        ),
        (["--min-accuracy", "1.01"], "no finished trial reaches val accuracy 1.01"),
        (["--within-se", "-1"], "--within-se -1: give a number of standard errors >= 0"),
    ],
)
def test_export_bad_input_is_one_line(searched, tmp_path, capsys, argv, expected):
    if argv[0] != "--results":
        argv = ["--results", str(searched), *argv]
    assert run_cli(export_best.main, argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
    assert not (searched / "best").exists()


def test_predict_bad_model_folder(tmp_path, capsys):
    assert run_cli(predict.main, ["--model", str(tmp_path), str(tmp_path)]) == 2
    assert "is not an exported model" in capsys.readouterr().err


def one_frozen_trial(tmp_path, name: str, backbone: str, weights: Path, *extra: str) -> Path:
    """``tuner.search``: one frozen trial of ``backbone`` (2 epochs); returns its folder."""
    argv = ["--results", str(tmp_path / "r"), "--name", name, "--set", f"backbones=[{backbone}]"]
    argv += [*frozen(weights), "--algorithm", "random", "--set", "epochs=2"]
    argv += ["--set", "max_trials=1", "--budget", "10m", *extra]
    assert run_cli(search.main, argv) == 0
    return tmp_path / "r" / name


def test_binary_labels_search_and_export(tmp_path, demo_dir, pretrained_t0):
    """The reference problem is binary: a sigmoid head, then two-column probabilities."""
    labels = pd.read_csv(demo_dir / "label.csv", dtype=str)
    labels["value"] = np.where(labels["value"].astype(int) >= 5, "yes", "no")
    data = tmp_path / "binary" / "label.csv"
    data.parent.mkdir()
    labels.to_csv(data, index=False)
    folder = one_frozen_trial(
        tmp_path,
        "bin",
        "T0",
        pretrained_t0,
        *("--data", str(data), "--images", str(demo_dir / "images")),
        *("--set", "class_weight=balanced", "--wandb-mode", "disabled"),
    )
    assert run_cli(export_best.main, ["--results", str(folder), "--wandb-mode", "disabled"]) == 0
    record = json.loads((folder / "best" / "metrics.json").read_text())
    assert record["classes"] == ["no", "yes"]
    assert len(record["test"]["confusion_matrix"]) == 2
    model = keras.models.load_model(folder / "best" / "model.keras")
    assert model.output_shape == (None, 1)  # sigmoid head
    config, _ = rebuild.load_search(folder)
    pixels, labels, _ = evaluate.test_pixels(config, 32)
    probs = evaluate.probabilities(model, pixels)
    assert probs.shape == (len(pixels), 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    # Column 1 is "yes" (sigmoid output), column 0 its complement: the record's accuracy is the
    # accuracy of these two columns' argmax.
    assert record["test"]["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()))
    # 28 balanced test images, chance 0.5: at least 20 right is 1.8% likely by chance. (0.8
    # was one image from the pretrained T0's run-to-run spread: 22/28 failed it once.)
    assert record["test"]["accuracy"] > 0.7
    assert sum(map(sum, record["test"]["confusion_matrix"])) == len(labels)


@pytest.fixture
def float32_after():
    """A search with ``--mixed-precision on`` sets Keras' global policy: put it back."""
    yield
    keras.mixed_precision.set_global_policy("float32")


def search_and_export(tmp_path, demo_dir, backbone: str, weights: Path, *extra: str) -> Path:
    """One frozen trial of ``backbone`` in mixed precision, then ``export_best --tflite``."""
    folder = one_frozen_trial(
        tmp_path,
        "mixed",
        backbone,
        weights,
        *("--cache", str(demo_dir.parent), "--mixed-precision", "on", *extra),
    )
    config, trials = rebuild.load_search(folder)
    assert config["mixed_precision"] is True and (trials.status == "completed").all()
    keras.mixed_precision.set_global_policy("float32")  # a fresh export process's default
    assert run_cli(export_best.main, ["--results", str(folder), "--tflite"]) == 0
    return folder


@pytest.mark.slow  # 40 s of the fast tier; mixed precision is on by default only on a GPU
def test_a_mixed_precision_trial_exports_float32_keras_savedmodel_and_tflite(
    tmp_path, demo_dir, pretrained_t0, capsys, float32_after
):
    folder = search_and_export(tmp_path, demo_dir, "T0", pretrained_t0)
    printed = capsys.readouterr().out
    assert "precision: the trial ran in mixed_float16; exported in float32" in printed
    assert "of the validation images" in printed
    best = folder / "best"
    record = json.loads((best / "metrics.json").read_text())
    assert record["precision"]["trial"] == "mixed_float16"
    assert record["precision"]["same_predictions"] >= export.MIXED_MIN_AGREEMENT
    assert record["tflite"]["max_abs_difference"] < export.FLOAT_TOLERANCE
    shipped = keras.models.load_model(best / "model.keras")
    assert export.mixed_policies(shipped) == set()
    # The trial's own model was mixed, and the export computes what it computed.
    config, trials = rebuild.load_search(folder)
    trial, _ = rebuild.trial_model(folder, trials.iloc[0], config)
    assert export.mixed_policies(trial) == {"mixed_float16"}
    # Checked on validation: nothing before the one test evaluation reads test.
    pixels, _, _ = evaluate.split_pixels(config, 32, "validation")
    shipped_probs = evaluate.probabilities(shipped, pixels)
    trial_probs = evaluate.probabilities(trial, pixels)
    assert not np.array_equal(shipped_probs, trial_probs)  # float16 was really used
    assert np.abs(shipped_probs - trial_probs).mean() == pytest.approx(
        record["precision"]["mean_abs_difference"], rel=1e-4
    )
    served = tf.saved_model.load(str(best / "saved_model")).signatures["serving_default"]
    assert served.structured_outputs["probabilities"].dtype == tf.float32
    # The card tells a deployer what each export takes.
    card = (best / "model_card.md").read_text()
    assert "## Inputs each export expects" in card
    assert "| `saved_model/` (`serving_default`) | raw `uint8 [N, H, W, 3]` RGB" in card
    assert "| `model.tflite` | `float32 [N, 32, 32, 3]`, values 0..255 |" in card
    assert "antialiased only when shrinking by more than 2x" in card
    assert "EXIF orientation is **not** applied" in card
    assert "every export is float32 (same weights)" in card


def test_a_hub_backbone_searches_in_mixed_precision_with_a_weights_folder_and_exports(
    tmp_path, demo_dir, pretrained_t0, float32_after
):
    """A hub module's float32 signature under mixed precision, a --weights folder that has
    no file for it (the module carries its own weights), and load_model of its layer."""
    from tests.test_backbones import make_hub_module

    make_hub_module(tmp_path / "hub")
    backbone = f"hub:{tmp_path / 'hub'}"
    folder = search_and_export(
        tmp_path, demo_dir, backbone, pretrained_t0, "--set", "image_size=32"
    )
    best = folder / "best"
    record = json.loads((best / "metrics.json").read_text())
    assert record["backbone"] == backbone and record["test"]["count"] == 110
    shipped = keras.models.load_model(best / "model.keras")
    assert shipped.get_layer("backbone").get_layer("hub_features").trainable is False
    config, _ = rebuild.load_search(folder)
    pixels, labels, _ = evaluate.test_pixels(config, 32)
    probs = evaluate.probabilities(shipped, pixels)
    assert record["test"]["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()))
    served = tf.saved_model.load(str(best / "saved_model")).signatures["serving_default"]
    np.testing.assert_allclose(
        served(tf.constant(pixels))["probabilities"].numpy(), probs, atol=1e-5
    )


def test_a_retrain_or_refit_trains_as_its_search_did_with_the_feature_cache_off(tmp_path, demo_dir):
    from tests.test_hypermodel import demo_data

    data = demo_data(demo_dir, tmp_path)
    for cached in (False, True):
        config = {"space": {"backbones": ["T0"]}, "weights": "none", "feature_cache": cached}
        maker = rebuild.search_hypermodel(tmp_path, config, data.train, data.classes)
        assert maker.store.enabled is cached


def test_a_shipped_int8_mixed_variant_names_its_float_layers_in_metrics_and_card():
    from tuner.report import card, quantize

    row = pd.Series(
        {
            "variant": quantize.MIXED,
            "calibration_images": 200,
            "val_accuracy": 0.58,
            "float_val_accuracy": 0.60,
            "latency_ms": 3.0,
            "latency_spread_ms": 0.1,
            "float_latency_ms": 5.0,
            "file_bytes": 6_000_000,
            "float_layers": 2,
            "kept_float": "block6a_se/mul;top_activation",
        }
    )
    deployable = quantize.record(row)
    assert deployable["kept_float"] == ["block6a_se/mul", "top_activation"]
    text = "\n".join(card.speed_lines({"deployable": deployable, "device": "a CPU"}))
    assert "Kept in float (2 layer(s)" in text and "- `block6a_se/mul`" in text
    assert "- `top_activation`" in text
    # Other variants keep nothing in float and say nothing of it.
    plain = quantize.record(row.replace(quantize.MIXED, "int8"))
    assert "kept_float" not in plain
    assert "Kept in float" not in "\n".join(
        card.speed_lines({"deployable": plain, "device": "a CPU"})
    )


def test_the_card_marks_what_a_trial_did_not_use():
    """An exact linear head takes no rate, dropout or epochs; a frozen trial no phase-2
    factor; one view without augmentation is no choice. trials.csv keeps the epochs that
    ran (the cost model reads them): the card marks them."""
    from tuner.model.hypermodel import TrialPlan
    from tuner.report import card

    common = dict(backbone="B0", image_size=224, batch_size=64, head_width=0, dropout=0.2)
    common.update(learning_rate=1e-3, class_weight="none", pretrained=True)
    exact = TrialPlan(**common, finetune_fraction=0.0, finetune_lr_factor=0.1, solver="exact")
    assert set(exact.unused()) == {
        "dropout",
        "learning_rate",
        "epochs",
        "finetune_lr_factor",
        "augment_views",
        "partner",
        "partner_features",
    }
    tuned = TrialPlan(**common, finetune_fraction=0.2, finetune_lr_factor=0.1, augment="flip")
    assert set(tuned.unused()) == {"partner", "partner_features"}  # not a paired head
    paired = TrialPlan(
        **common, finetune_fraction=0.0, finetune_lr_factor=0.1, augment="flip", partner="B1"
    )
    assert "partner" not in paired.unused()
    scratch = TrialPlan(
        **{**common, "pretrained": False}, finetune_fraction=0.2, finetune_lr_factor=0.1
    )
    assert {"finetune_fraction", "finetune_lr_factor"} <= set(scratch.unused())

    row = pd.Series({"solver": "exact", "epochs": 1, "learning_rate": "-", "head_width": 0})
    expected = {"head_width": 0, "learning_rate": "-", "solver": "exact", "epochs": "-"}
    assert card.hyperparameters(row) == expected
    row["solver"] = "adam"
    assert card.hyperparameters(row)["epochs"] == 1


@ON_SEARCHED
def test_int8_mixed_keeps_the_named_layers_float_and_calibrates_on_train_only(searched):
    """Selective quantization: the debugger's worst layer, named, stays float in the
    converted model (int8 otherwise); calibration images are train images only."""
    from ai_edge_litert.interpreter import Interpreter

    from tuner.report import quantize

    config, trials = rebuild.load_search(searched)
    row = trials[trials.status == "completed"].iloc[0]
    model, _ = rebuild.trial_model(searched, row, config)
    size = int(row.image_size)
    calibration = quantize.calibration_pixels(config, size, 40)
    train, _, _ = evaluate.split_pixels(config, size, "train")
    validation, _, _ = evaluate.split_pixels(config, size, "validation")

    def images(pixels):
        return {x.astype("uint8").tobytes() for x in pixels}

    assert len(calibration) == 40 and images(calibration) <= images(train)
    assert not images(calibration) & images(validation)
    errors = quantize.layer_errors(model, size, calibration)
    assert len(errors) > 3 and errors.error.is_monotonic_decreasing
    worst = errors.tensor_name[0]

    def dtype(content: bytes) -> np.dtype:
        details = Interpreter(model_content=content).get_tensor_details()
        return {d["name"]: d["dtype"] for d in details}[worst]

    assert dtype(quantize.convert_mixed(model, size, calibration)) == np.int8
    assert dtype(quantize.convert_mixed(model, size, calibration, [worst])) == np.float32


@ON_SEARCHED
def test_quantize_measures_every_variant_of_the_front_and_can_ship_one(searched, tmp_path, capsys):
    """--quantize: four LiteRT variants of each front trial in deployables.csv, measured
    with the interpreter on validation; the fastest rule then ships a deployable, evaluated
    once on test with the interpreter, with its float model beside it for serving."""
    from tuner.report import quantize
    from tuner.report.results import pareto_flags

    folder = fresh_copy(searched, tmp_path)
    argv = ["--results", str(folder), "--quantize", "--calibration-images", "40"]
    assert run_cli(export_best.main, [*argv, "--rule", "fastest", "--wandb-mode", "offline"]) == 0
    printed = capsys.readouterr().out
    trials = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    front = trials.trial_id[pareto_flags(trials)]
    table = quantize.read_table(folder / "deployables.csv")
    assert list(table.columns) == quantize.COLUMNS
    assert sorted(zip(table.trial_id, table.variant, strict=True)) == sorted(
        (t, v) for t in front for v in quantize.VARIANTS
    )
    assert (table.status == "completed").all(), table.reason
    calibrated = table.variant.isin(["int8", quantize.MIXED])
    assert (table.calibration_images == np.where(calibrated, 40, 0)).all()
    mixed = table[table.variant == quantize.MIXED]
    assert len(mixed) == len(front)
    for row in mixed.itertuples():  # the layers kept in float: counted and named
        assert len(quantize.kept_float(row)) == row.float_layers
        assert row.reason == "" or pd.isna(row.reason) or "not within 0.02" in row.reason
    assert table.val_accuracy.between(0, 1).all() and (table.latency_ms > 0).all()
    # The float32 variant computes what the Keras model computes: the same val accuracy.
    same = table[table.variant == "float32"]
    assert (same.val_accuracy - same.float_val_accuracy).abs().max() < 1e-6  # float32 logs
    for row in table.itertuples():
        path = folder / quantize.FOLDER / f"{row.trial_id}-{row.variant}.tflite"
        assert path.stat().st_size == row.file_bytes
    assert "## Deployable variants" in (folder / "leaderboard.md").read_text()

    record = json.loads((folder / "best" / "metrics.json").read_text())
    trial_id, variant = quantize.split_id(record["trial_id"])
    assert variant in quantize.VARIANTS, printed  # LiteRT's batch-1 latency beats Keras'
    chosen = table[(table.trial_id == trial_id) & (table.variant == variant)].iloc[0]
    assert record["deployable"]["variant"] == variant
    assert record["latency_ms"] == pytest.approx(chosen.latency_ms)
    assert record["validation"]["accuracy"] == pytest.approx(chosen.val_accuracy)
    best = folder / "best"
    lite = (best / "model.tflite").read_bytes()
    assert lite == (folder / quantize.FOLDER / f"{trial_id}-{variant}.tflite").read_bytes()
    assert {"model.keras", "saved_model"} <= {p.name for p in best.iterdir()}
    # Its test numbers are the deployable's, from the interpreter.
    from tuner.report.evaluate import test_metrics, test_pixels
    from tuner.report.rebuild import load_search

    config, _ = load_search(folder)
    pixels, labels, _ = test_pixels(config, int(record["image_size"]))
    probs = quantize.Runner(lite).probabilities(pixels)
    assert record["test"]["accuracy"] == pytest.approx(
        test_metrics(labels, probs, config["classes"])["accuracy"]
    )
    card = (best / "model_card.md").read_text()
    assert f"LiteRT `{variant}` variant" in card and "against the float model's" in card
    # predict serves what shipped: the variant, on the package's resize.
    serve, _ = predict.load(best)
    served = serve(tf.constant(pixels[:3]))["probabilities"].numpy()
    np.testing.assert_allclose(served, probs[:3], atol=1e-6)
    # W&B: the variants as a table on the search's run.
    search_runs = [r for r in read_runs(folder / "wandb") if r.job_type == "search"]
    assert search_runs[-1].summary["deployables/_type"] == "table-file"


@ON_SEARCHED
def test_a_variant_the_converter_refuses_keeps_the_float_row_and_the_export_succeeds(
    searched, tmp_path, capsys, monkeypatch
):
    from tuner.report import quantize

    real = quantize.convert

    def refusing(model, size, variant, calibration=None):
        if variant == "int8":
            raise RuntimeError("pages of MLIR\nerror: 'tfl.hard_swish' op is not supported\n...")
        return real(model, size, variant, calibration)

    def refusing_mixed(*args, **kwargs):
        raise RuntimeError("error: 'tfl.hard_swish' op is not supported")

    monkeypatch.setattr(quantize, "convert", refusing)
    monkeypatch.setattr(quantize, "select_mixed", refusing_mixed)
    folder = fresh_copy(searched, tmp_path)
    argv = ["--results", str(folder), "--quantize", "--calibration-images", "20"]
    assert run_cli(export_best.main, [*argv, "--wandb-mode", "disabled"]) == 0
    out = capsys.readouterr().out
    table = quantize.read_table(folder / "deployables.csv")
    failed = table[table.status == "failed"]
    refused = {"int8", quantize.MIXED}
    assert (
        set(failed.variant) == refused
        and (table.status[~table.variant.isin(refused)] == "completed").all()
    )
    assert set(failed.reason) == {"RuntimeError: error: 'tfl.hard_swish' op is not supported"}
    assert "int8 failed (RuntimeError: error: 'tfl.hard_swish' op is not supported)" in out
    assert "int8-mixed failed (RuntimeError: error: 'tfl.hard_swish'" in out
    assert (folder / "best" / "metrics.json").is_file()
    assert run_cli(export_best.main, [*argv, "--refit"]) == 2
    assert "error: --quantize with --refit" in capsys.readouterr().err


@ON_SEARCHED
def test_bench_quantize_prints_each_variant_and_ends_with_the_int8_speed_up(searched, capsys):
    from tuner import bench_quantize

    assert bench_quantize.main(["--results", str(searched), "--calibration-images", "20"]) == 0
    printed = capsys.readouterr().out.splitlines()
    steps = [line for line in printed if line.startswith("  int8-mixed, ")]
    assert steps and steps[0].startswith("  int8-mixed, 0 layer(s) in float: val acc ")
    lines = [line for line in printed if line not in steps]
    assert [line.split()[:2] for line in lines[2:8]] == [
        ["Keras", "float32"],
        ["LiteRT", "float32"],
        ["LiteRT", "float16"],
        ["LiteRT", "dynamic"],
        ["LiteRT", "int8"],
        ["LiteRT", "int8-mixed"],
    ]
    keras_ms, int8_ms = float(lines[2].split()[3]), float(lines[6].split()[4])
    speed, accuracy, mixed = lines[-3:]
    assert speed.startswith("int8 latency: ") and speed.endswith("x")
    ratio = float(speed.split()[-1][:-1])  # within the rounding of the two printed times
    low = (keras_ms - 0.005) / (int8_ms + 0.005) - 0.05
    assert low <= ratio <= (keras_ms + 0.005) / max(int8_ms - 0.005, 1e-3) + 0.05
    # int8's accuracy against LiteRT float32's, as the table printed them.
    change = float(lines[6].split()[2]) - float(lines[3].split()[2])
    assert accuracy.startswith("int8 accuracy: ") and accuracy.endswith(" against float32")
    assert float(accuracy.split()[2]) == pytest.approx(change, abs=0.0006)
    assert re.fullmatch(
        r"int8-mixed: \d+ layer\(s\) in float; latency \d+\.\dx LiteRT float32's; accuracy "
        r"[+-]\d\.\d{3} against float32 \((not )?within 0\.02 of the float model's\)",
        mixed,
    )
    assert not (searched / "deployables.csv").exists()  # nothing written to the search
