"""The one loader of models by name: what `train`, `evaluate`, `export` and `attention` take as a model.

A model is given as one of (`kind`):

- a `keras.Model` ("model"): used as it is;
- a `.keras` file ("keras"): read with one-line errors (`read_keras`);
- `build_model` arguments as a dict ("build_args", Python only);
- a `presets.ViTConfig` ("config");
- a checkpoint file or folder that names its architecture ("checkpoint"): `.npz`, `transformers`, Orbax;
- a name of `NAMES` ("name"): a builder (`vit_r50_b16`) or a small config (`vit_hybrid_tiny`).

Anything else is an unknown model, refused with one message (`check`), before any work.

>>> from vit_keras import loader
>>> loader.kind("vit_hybrid_tiny"), loader.kind("runs/a/model.keras")
('name', 'keras')
>>> loader.load_model("vit_tiny16", classes=10, image_size=32).output_shape
(None, 10)
"""

import os
import re

from vit_keras import presets

# The name table: every model name any command takes (the published builders, then the small configs).
NAMES = presets.ALL_CONFIGS

# `weights=DEFAULT`: a name's default published checkpoint (as the `vit_*` builders load), which
# must exist; other kinds carry their own weights.
DEFAULT = "default"


def kind(spec):
    """What `spec` is: "model", "keras", "build_args", "config", "checkpoint" or "name"; else ValueError."""
    import keras

    if isinstance(spec, keras.Model):
        return "model"
    if isinstance(spec, dict):
        return "build_args"
    if isinstance(spec, presets.ViTConfig):
        return "config"
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        if spec.endswith(".keras"):
            return "keras"
        if spec in NAMES:
            return "name"
        from vit_keras import vit

        if vit.is_checkpoint_path(spec):
            return "checkpoint"
    if isinstance(spec, str) and ("/" in spec or os.sep in spec):
        raise ValueError(f"{spec}: no such checkpoint file or folder (nor a model name).")
    raise ValueError(f"Unknown model {spec!r}; use a model name ({', '.join(NAMES)}), a .keras file, or a "
                     "checkpoint file or folder.")


def check(spec):
    """ValueError unless `spec` is a model `load_model` can load: a `.keras` file must be there (it is read later)."""
    if kind(spec) == "keras":
        _check_keras_file(os.fspath(spec))


def _check_keras_file(path):
    if not os.path.isfile(path):
        raise ValueError(f"cannot load the model {path}: no such file.")


def num_layers(spec):
    """The encoder depth of `spec` where known without building or reading it, else None."""
    what = kind(spec)
    if what == "build_args":
        return spec.get("num_layers")
    if what in ("name", "config"):
        return (spec if what == "config" else NAMES[spec]).num_layers
    return None


def load_model(spec, weights=None, classes=None, image_size=None, *, class_names=None, dropout=None,
               checkpoint_prefix=None, input_channels=None, files_only=False):
    """The model `spec` names (see `kind`), built or read.

    Args:
        spec: keras.Model, str, dict or ViTConfig. See the module docstring.
        weights: str or None. For a name, config or build arguments: a
            checkpoint to load (a published name, a path or URL), `DEFAULT`
            (the name's default published checkpoint) or None (random
            initialisation). Defaults to None.
        classes: int or None. Outputs of a built model's head; None takes the
            checkpoint's. Defaults to None.
        image_size: int, (height, width) or None. For a built model; None
            takes the checkpoint's resolution, else 224. Defaults to None.
        class_names: list of str or None. Kept in a built model's head.
            Defaults to None.
        dropout: float or None. For a built model; None takes its config's.
            Defaults to None.
        checkpoint_prefix: str or None. The tower of a two-tower file ("img").
            Defaults to None.
        input_channels: int or None. For a built model; None: 3.
            Defaults to None.
        files_only: bool. Read anything but a `keras.Model` as a `.keras`
            file (`files.load_keras`). Defaults to False.

    Returns:
        keras.Model. A `.keras` file or a model comes back as it is (fitting
        it to a dataset is the caller's: `training`).
    """
    import keras

    if isinstance(spec, keras.Model) or (files_only and not isinstance(spec, (str, os.PathLike))):
        return spec
    what = "keras" if files_only else kind(spec)
    if what == "keras":
        return read_keras(spec)
    built = dict(classes=classes, image_size=image_size, class_names=class_names,
                 input_channels=input_channels or 3)
    if what == "build_args":
        from vit_keras.model import build_model

        args = dict(spec, **{k: v for k, v in built.items() if v is not None})
        args.setdefault("image_size", 224)
        if dropout is not None:
            args["dropout"] = dropout
        if weights not in (None, DEFAULT):
            args["weights"] = weights
        return build_model(**args)
    from vit_keras import vit

    if weights == DEFAULT:
        weights = presets.default_weights(spec) if what == "name" else None
        if weights is None and what == "name":
            raise ValueError(f"{spec} has no published weights: pass --weights (an .npz path or URL).")
    return vit.create(spec, weights=weights, dropout=dropout, checkpoint_prefix=checkpoint_prefix, **built)


def read_keras(path):
    """A `.keras` file -> the model; failures: one-line ValueError naming the path."""
    import keras

    path = os.fspath(path)
    _check_keras_file(path)
    try:
        return keras.saving.load_model(path)
    except Exception as e:
        unknown = re.search(r"Could not locate (?:class|function) '([^']+)'", str(e))
        if unknown:  # Keras's first line is generic advice; the class is what the user needs
            raise ValueError(f"cannot load the model {path}: Could not locate class '{unknown.group(1)}' (a "
                             "class of the program that wrote it: import the code that registers it "
                             "first).") from None
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ValueError(f"cannot load the model {path}: {lines[0] if lines else type(e).__name__}") from None
