"""Every checkpoint layout Google's code wrote loads to the same outputs; unknown ones are named."""

import re

import numpy as np
import pytest

import vit_keras
from conftest import Case, assert_close
from vit_keras.checkpoint import POSEMB_KEY, read_npz

# Linen numbers submodules per class; the published files number them across classes.
LINEN = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
         "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}


def linen(params):
    out = {}
    for key, value in params.items():
        for old, new in LINEN.items():
            key = re.sub(rf"(encoderblock_\d+)/{old}/", rf"\1/{new}/", key)
        out[key] = value
    return out


def big_vision(params, stacked=False):
    """big_vision's ViT tree: Linen names, pos_embedding at the root added to patches only."""
    out = linen(params)
    posemb = out.pop(POSEMB_KEY)
    if "cls" in out:  # big_vision gives the class token no position embedding: fold it in
        out["cls"] = out["cls"] + posemb[:, :1]
        posemb = posemb[:, 1:]
    out["pos_embedding"] = posemb
    if stacked:
        blocks = sorted({int(m.group(1)) for k in out if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
        for key in [k for k in out if k.startswith("Transformer/encoderblock_0/")]:
            rest = key[len("Transformer/encoderblock_0/"):]
            out[f"Transformer/encoderblock/{rest}"] = np.stack(
                [out.pop(f"Transformer/encoderblock_{i}/{rest}") for i in blocks])
    return out


LAYOUTS = {
    "linen": linen,
    "opt_target": lambda p: {f"opt/target/{k}": v for k, v in p.items()},
    "params_prefix": lambda p: {f"params/{k}": v for k, v in linen(p).items()},
    "big_vision": big_vision,
    "big_vision_stacked": lambda p: big_vision(p, stacked=True),
}


@pytest.mark.parametrize("case_name, layout", [
    (case, layout) for case in ("tiny_vit", "tiny_vit_gap", "tiny_r50") for layout in LAYOUTS
    if not (case == "tiny_r50" and layout.startswith("big_vision"))  # big_vision has no hybrid
])
def test_layout_loads_to_the_same_outputs(case_name, layout, tmp_path):
    case = Case(case_name)
    params = LAYOUTS[layout](read_npz(case.params))
    assert set(params) != set(read_npz(case.params))  # the rewrite changed the names
    path = tmp_path / "params.npz"
    np.savez(path, **params)
    model = vit_keras.build_model(weights=str(path), **case.config())
    assert_close(model(case.images), case.expected["logits"], 2e-5, f"{case_name} as {layout}")


def test_unknown_layout_names_what_it_found(tiny_vit, tmp_path):
    params = {f"model/encoder/{k.replace('Transformer/', '')}": v for k, v in read_npz(tiny_vit.params).items()}
    path = tmp_path / "torch_like.npz"
    np.savez(path, **params)
    with pytest.raises(ValueError, match=r"unknown checkpoint layout; found top-level groups \['model'\]"):
        vit_keras.build_model(weights=str(path), **tiny_vit.config())
