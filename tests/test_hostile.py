"""Hostile files: decompression bombs refused by their header before any pixel exists, in
every decode (the split's check, training, predict, the serving signature), the path rule
(an objectId never resolves outside the images folder), image kinds, and images that change
after the split checked them, between runs, or while a search runs."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_tools import header
from data_tools import split as split_mod
from data_tools.errors import InputError, run_cli
from tests.conftest import random_rgb


def bomb_png(path: Path, side: int) -> Path:
    """A ``side`` x ``side`` grayscale PNG of zeros, written a row batch at a time: a file of
    kilobytes that decodes to ``3 * side**2`` bytes of RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    packer, rows = zlib.compressobj(9), b"\0" * (side + 1)
    body = b"".join(packer.compress(rows * 256) for _ in range(side // 256))
    body += packer.compress(rows * (side % 256)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )
    return path


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "mode", "options"),
    [
        ("PNG", "RGB", {}),
        ("PNG", "P", {"transparency": 0}),
        ("PNG", "I;16", {}),
        ("JPEG", "RGB", {}),
        ("JPEG", "CMYK", {}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("WEBP", "RGB", {"lossless": False}),
        ("WEBP", "RGB", {"lossless": True}),
        ("WEBP", "RGB", {"exif": b"Exif\0\0"}),  # the extended (VP8X) header
    ],
)
def test_the_header_declares_what_pillow_reads(fmt, mode, options):
    image = Image.fromarray(random_rgb(37, 53)).convert(mode)
    data = encoded(image, fmt, **options)
    assert int(header.declared_pixels(data).numpy()) == 37 * 53
    assert int(header.declared_pixels(b"not an image at all").numpy()) == 0


def test_a_bomb_is_refused_before_decoding_and_counted_as_a_bad_image(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(40):
        name = f"{i:02d}aa{i:04x}.png"
        Image.fromarray(random_rgb(seed=i)).save(images / name)
        rows.append((name, str(i % 2)))
    bomb_png(images / "ffbomb01.png", 300)  # 90,000 pixels: over a 50,000 limit
    rows.append(("ffbomb01.png", "1"))
    labels = tmp_path / "label.csv"
    pd.DataFrame(rows, columns=["objectId", "value"]).to_csv(labels, index=False)
    out = tmp_path / "split.csv"
    argv = ["--labels", str(labels), "--images", str(images), "--out", str(out)]
    assert run_cli(split_mod.main, [*argv, "--max-pixels", "50000"]) == 0
    excluded = pd.read_csv(tmp_path / "split.excluded.csv")
    assert excluded.objectId.tolist() == ["ffbomb01.png"]
    assert excluded.reason[0] == (
        "declares 90,000 pixels, over --max-pixels 50,000 (refused before decoding)"
    )
    capsys.readouterr()
    # Within the bad fraction only: one line, exit 2, as for undecodable files.
    assert run_cli(split_mod.main, [*argv, "--max-pixels", "500", "--max-bad-fraction", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "cannot be decoded or are over --max-pixels" in err and err.count("\n") == 1


def test_predict_and_the_serving_signature_refuse_what_is_over_the_limit(tmp_path, monkeypatch):
    import keras
    import tensorflow as tf

    from data_tools.pipeline import read_rgb
    from tuner.report.export import write_saved_model

    monkeypatch.setattr(header, "MAX_PIXELS", 100)
    small = tmp_path / "small.png"
    Image.fromarray(random_rgb(10, 10)).save(small)
    large = tmp_path / "large.png"
    Image.fromarray(random_rgb(11, 10)).save(large)
    assert read_rgb(tf.constant(str(small))).shape == (10, 10, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="over the pixel limit"):
        read_rgb(tf.constant(str(large)))
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(
        inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs))
    )
    write_saved_model(model, 8, tmp_path / "saved")
    serve = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    assert serve(tf.zeros([1, 10, 10, 3], tf.uint8))["probabilities"].shape == (1, 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="over the pixel limit of the model"):
        serve(tf.zeros([1, 11, 10, 3], tf.uint8))


@pytest.mark.parametrize("object_id", ["../outside.png", "/etc/hostname", "sub/../../outside.png"])
def test_an_objectid_never_resolves_outside_the_images_folder(tmp_path, capsys, object_id):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    Image.fromarray(random_rgb()).save(tmp_path / "data" / "outside.png")
    Image.fromarray(random_rgb()).save(images / "inside.png")
    labels = tmp_path / "data" / "label.csv"
    labels.write_text(f"objectId,value\ninside.png,a\n{object_id},b\n")
    argv = ["--labels", str(labels), "--images", str(images), "--out", str(tmp_path / "s.csv")]
    assert run_cli(split_mod.main, argv) == 2
    err = capsys.readouterr().err
    assert f"1 of 2 label rows have no image file in {images} (objectId {object_id})" in err
    assert err.count("\n") == 1 and not (tmp_path / "s.csv").exists()


def test_a_symlinked_file_is_read_a_symlinked_folder_is_not_entered(tmp_path):
    """The policy (docs, data guide): a link to a file is that file, wherever it points (a
    folder of links into a photo library is a common layout); a linked folder is not walked,
    so no link can pull a whole tree from elsewhere into the data."""
    from data_tools import ingest

    elsewhere = tmp_path / "library"
    (elsewhere / "deep").mkdir(parents=True)
    Image.fromarray(random_rgb()).save(elsewhere / "photo.png")
    Image.fromarray(random_rgb()).save(elsewhere / "deep" / "hidden.png")
    images = tmp_path / "images"
    images.mkdir()
    (images / "photo.png").symlink_to(elsewhere / "photo.png")
    (images / "linked").symlink_to(elsewhere / "deep", target_is_directory=True)
    frame = pd.DataFrame({"objectId": ["photo.png"], "value": ["a"]})
    assert ingest.resolve_paths(frame, images).tolist() == [str(images / "photo.png")]
    hidden = pd.DataFrame({"objectId": ["linked/hidden.png"], "value": ["a"]})
    with pytest.raises(InputError, match="objectId linked/hidden.png"):
        ingest.resolve_paths(hidden, images)


@pytest.mark.slow
def test_a_real_bomb_never_reaches_memory(tmp_path):
    """20,000 x 20,000 (400 megapixels: 1.2 GB of RGB decoded) refused at the default limit
    by a split process whose peak memory stays far below the decoded size."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(64):  # keys (the last two hex digits) spread over 0..252
        Image.fromarray(random_rgb(seed=i)).save(images / f"{i:02d}aa{i * 4:04x}.png")
    bomb_png(images / "ffbomb01.png", 20_000)
    labels = tmp_path / "label.csv"
    names = sorted(p.name for p in images.iterdir())
    pd.DataFrame({"objectId": names, "value": ["a", "b"] * (len(names) // 2) + ["b"]}).to_csv(
        labels, index=False
    )
    script = (
        "import resource, sys; from data_tools import split; from data_tools.errors import run_cli;"
        "code = run_cli(split.main, sys.argv[1:]);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"
    )
    argv = ["--labels", str(labels), "--images", str(images), "--out", str(tmp_path / "s.csv")]

    def peak_mb(*extra: str) -> float:
        done = subprocess.run(
            [sys.executable, "-c", script, *argv, "--max-bad-fraction", "0.1", *extra],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip().splitlines()[-1]) / 1024

    refused = peak_mb()
    assert "over --max-pixels" in (tmp_path / "s.excluded.csv").read_text()
    decoded = peak_mb("--max-pixels", str(10**12))  # no limit: the decoder meets the bomb
    print(f"peak RSS: {refused:.0f} MB refused, {decoded:.0f} MB decoded")
    assert decoded - refused > 1000  # 1.2 GB of RGB (and its 400 MB of gray) never existed


def test_image_kinds_of_real_photo_folders_decode_one_way_everywhere(tmp_path):
    """One decoder (pipeline.read_rgb) serves the split's check, the passes, training, the
    test evaluation and predict; what it does with each kind (the data guide says so):"""
    import tensorflow as tf

    from data_tools.pipeline import find_unreadable, read_rgb

    def decoded(path: Path) -> np.ndarray:
        return read_rgb(tf.constant(str(path))).numpy()

    # 16-bit PNG: scaled to 8 bits (value // 256), not clipped.
    deep = (np.arange(24 * 24).reshape(24, 24) * 100).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert np.array_equal(decoded(tmp_path / "deep.png")[..., 0], (deep >> 8).astype(np.uint8))
    # A palette PNG with a transparent colour: its RGB, as Pillow's.
    palette = Image.fromarray(random_rgb(24, 24)).convert("P")
    palette.save(tmp_path / "palette.png", transparency=0)
    rgb = np.asarray(Image.open(tmp_path / "palette.png").convert("RGB"))
    assert np.array_equal(decoded(tmp_path / "palette.png"), rgb)
    # EXIF orientation is ignored: the stored pixels, in training and in predict alike.
    photo = Image.fromarray(random_rgb(20, 30))
    exif = photo.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    photo.save(tmp_path / "rotated.jpg", exif=exif)
    assert decoded(tmp_path / "rotated.jpg").shape == (20, 30, 3)
    # A PNG named .jpg: decoded by its content.
    Image.fromarray(random_rgb(24, 24)).save(tmp_path / "lying.jpg", format="PNG")
    assert np.array_equal(decoded(tmp_path / "lying.jpg"), random_rgb(24, 24))
    # Unreadable, so counted and left out by the split: zero bytes, an animated WebP.
    (tmp_path / "empty.png").write_bytes(b"")
    frames = [Image.fromarray(random_rgb(16, 16, seed=s)) for s in (1, 2)]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    files = [str(tmp_path / n) for n in ("deep.png", "empty.png", "anim.webp", "lying.jpg")]
    assert find_unreadable(files) == [1, 2]


def test_a_resume_refuses_images_changed_since_the_search_started(tmp_path):
    import os

    from data_tools import ingest
    from tuner.engine import folder

    paths = []
    for i in range(3):
        Image.fromarray(random_rgb(seed=i)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    out = tmp_path / "results"
    out.mkdir()
    stamps = ingest.check_stamps(out / folder.FILES, paths)  # the first run: what to record
    assert stamps.path.tolist() == paths
    (out / folder.FILES).write_text(stamps.to_csv(index=False))
    assert ingest.check_stamps(out / folder.FILES, paths) is None  # unchanged: the resume goes on
    Image.fromarray(random_rgb(seed=9)).save(paths[1])  # a sync client rewrote it
    os.utime(paths[1], ns=(1, 1))
    os.remove(paths[2])
    with pytest.raises(InputError) as refused:
        ingest.check_stamps(out / folder.FILES, paths)
    assert str(refused.value).startswith(
        f"2 image(s) changed or went missing since this search started ({paths[1]}, {paths[2]})"
    )


def test_a_search_refuses_images_changed_since_the_split_checked_them(tmp_path, demo_dir, capsys):
    import os
    import shutil

    from tuner import search

    data = shutil.copytree(demo_dir, tmp_path / "digits")
    split_file = tmp_path / "split.csv"
    labels = ["--labels", str(data / "label.csv"), "--images", str(data / "images")]
    assert split_mod.main([*labels, "--out", str(split_file)]) == 0
    stamps = pd.read_csv(split_mod.sidecar(split_file, "files.csv"))
    assert len(stamps) == 1797 and (stamps["size"] > 0).all()
    victim = pd.read_csv(split_file).query("type == 'train'").objectId.iloc[0]
    path = data / "images" / f"{victim}.png"
    os.utime(path, ns=(1, 1))  # a second copy job touched it
    argv = ["--data", str(split_file), "--images", str(data / "images"), "--weights", "none"]
    argv += ["--results", str(tmp_path / "r"), "--set", "backbones=[T0]"]
    assert run_cli(search.main, argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        f"error: 1 image(s) changed or went missing since the split checked them ({path})"
    )
    assert not list((tmp_path / "r").rglob("config.yaml"))  # refused before anything is written


def test_an_image_gone_mid_search_stops_it_in_one_line_and_the_trial_runs_on_resume(
    tmp_path, demo_dir, pretrained_t0, capsys, monkeypatch
):
    import os
    import shutil

    from tests.conftest import frozen
    from tuner import search
    from tuner.model import hypermodel

    data = shutil.copytree(demo_dir, tmp_path / "digits")
    real_fit = hypermodel.EffNetHyperModel.fit
    calls, moved = [], {}

    def sync_client_takes_one(self, hp, model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # between the first trial and the second
            moved["path"] = self.data.paths("train")[3]
            os.replace(moved["path"], tmp_path / "held.png")
        return real_fit(self, hp, model, *args, **kwargs)

    monkeypatch.setattr(hypermodel.EffNetHyperModel, "fit", sync_client_takes_one)
    argv = [
        *("--data", str(data / "label.csv"), "--results", str(tmp_path / "r"), "--name", "m"),
        *("--cache", str(tmp_path / "cache"), "--set", "backbones=[T0]", *frozen(pretrained_t0)),
        *("--algorithm", "random", "--set", "epochs=1", "--set", "max_trials=2", "--budget", "10m"),
        *("--wandb-mode", "disabled"),
    ]
    assert run_cli(search.main, argv) == 2
    output = capsys.readouterr().out
    assert (
        f"stopped: 1 image(s) changed or went missing while the search ran ({moved['path']} "
        f"(missing))" in " ".join(output.split())
    )
    assert "Traceback" not in output
    table = pd.read_csv(tmp_path / "r" / "m" / "trials.csv", dtype={"trial_id": str})
    assert table.trial_id.tolist() == ["0"]  # the second trial is not recorded as failed
    os.replace(tmp_path / "held.png", moved["path"])  # restored, as it was
    assert run_cli(search.main, argv) == 0
    table = pd.read_csv(tmp_path / "r" / "m" / "trials.csv", dtype={"trial_id": str})
    assert table.trial_id.tolist() == ["0", "1"] and (table.status == "completed").all()
