"""big_vision's checkpoints (tests/fixtures/big_vision, written and run by big_vision's own code) load exactly.

sincos2d position table, MAP head, scanned blocks, training checkpoints (params/ beside opt/ and chrono/),
two-tower files; each refused cleanly where it does not fit.
"""

import json
import pathlib

import keras
import numpy as np
import pytest

import vit_keras
from conftest import assert_close
from vit_keras import evaluate, training
from vit_keras.checkpoint import read_npz

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "big_vision"
CASES = ["bv_gap_learn", "bv_tok_scan", "bv_sincos_map", "bv_train_ckpt"]


class BVCase:
    def __init__(self, name):
        self.name = name
        self.dir = FIXTURES / name
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.params = str(self.dir / "params.npz")
        self.images = np.load(self.dir / "inputs.npz")["images"]
        with np.load(self.dir / "expected.npz") as e:
            self.expected = {k: e[k] for k in e.files}
        c = self.meta["model_config"]
        self.classifier = {"gap": "gap", "tok": "token", "map": "map"}[c["pool_type"]]
        self.posemb = c["posemb"]
        self.config = vit_keras.ViTConfig("bv_tiny", "big_vision tiny", c["patch_size"][0], c["depth"], c["width"],
                                          c["num_heads"], c["mlp_dim"])
        self.image_size = tuple(self.meta["image_size"])

    def build(self, **overrides):
        """`build_model` with the architecture said explicitly."""
        args = dict(self.config.build_args(), classifier=self.classifier, posemb=self.posemb,
                    image_size=self.image_size, classes=10, weights=self.params)
        args.update(overrides)
        return vit_keras.build_model(**args)


@pytest.fixture(scope="module", params=CASES)
def bv(request):
    return BVCase(request.param)


def test_logits_features_and_attention(bv):
    """create() takes posemb and pooling from the file; logits, features, every attention as big_vision's."""
    model = vit_keras.create(bv.config, weights=bv.params, classes=10, image_size=bv.image_size)
    emb = model.get_layer("embeddings")
    assert (emb.posemb, emb.class_token) == (bv.posemb, bv.classifier == "token")
    is_map = bv.classifier == "map"
    logits, weights, *pooled = vit_keras.attention_model(model, map_head=is_map)(bv.images)
    e = bv.expected
    assert_close(logits, e["logits"], 2e-5, "logits")
    assert_close(model(bv.images), e["logits"], 2e-5, "logits (fused attention)")
    assert_close(np.asarray(weights[0])[0], e["attn_block0"], 1e-5, "attn block 0")
    assert_close(np.asarray(weights[int(e["attn_last_block_index"])])[0], e["attn_last"], 1e-5, "attn last")
    if is_map:
        assert_close(np.asarray(pooled[0])[0], e["attn_map_probe"], 1e-5, "MAP probe attention")
    features = vit_keras.create(bv.config, weights=bv.params, include_top=False, image_size=bv.image_size)
    assert_close(features(bv.images), e["features"], 2e-5, "features")
    assert_close(e["pre_logits"], e["features"], 0)


def test_explicit_architecture_and_keras_file(bv, tmp_path):
    """build_model with posemb/classifier given loads the same; a .keras file keeps them."""
    model = bv.build()
    assert_close(model(bv.images), bv.expected["logits"], 2e-5, "logits")
    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.saving.load_model(path)
    assert_close(again(bv.images), bv.expected["logits"], 2e-5, "reloaded logits")


def test_sincos_table_is_big_vision_formula():
    """The table as the fixture README writes it, computed here entry by entry."""
    from vit_keras.layers.embeddings import posemb_sincos_2d

    rows, cols, width = 4, 6, 64
    q = width // 4
    expected = np.zeros((rows * cols, width))
    for i in range(rows):
        for j in range(cols):
            for k in range(q):
                omega = 1.0 / 10000 ** (k / (q - 1))
                expected[i * cols + j, [k, q + k, 2 * q + k, 3 * q + k]] = [
                    np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)]
    assert_close(posemb_sincos_2d(rows, cols, width)[0], expected, 1e-6, "sincos2d")
    with pytest.raises(ValueError, match="divisible by 4"):
        posemb_sincos_2d(2, 2, 30)


def test_map_model_refused_as_gap_and_sincos_as_learned():
    bv = BVCase("bv_sincos_map")
    with pytest.raises(ValueError, match=r"(?s)MAPHead_0/probe.*classifier='map'"):
        bv.build(classifier="gap")
    with pytest.raises(ValueError, match=r"(?s)missing.*pos_embedding.*posemb='sincos2d'"):
        bv.build(posemb="learn")
    learned = BVCase("bv_gap_learn")
    with pytest.raises(ValueError, match=r"(?s)unused.*pos_embedding"):
        learned.build(posemb="sincos2d")
    with pytest.raises(ValueError, match=r"(?s)missing.*cls.*unused.*MAPHead_0.*no class token"):
        bv.build(classifier="token")
    with pytest.raises(ValueError, match="not a square grid"):  # 24 position rows cannot be a class slot + grid
        learned.build(classifier="token")


def test_training_checkpoint_skips_state_but_refuses_integers_in_params(tmp_path):
    bv = BVCase("bv_train_ckpt")
    stored = np.load(bv.params, allow_pickle=False)
    groups = {k.split("/")[0] for k in stored.files}
    assert groups == {"params", "opt", "chrono"}
    assert stored["chrono/accum_examples_seen"].dtype == np.int64
    assert any(stored[k].dtype.kind == "V" for k in stored.files if k.startswith("opt/"))
    params = read_npz(bv.params)
    assert set(params) == {k for k in stored.files if k.startswith("params/")}
    # An integer array inside params is refused, naming it.
    raw = {k: stored[k] for k in stored.files}
    raw["params/Transformer/step"] = np.array(3, np.int64)
    bad = tmp_path / "int_in_params.npz"
    np.savez(bad, **raw)
    with pytest.raises(ValueError, match="params/Transformer/step has dtype int64"):
        bv.build(weights=str(bad))
    # A group other than opt/ and chrono/ beside params/ is not skipped: its integers are refused.
    raw = {k: stored[k] for k in stored.files if not k.startswith("opt/")}
    raw["other/count"] = np.array(1, np.int64)
    other = tmp_path / "other.npz"
    np.savez(other, **raw)
    with pytest.raises(ValueError, match="chrono/accum_examples_seen has dtype int64"):
        bv.build(weights=str(other))


@pytest.fixture(scope="module")
def two_tower(tmp_path_factory):
    """A SigLIP-style file: params/img/ (the sincos+MAP tower), params/txt/, params/t, params/b, and opt/."""
    bv = BVCase("bv_sincos_map")
    rng = np.random.default_rng(0)
    tree = {f"params/img/{k}": v for k, v in read_npz(bv.params).items()}
    tree.update({"params/txt/Encoder_0/encoderblock_0/LayerNorm_0/scale": rng.normal(size=64).astype("float32"),
                 "params/txt/Embed_0/embedding": rng.normal(size=(100, 64)).astype("float32"),
                 "params/t": np.array([2.3], "float32"), "params/b": np.array([-10.0], "float32"),
                 "opt/3/0/0/count": np.array(7, np.int32)})
    path = tmp_path_factory.mktemp("towers") / "siglip_like.npz"
    np.savez(path, **tree)
    return bv, str(path)


def test_two_tower_file(two_tower):
    bv, path = two_tower
    towers = r"holds towers \['img', 'txt'\].*a ViT under \['img'\].*checkpoint_prefix='img'"
    with pytest.raises(ValueError, match=towers):
        vit_keras.create(bv.config, weights=path, classes=10, image_size=bv.image_size)
    with pytest.raises(ValueError, match=r"no group 'image'.*\['img', 'txt'\]"):
        vit_keras.create(bv.config, weights=path, classes=10, image_size=bv.image_size, checkpoint_prefix="image")
    model = vit_keras.create(bv.config, weights=path, classes=10, image_size=bv.image_size, checkpoint_prefix="img")
    assert_close(model(bv.images), bv.expected["logits"], 2e-5, "img tower logits")


def test_evaluate_and_train_take_big_vision_files(two_tower):
    """The paths `vit-keras evaluate` and `train --weights` go through: a file that names its architecture."""
    bv, towers = two_tower
    for case in CASES:
        c = BVCase(case)
        model = evaluate.load_model(c.params, image_size=c.image_size)
        assert_close(model(c.images), c.expected["logits"], 2e-5, f"evaluate.load_model {case}")
    model = training._model_from(towers, 10, None, bv.image_size, None, 0.0, checkpoint_prefix="img")
    assert_close(model(bv.images), bv.expected["logits"], 2e-5, "train's model from a two-tower file")
    model = training._model_from(bv.config, 10, None, bv.image_size, bv.params, 0.0)
    assert_close(model(bv.images), bv.expected["logits"], 2e-5, "train's model, --weights")


@pytest.mark.slow  # an export, a full-size model or an evaluation run: left to `make test`
def test_cli_takes_a_tower(two_tower, capsys):
    """`vit-keras evaluate --model FILE --checkpoint-prefix img` runs; `train --checkpoint-prefix` reaches it."""
    from vit_keras import cli

    bv, towers = two_tower
    assert cli.main(["evaluate", "--model", towers, "--dataset", "digits", "--batch-size", "120"]) == 2
    assert "checkpoint_prefix='img'" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", towers, "--checkpoint-prefix", "img", "--image-size", "32x48",
                     "--dataset", "digits", "--batch-size", "120"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["count"] == 360
    args = cli.parser().parse_args(["train", "--model", towers, "--checkpoint-prefix", "img"])
    assert cli.train_config(args).checkpoint_prefix == "img"


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_r50", "tiny_rti", "tiny_vit_gap"])
def test_create_reads_the_architecture_from_google_files(name):
    """create(path): patch, width, blocks, heads, MLP, ResNet stages and width, pooling, all from the file."""
    from conftest import Case

    case = Case(name)
    model = vit_keras.create(str(case.params), image_size=case.image_size)
    c = case.config()
    emb, enc = model.get_layer("embeddings"), model.get_layer("Transformer")
    got = (emb.patch_size, emb.hidden_size, enc.num_layers, enc.num_heads, enc.mlp_dim, emb.resnet_layers,
           emb.resnet_width_factor if emb.resnet_layers is not None else 1, emb.class_token)
    want = (c["patch_size"], c["hidden_size"], c["num_layers"], c["num_heads"], c["mlp_dim"], c["resnet_layers"],
            c["resnet_width_factor"], c["classifier"] == "token")
    assert got == want
    assert_close(model(case.images), case.expected["logits"], 2e-5, name)
