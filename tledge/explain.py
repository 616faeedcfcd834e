"""Where the model looks: Grad-CAM heat maps and an intermediate layer's feature maps.

Grad-CAM (Selvaraju et al. 2017): the gradient of the class's logit with respect to the
backbone's last feature map, averaged over space, weights that map's channels; their ReLU'd
sum, upsampled to the image, is the heat map. For a tledge classifier the last feature map is
the backbone's output (the head is pooling, dropout and one dense layer), so the map is taken
exactly there. An ensemble is explained member by member.

    tledge explain photo.jpg --run models/quickstart      # photo.gradcam.png beside it
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tledge.data.images import load_image, resize_images
from tledge.errors import ArtifactError
from tledge.model import find_backbone, load_model, predict_in_batches
from tledge.plots import FIGURES, image_grid, pyplot, save_figure
from tledge.run_inputs import evaluation_split, run_splits
from tledge.records import read_history
from tledge.rundir import (EXPLAIN, find_artifact, portable, read_manifest, sha256,
                           verified_artifact, write_json)
from tledge.tasks import targets

# TensorFlow, Keras and matplotlib are imported inside the functions that use them: the CLI imports this
# module at start-up, and they take seconds to load.
PER_CLASS_CORRECT, PER_CLASS_WRONG = 2, 1


def _stages(model):
    """(layers before the backbone, the backbone, the head's layers) of a tledge classifier."""
    backbone = find_backbone(model)
    chain = [layer for layer in model.layers if not layer.__class__.__name__ == "InputLayer"]
    at = chain.index(backbone)
    return chain[:at], backbone, chain[at + 1:]


def gradcam(model, images, classes=None, output=None) -> tuple[np.ndarray, np.ndarray]:
    """(heat maps in [0, 1] at the images' size [N, H, W], the classes explained [N]).

    `classes` None explains each image's predicted class; `output` names the output (a
    multi-task model's task) whose class is explained, the first when None.
    """
    import tensorflow as tf
    before, backbone, head = _stages(model)
    outputs = list(model.output_names)
    head = [layer for layer in head if layer.name not in outputs] + \
        [model.get_layer(output or outputs[0])]
    x = tf.constant(np.asarray(images), tf.float32)
    for layer in before:
        x = layer(x, training=False)
    with tf.GradientTape() as tape:
        features = tf.cast(backbone(x, training=False), tf.float32)
        tape.watch(features)
        y = features
        for layer in head[:-1]:
            y = layer(y, training=False)
        dense = head[-1]  # the logits, not the softmax: its saturation would flatten the map
        logits = tf.matmul(tf.cast(y, tf.float32), tf.cast(dense.kernel, tf.float32)) + \
            tf.cast(dense.bias, tf.float32)
        chosen = tf.argmax(logits, axis=1) if classes is None else \
            tf.constant(np.asarray(classes), tf.int64)
        score = tf.gather(logits, chosen, batch_dims=1)
    gradients = tape.gradient(score, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))[..., None]
    cam = tf.image.resize(cam, np.asarray(images).shape[1:3], method="bilinear")[..., 0]
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    cam = tf.math.divide_no_nan(cam, peak)
    return cam.numpy(), chosen.numpy()


def feature_maps(model, image, channels: int = 16) -> tuple[np.ndarray, str]:
    """The first `channels` maps of the backbone layer halfway down, for one image."""
    import keras
    import tensorflow as tf
    before, backbone, _ = _stages(model)
    spatial = [layer for layer in backbone.layers[1:]
               if len(layer.output.shape) == 4]
    layer = spatial[len(spatial) // 3]  # early enough to keep some resolution
    probe = keras.Model(backbone.inputs, layer.output)
    x = tf.constant(np.asarray(image)[None], tf.float32)
    for step in before:
        x = step(x, training=False)
    maps = np.asarray(probe(x, training=False), dtype=np.float32)[0]
    return maps[..., :channels], layer.name


def overlay(image, heat, strength: float = 0.65) -> np.ndarray:
    """The heat map (jet colours) over the uint8 image, opaque where it is hot and clear where
    it is cold, so the image stays readable away from what the model looked at."""
    import matplotlib
    colours = matplotlib.colormaps["jet"](heat)[..., :3] * 255.0
    alpha = strength * np.asarray(heat, np.float32)[..., None]
    return np.clip((1 - alpha) * np.asarray(image, np.float32) + alpha * colours,
                   0, 255).astype(np.uint8)


def choose_examples(labels, predicted, classes: int) -> list[int]:
    """Per class, the first correct and the first wrong predictions of the split (indices)."""
    chosen = []
    for label in range(classes):
        mine = np.flatnonzero(labels == label)
        right = [int(i) for i in mine if predicted[i] == label][:PER_CLASS_CORRECT]
        wrong = [int(i) for i in mine if predicted[i] != label][:PER_CLASS_WRONG]
        chosen += right + wrong
    return chosen


def gradcam_grid(images, heats, labels, predicted, names, title, path) -> Path:
    """A grid of overlays, one row per true class; a wrong prediction's caption in red."""
    columns = PER_CLASS_CORRECT + PER_CLASS_WRONG
    rows = sorted(set(int(label) for label in labels))
    cells, captions = [None] * (len(rows) * columns), [""] * (len(rows) * columns)
    colours, filled = {}, {row: 0 for row in rows}
    for image, heat, label, guess in zip(images, heats, labels, predicted):
        index = rows.index(int(label)) * columns + filled[int(label)]
        filled[int(label)] += 1
        cells[index] = overlay(image, heat)
        if guess != label:
            captions[index], colours[index] = f"{names[label]} → {names[guess]}", "#d62728"
        else:
            captions[index] = names[label]
    return image_grid(cells, captions, path, columns=columns, title=title, cell_inches=1.9,
                      colours=colours)


def feature_grid(maps, layer_name, image, path) -> Path:
    """The input, then each channel's map in viridis (each scaled to its own range)."""
    import matplotlib
    viridis = matplotlib.colormaps["viridis"]
    size = np.asarray(image).shape[:2]
    cells, captions = [np.asarray(image, np.uint8)], ["input"]
    for channel in range(maps.shape[-1]):
        values = maps[..., channel]
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        picture = (viridis(scaled)[..., :3] * 255).astype(np.uint8)
        cells.append(_nearest(picture, size))
        captions.append(f"channel {channel}")
    return image_grid(cells, captions, path, columns=6, cell_inches=1.6, fontsize=7,
                      title=f"Feature maps of backbone layer {layer_name} "
                            f"({maps.shape[0]}x{maps.shape[1]})")


def _nearest(picture, size) -> np.ndarray:
    """`picture` scaled to `size` by repeating pixels (a feature map is coarser than the
    image: each of its cells stays a visible block, as matplotlib's nearest showed it)."""
    rows = np.arange(size[0]) * picture.shape[0] // size[0]
    columns = np.arange(size[1]) * picture.shape[1] // size[1]
    return picture[rows][:, columns]


def _models_to_explain(run_dir, manifest):
    """[(title, file stem, model path)]: the run's model, or each member of an ensemble."""
    history = read_history(run_dir) or {}
    members = (history.get("ensemble") or {}).get("members")
    if members:
        return [(f"member {member['name']} ({member['backbone']})",
                 f"gradcam_{member['name'].rsplit('.', 1)[-1]}", run_dir / member["model"])
                for member in members]
    keras_entry = find_artifact(manifest, "keras")
    return [(f"reference model ({history.get('backbone', 'keras')})", "gradcam",
             verified_artifact(run_dir, keras_entry))]


def explain_run(run_dir, *, log=print) -> dict:
    """Grad-CAM grids (and one image's feature maps) for the run's evaluation split."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    names = manifest["labels"]
    images, labels, split = evaluation_split(run_splits(run_dir))
    tasks = manifest.get("tasks")  # a multi-task model: a grid per task
    task_labels = targets(labels, tasks, names)
    record = {"split": split, "figures": [], "models": {}}
    for title, stem, path in _models_to_explain(run_dir, manifest):
        model = load_model(path)
        record["models"][portable(Path(path).resolve(), run_dir)] = sha256(path)
        size = tuple(model.inputs[0].shape[1:3])
        seen = images if images.shape[1:3] == size else resize_images(images, size)
        outputs = predict_in_batches(model, seen)
        outputs = outputs if isinstance(outputs, list) or not tasks else [outputs]
        views = [(None, outputs, labels, names, title, stem)] if not tasks else \
            [(task["name"], outputs[index], task_labels[:, index], task["labels"],
              f"{title}, task {task['name']}", f"{stem}_{task['name']}")
             for index, task in enumerate(tasks)]
        grid = list(_stages(model)[1].output.shape[1:3])
        for output, probabilities, expected, classes, shown, file_stem in views:
            predicted = probabilities.argmax(axis=1)
            chosen = choose_examples(expected, predicted, len(classes))
            heats, _ = gradcam(model, seen[chosen], output=output)
            figure = gradcam_grid(seen[chosen], heats, expected[chosen], predicted[chosen],
                                  classes, f"Grad-CAM, {shown}:\nwhere it looks for the class "
                                           "it predicts", run_dir / FIGURES / f"{file_stem}.png")
            record["figures"].append({"title": shown, "file": f"{FIGURES}/{figure.name}",
                                      "images": chosen, "heat_map_cells": grid})
            log(f"  wrote {figure.relative_to(run_dir)}")
        if stem == "gradcam" or len(record["figures"]) == 1:
            maps, layer = feature_maps(model, seen[chosen[0]])
            figure = feature_grid(maps, layer, seen[chosen[0]],
                                  run_dir / FIGURES / "feature_maps.png")
            record["feature_maps"] = {"file": f"{FIGURES}/{figure.name}", "layer": layer,
                                      "image": chosen[0], "model": title}
    write_json(run_dir / EXPLAIN, record)
    return record


def explain_images(paths, run_dir, *, out=None) -> list[Path]:
    """An overlay PNG for each image file, for the class the run's model predicts."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    _, _, path = _models_to_explain(run_dir, manifest)[0]
    model = load_model(path)
    size = tuple(model.inputs[0].shape[1:3])
    written = []
    targets = _overlay_paths([Path(path) for path in paths], out)
    for image_path in map(Path, paths):
        if not image_path.is_file():
            raise ArtifactError(f"{image_path} does not exist")
        image = load_image(image_path, size)
        tasks = manifest.get("tasks")  # a multi-task model: its first task's class
        heat, chosen = gradcam(model, image[None],
                               output=tasks[0]["name"] if tasks else None)
        plt = pyplot()
        figure, axes = plt.subplots(1, 2, figsize=(6, 3.2))
        axes[0].imshow(image)
        axes[1].imshow(overlay(image, heat[0]))
        for axis in axes:
            axis.axis("off")
        classes = tasks[0]["labels"] if tasks else manifest["labels"]
        axes[1].set_title(f"Grad-CAM: {classes[int(chosen[0])]}", fontsize=9)
        written.append(save_figure(figure, targets[image_path]))
    return written


def _overlay_paths(paths, out) -> dict:
    """{image: its overlay's path}: IMAGE.gradcam.png beside the image, or in `out`; two
    images of the same name (from two folders) into one `out` are told apart by their
    folders' names, never written over each other."""
    targets, taken = {}, set()
    for path in paths:
        folder = Path(out) if out else path.parent
        target = folder / f"{path.stem}.gradcam.png"
        parents = [part for part in reversed(path.resolve().parent.parts) if part != "/"]
        for depth in range(len(parents)):
            if target.resolve() not in taken:
                break
            target = folder / f"{'_'.join(reversed(parents[:depth + 1]))}_{path.stem}.gradcam.png"
        targets[path] = target
        taken.add(target.resolve())
    return targets


