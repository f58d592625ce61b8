"""`TrainConfig` written once: its fields are `vit-keras train`'s flags, help and checks; one loader of models by name.

No training here: every bad value is refused before any work (the dataset does not even exist).
"""

import argparse
import dataclasses
import math

import keras
import numpy as np
import pytest

from conftest import assert_close
from vit_keras import cli, evaluate, files, loader, options, presets, training


def _train_parser():
    """The `vit-keras train` subparser of the real `vit-keras` parser."""
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _actions():
    return {a.dest: a for a in _train_parser()._actions if a.dest != "help"}


def test_every_field_is_a_flag_with_its_doc_as_help():
    actions = _actions()
    fields = dataclasses.fields(training.TrainConfig)
    assert set(actions) == {f.name for f in fields}  # no flag that is not a field, no field without a flag
    for field in fields:
        action = actions[field.name]
        assert field.metadata.get("doc"), f"{field.name} has no doc"
        assert action.help.replace("%%", "%").startswith(field.metadata["doc"]), field.name
        assert action.default == field.default, field.name
    help_text = _train_parser().format_help()
    for field in fields:
        for flag in options.flags(field):
            assert flag in help_text


def test_the_old_flag_names_still_parse():
    old = {"--model": "model", "--dataset": "dataset", "--data-dir": "data_dir", "--weights": "weights",
           "--out": "out", "--optimizer": "optimizer", "--lr": "learning_rate", "--strategy": "strategy",
           "--precision": "precision", "--checkpoint-prefix": "checkpoint_prefix", "--trainable": "trainable",
           "--epochs": "epochs", "--batch-size": "batch_size", "--image-size": "image_size",
           "--weight-decay": "weight_decay", "--warmup-steps": "warmup_steps", "--grad-accum": "grad_accum",
           "--clipnorm": "clipnorm", "--label-smoothing": "label_smoothing", "--dropout": "dropout",
           "--crop-area": "crop_area", "--seed": "seed", "--backup-every": "backup_every",
           "--layer-decay": "layer_decay", "--lora-rank": "lora_rank", "--lora-alpha": "lora_alpha",
           "--input-channels": "input_channels"}
    switches = {"--download": "download", "--overwrite": "overwrite", "--randaugment": "randaugment",
                "--mixup": "mixup", "--cutmix": "cutmix", "--jit-compile": "jit_compile", "--remat": "remat"}
    values = {"--optimizer": "adamw", "--strategy": "mirrored", "--precision": "mixed_bfloat16",
              "--image-size": "32x48", "--crop-area": "0.1,0.9", "--trainable": "head"}
    argv = ["train"]
    for flag in old:
        argv += [flag, values.get(flag, "3")]
    config = cli.train_config(cli.parser().parse_args(argv + list(switches)))
    assert config.image_size == (32, 48) and config.crop_area == (0.1, 0.9) and config.learning_rate == 3.0
    assert config.epochs == 3 and isinstance(config.epochs, int) and config.model == "3"
    assert all(getattr(config, name) is True for name in switches.values())
    assert cli.train_config(cli.parser().parse_args(["train", "--learning-rate", "0.5"])).learning_rate == 0.5
    assert cli.train_config(cli.parser().parse_args(["train", "--fit-verbose", "2"])).verbose == 2


def test_one_default_for_every_field_including_strategy():
    from_cli = cli.train_config(cli.parser().parse_args(["train"]))
    assert from_cli == training.TrainConfig()
    assert from_cli.strategy == training.TrainConfig().strategy == "default"
    assert training.TrainConfig(strategy=None).strategy == "default"  # the old spelling of the default


def test_a_new_field_is_a_flag_and_checked_without_other_edits(monkeypatch, tmp_path, capsys):
    """The parser, the config of parsed flags and the checks are made from `dataclasses.fields`."""
    extended = dataclasses.make_dataclass(
        "TrainConfig",
        [("extra_knob", int, options.option(7, "an extra knob of the run", check=options.positive_int)),
         ("plain", str, dataclasses.field(default="x"))],
        bases=(training.TrainConfig,), frozen=True)
    monkeypatch.setattr(training, "TrainConfig", extended)
    help_text = _train_parser().format_help()
    assert "--extra-knob" in help_text and "an extra knob of the run (default: 7)" in help_text
    assert "--plain" in help_text
    config = cli.train_config(cli.parser().parse_args(["train", "--extra-knob", "3", "--plain", "y"]))
    assert (config.extra_knob, config.plain, config.epochs) == (3, "y", 10)
    with pytest.raises(ValueError) as python_error:
        training.train(extended(extra_knob=0, dataset=str(tmp_path / "missing"), out=str(tmp_path / "a")))
    assert str(python_error.value) == "extra_knob must be a positive integer, got 0."
    code = cli.main(["train", "--dataset", str(tmp_path / "missing"), "--out", str(tmp_path / "b"),
                     "--extra-knob", "0"])
    assert code == 2 and capsys.readouterr().err.splitlines()[-1] == f"vit-keras: error: {python_error.value}"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# (field, value from Python, flag text): each refused with one message, from Python and from the CLI.
BAD = [
    ("epochs", 0, "0"),
    ("batch_size", -4, "-4"),
    ("image_size", 0, "0"),
    ("image_size", (32, 0), "32x0"),
    ("grad_accum", 0, "0"),
    ("backup_every", 0, "0"),
    ("warmup_steps", -1, "-1"),
    ("learning_rate", math.inf, "inf"),
    ("learning_rate", -0.1, "-0.1"),
    ("weight_decay", -1.0, "-1"),
    ("clipnorm", 0.0, "0"),
    ("label_smoothing", 1.0, "1"),
    ("dropout", 1.5, "1.5"),
    ("crop_area", (0.0, 1.0), "0,1"),
    ("crop_area", (0.5, 0.2), "0.5,0.2"),
    ("seed", -1, "-1"),
    ("optimizer", "adam", "adam"),
    ("precision", "fp8", "fp8"),
    ("strategy", "gpus", "gpus"),
    ("verbose", 3, "3"),
    ("model", "vit_x", "vit_x"),
    ("model", "no/such/checkpoint", "no/such/checkpoint"),
    ("trainable", "blocks:x", "blocks:x"),
    ("trainable", "blocks:13", "blocks:13"),  # vit_r50_b16 has 12 blocks
    ("layer_decay", 2.0, "2"),
    ("lora_rank", 0, "0"),
    ("lora_alpha", 4.0, "4"),  # without lora_rank
    ("input_channels", 2, "2"),
]


@pytest.mark.parametrize("name, value, text", BAD, ids=[f"{n}={t}" for n, _, t in BAD])
def test_python_and_cli_refuse_a_bad_value_with_the_same_line(tmp_path, capsys, name, value, text):
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError) as python_error:
        training.train(dataset=missing, out=str(tmp_path / "a"), **{name: value})
    message = str(python_error.value)
    assert "\n" not in message and (name in message or f"{value}" in message), message
    field = next(f for f in dataclasses.fields(training.TrainConfig) if f.name == name)
    code = cli.main(["train", "--dataset", missing, "--out", str(tmp_path / "b"), options.flags(field)[0], text])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1] == f"vit-keras: error: {message}", err[-2000:]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before any work


def test_the_exact_messages_of_some_checks():
    with pytest.raises(ValueError, match=r"^epochs must be a positive integer, got 0\.$"):
        training.validate(training.TrainConfig(epochs=0))
    with pytest.raises(ValueError, match=r"^Unknown optimizer 'adam'; use one of \('sgd', 'adamw'\)\.$"):
        training.validate(training.TrainConfig(optimizer="adam"))
    with pytest.raises(ValueError, match=r"^image_size must be a positive integer or a \(height, width\) pair"):
        training.validate(training.TrainConfig(image_size=True))  # a bool is no size
    with pytest.raises(ValueError, match=r"^epochs must be a positive integer, got 2\.5\.$"):
        training.validate(training.TrainConfig(epochs=2.5))
    training.validate(training.DEMO)  # and a good config passes
    training.validate(training.TrainConfig(strategy=None, verbose=0, image_size=(32, 48), crop_area=(0.1, 1)))


def test_text_that_is_no_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--epochs", "ten"])
    assert exit_info.value.code == 2
    assert "argument --epochs: not an integer: 'ten'" in capsys.readouterr().err


def test_a_keras_file_takes_no_weights_from_python_either(tmp_path):
    path = tmp_path / "m.keras"
    keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]).save(path)
    with pytest.raises(ValueError, match="--weights cannot apply to"):
        training.validate(training.TrainConfig(model=str(path), weights="imagenet21k"))
    with pytest.raises(ValueError, match=r"^cannot load the model .*none\.keras: no such file\.$"):
        training.validate(training.TrainConfig(model=str(tmp_path / "none.keras")))


# ----------------------------------------------------------------------------- one loader of models by name


def test_one_name_table_for_train_evaluate_and_files():
    assert loader.NAMES is presets.ALL_CONFIGS
    assert [loader.kind(name) for name in ("vit_r50_b16", "vit_tiny16", "a/b.keras")] == ["name", "name", "keras"]
    assert loader.kind(presets.ALL_CONFIGS["vit_b16"]) == "config" and loader.kind({"patch_size": 16}) == "build_args"
    messages = set()
    for load in (lambda: loader.load_model("vit_x"), lambda: evaluate.load_model("vit_x"),
                 lambda: training.validate(training.TrainConfig(model="vit_x"))):
        with pytest.raises(ValueError) as error:
            load()
        messages.add(str(error.value))
    assert len(messages) == 1 and next(iter(messages)).startswith("Unknown model 'vit_x'; use a model name (vit_ti16,")
    assert "vit_hybrid_tiny" in next(iter(messages))  # small configs are names everywhere
    with pytest.raises(ValueError, match="vit_tiny16 has no published weights"):
        evaluate.load_model("vit_tiny16")  # evaluating needs weights; the name itself is known


def test_the_loader_reads_every_kind_to_the_upstream_logits(tiny_vit, tmp_path):
    """A checkpoint file, build_model arguments with weights, and a .keras file through each old entry point."""
    expected = tiny_vit.expected["logits"]
    from_args = loader.load_model(tiny_vit.config(), weights=str(tiny_vit.params))
    assert_close(from_args(tiny_vit.images), expected, 2e-5, "build_args")
    from_file = loader.load_model(str(tiny_vit.params), image_size=tiny_vit.image_size)
    assert_close(from_file(tiny_vit.images), expected, 2e-5, "checkpoint that names its architecture")
    path = str(tmp_path / "m.keras")
    from_args.save(path)
    classes = expected.shape[-1]
    for what, model in [
        ("loader", loader.load_model(path)),
        ("files.load_keras", files.load_keras(path)),
        ("evaluate.load_model", evaluate.load_model(path)),
        ("training._model_from", training._model_from(path, classes, None, None, None, None)),
    ]:
        assert_close(model(tiny_vit.images), expected, 2e-5, what)
    assert files.load_keras(from_args) is from_args and evaluate.load_model(from_args) is from_args
    with pytest.raises(ValueError, match=r"^cannot load the model .*params\.npz: "):
        files.load_keras(str(tiny_vit.params))  # load_keras reads .keras files only, as before
    with pytest.raises(ValueError, match=r"^cannot load the model .*gone\.keras: no such file\.$"):
        loader.load_model(str(tmp_path / "gone.keras"))


def test_a_name_builds_the_config_it_names():
    model = loader.load_model("vit_tiny16", classes=3, image_size=32)
    config = presets.ALL_CONFIGS["vit_tiny16"]
    assert model.output_shape == (None, 3) and model.input_shape == (None, 32, 32, 3)
    encoder_blocks = [w for w in model.weights if "encoderblock_" in w.path and w.path.endswith("kernel")]
    assert len({w.path.split("/")[1] for w in encoder_blocks}) == config.num_layers
    assert np.asarray(model.get_layer("head").kernel).shape == (config.hidden_size, 3)
