"""The hand recipes ``python -m tuner.bench_quality`` compares the search with, as a Keras user
writes them: the seeds' recipe (a frozen B0 and a Dense softmax, Adam, 10 epochs of batch
512) and keras-io's EfficientNet fine-tuning example (its head, augmentation, 25 frozen
epochs, then its last 20 layers unfrozen for 4). Each trains on the fold's train split, is
timed by its ``fit`` calls, and is evaluated once on test."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

SEED = {"backbone": "B0", "epochs": 10, "batch_size": 512}
KERAS_EXAMPLE = {
    "backbone": "B0",
    "epochs": 25,
    "batch_size": 64,
    "learning_rate": 1e-2,
    "dropout": 0.2,
    "unfrozen_layers": 20,
    "finetune_epochs": 4,
    "finetune_learning_rate": 1e-5,
}


def _recipe_data(split_file: Path, images: Path) -> tuple[dict, Any, list[str]]:
    from data_tools import ingest
    from tuner.report import evaluate

    config = {"data": str(split_file), "images": str(images)}
    frame = ingest.read_split_csv(split_file)
    config["classes"] = ingest.class_names(frame["value"])
    table, _ = evaluate.split_table(config, ("train", "validation"))
    return config, table, config["classes"]


def _dataset(table, split: str, size: int, batch: int, shuffle: bool, augment=None):
    import tensorflow as tf

    from data_tools import pipeline

    rows = table[table["type"] == split]
    data = pipeline.make_dataset(rows, size, batch, shuffle=shuffle)
    data = data.map(lambda x, y: (tf.cast(x, tf.float32), y))
    if augment is not None:  # as the example maps its augmentation over the train batches
        data = data.map(lambda x, y: (augment(x, training=True), y))
    return data


def _evaluate(model, config: dict, size: int, seconds: float, history: dict, facts: dict) -> dict:
    """The one test evaluation of a hand recipe's last epoch, and what it ran."""
    from tuner.report import evaluate

    pixels, labels, _ = evaluate.test_pixels(config, size)
    probs = evaluate.probabilities(model, pixels)
    metrics = evaluate.test_metrics(labels, probs, config["classes"])
    return {
        "train_seconds": seconds,
        "val_accuracy_last_epoch": float(history["val_accuracy"][-1]),
        "test": {k: metrics[k] for k in ("count", "accuracy", "balanced_accuracy", "loss")},
        "classes": config["classes"],
        "image_size": size,
        **facts,
    }


def run_recipe(split_file: Path, images: Path, weights: str | None, recipe: dict) -> dict:
    """The seeds' recipe (``recipe``: backbone, image size, epochs, batch) on the split: its
    test metrics, training seconds and what it ran."""
    import keras

    from tuner.model import backbones

    config, table, classes = _recipe_data(split_file, images)
    size, batch = recipe["image_size"], recipe["batch_size"]
    model = recipe_model(backbones.get(recipe["backbone"]), size, weights, len(classes))
    binary = len(classes) == 2
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    train = _dataset(table, "train", size, batch, True)
    val = _dataset(table, "validation", size, batch, False)
    started = time.monotonic()
    history = model.fit(train, validation_data=val, epochs=recipe["epochs"], verbose=2)
    seconds = time.monotonic() - started
    return _evaluate(model, config, size, seconds, history.history, recipe)


def recipe_model(entry, size: int, weights: str | None, classes: int):
    """The recipe's model: uint8-valued pixels -> the backbone's input scale (0..1 for a
    TF-Hub module, as the seeds rescaled by 1/255) -> the frozen backbone -> a Dense
    softmax (sigmoid for two classes)."""
    import keras

    from tuner.model import backbones

    base = backbones.build(entry, size, weights)
    base.trainable = False
    backbones.inference_mode(base)  # a frozen feature extractor, as the TF-Hub layer was
    inputs = keras.Input((size, size, 3))
    x = inputs
    if entry.input_scale != 1.0:
        x = keras.layers.Rescaling(entry.input_scale, name="input_scale")(x)
    features = base(x, training=False)
    binary = classes == 2
    outputs = keras.layers.Dense(
        1 if binary else classes, activation="sigmoid" if binary else "softmax"
    )(features)
    return keras.Model(inputs, outputs)


def keras_example_model(entry, size: int, weights: str | None, classes: int):
    """keras-io's EfficientNet fine-tuning example's model, with ``(model, backbone)``:
    the frozen backbone (pooled: its GlobalAveragePooling), BatchNormalization, Dropout 0.2
    and a Dense softmax. As in the example (one flat functional graph), the backbone's
    stochastic depth runs during ``fit``."""
    import keras

    from tuner.model import backbones

    base = backbones.build(entry, size, weights)
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = base(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(KERAS_EXAMPLE["dropout"], name="top_dropout")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="pred")(x)
    return keras.Model(inputs, outputs, name="EfficientNet"), base


def unfreeze_like_the_example(model, base, count: int = KERAS_EXAMPLE["unfrozen_layers"]):
    """The example's ``unfreeze_model``: of the flat model's last ``count`` layers (its 3
    head layers after the pooling, then the backbone's last layers, the pooling included),
    every one but BatchNormalization becomes trainable. Returns the backbone layers
    unfrozen."""
    import keras

    head = model.layers[model.layers.index(base) + 1 :]
    tail = base.layers[-(count - len(head)) :]
    base.trainable = True
    chosen = {id(layer) for layer in tail}
    for layer in base.layers:
        batch_norm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = id(layer) in chosen and not batch_norm
    return [layer.name for layer in tail if layer.trainable]


def example_augmentation():
    """The example's ``img_augmentation`` layers (Keras defaults otherwise: RandomFlip flips
    both ways, RandomContrast takes 0..255)."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomRotation(factor=0.15),
            keras.layers.RandomTranslation(height_factor=0.1, width_factor=0.1),
            keras.layers.RandomFlip(),
            keras.layers.RandomContrast(factor=0.1),
        ],
        name="img_augmentation",
    )


def run_keras_example(split_file: Path, images: Path, weights: str | None, recipe: dict) -> dict:
    """keras-io's EfficientNet fine-tuning recipe on the split (see the module docstring)."""
    import keras

    from tuner.model import backbones

    config, table, classes = _recipe_data(split_file, images)
    size, batch = recipe["image_size"], recipe["batch_size"]
    model, base = keras_example_model(
        backbones.get(recipe["backbone"]), size, weights, len(classes)
    )
    train = _dataset(table, "train", size, batch, True, example_augmentation())
    val = _dataset(table, "validation", size, batch, False)

    def fit(rate: float, epochs: int):
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        return model.fit(train, validation_data=val, epochs=epochs, verbose=2).history

    started = time.monotonic()
    history = fit(recipe["learning_rate"], recipe["epochs"])
    unfrozen = unfreeze_like_the_example(model, base, recipe["unfrozen_layers"])
    history = fit(recipe["finetune_learning_rate"], recipe["finetune_epochs"])
    seconds = time.monotonic() - started
    return _evaluate(model, config, size, seconds, history, {**recipe, "unfrozen": len(unfrozen)})
