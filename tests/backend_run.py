"""Checks one Keras backend against the Flax fixtures; run by tests/test_backends.py, one process per backend.

    KERAS_BACKEND=jax python tests/backend_run.py OUT [READ ...]

For each case of tests/fixtures/vit_jax it builds the model with
`build_model(weights=...)`, compares the logits and every block's attention
with the fixtures and the rollout of those weights with a NumPy rollout of the
fixture's weights, and writes `OUT/<case>.keras` (on `tiny_r50` it also runs
`load_npz` into a fresh model and reloads that file here); on `tiny_vit` and
`tiny_r50` its bfloat16 `inference_copy` must meet the bounds of
tests/test_bfloat16.py (which checks every case on TensorFlow), and
`tiny_r50`'s is written as `OUT/tiny_r50_bf16.keras`); then it loads
`tiny_r50.keras`, `tiny_vit_gap.keras` and `tiny_r50_bf16.keras` from each READ
folder (written on another backend) and compares those too. Off TensorFlow,
tests/no_tensorflow.py makes `import tensorflow` fail as where it is not
installed, so anything that still needs it shows up. Prints one line per
check; exits 1 with the failures listed.
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import no_tensorflow

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
if BACKEND != "tensorflow":
    no_tensorflow.install()

import numpy as np  # noqa: E402

import keras  # noqa: E402

import vit_keras  # noqa: E402
from conftest import CASES, Case  # noqa: E402
from test_bfloat16 import check_against, logit_bound  # noqa: E402
from vit_keras import visualize  # noqa: E402

# Files from another backend: the hybrid and the class-token-free ViT (each read costs a compile on JAX).
READ_CASES = ("tiny_r50", "tiny_vit_gap")
# bfloat16 copies: the plain ViT and the hybrid (GroupNorm, weight standardisation); each costs JAX compiles.
BFLOAT16_CASES = ("tiny_vit", "tiny_r50")
LOGITS_ATOL, ATTENTION_ATOL, ROLLOUT_ATOL = 2e-5, 1e-5, 1e-5
failures = []


def numpy_rollout(weights):
    """Abnar & Zuidema's rollout (mean over heads), in float64 NumPy."""
    result = None
    for w in weights:
        a = np.asarray(w, np.float64).mean(axis=1)
        a = a + np.eye(a.shape[-1])
        a = a / a.sum(-1, keepdims=True)
        result = a if result is None else a @ result
    return result


def numpy_grid(rollout, grid):
    """The class token's row over the patch grid (the mean row without a class token), max 1."""
    tokens = rollout.shape[-1]
    rows = rollout.mean(axis=1) if tokens == grid[0] * grid[1] else rollout[:, 0, 1:]
    rows = rows.reshape(-1, *grid)
    return rows / rows.max(axis=(1, 2), keepdims=True)


def check(what, actual, expected, atol):
    actual, expected = keras.ops.convert_to_numpy(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        failures.append(f"{what}: shape {actual.shape} != {expected.shape}")
        return
    err = float(np.abs(actual - expected).max())
    print(f"{BACKEND} {what}: max abs error {err:.2e}")
    if not err <= atol:
        failures.append(f"{what}: max abs error {err:.3g} > {atol:.3g}")


def check_model(model, case, what):
    # `predict` runs the model compiled (one XLA program on JAX, not op by op: seconds, not tens).
    logits, weights = vit_keras.attention_model(model).predict(case.images, verbose=0)
    check(f"{what} logits", logits, case.expected["logits"], LOGITS_ATOL)
    layers = case.config()["num_layers"]
    if len(weights) != layers:
        failures.append(f"{what}: {len(weights)} attention tensors for {layers} blocks")
    for i, w in enumerate(weights):
        check(f"{what} attn_{i}", w, case.expected[f"attn_{i}"], ATTENTION_ATOL)
    return weights


def check_bfloat16(model, case, what):
    """A bfloat16 model (or `inference_copy`) against the fixture's float32 logits, within test_bfloat16's bounds."""
    # JAX: one compiled program (an eager call compiles op by op, tens of seconds); elsewhere a call is quicker.
    logits = model.predict(case.images, verbose=0) if BACKEND == "jax" else \
        keras.ops.convert_to_numpy(model(case.images, training=False))
    expected = case.expected["logits"]
    try:
        dlogit, dprob, _ = check_against(logits, expected, logit_bound(model, expected), what)
        print(f"{BACKEND} {what}: bfloat16 logits off by {dlogit:.2e}, probabilities by {dprob:.2e}")
    except AssertionError as e:
        failures.append(str(e))


def main(out, reads):
    if keras.backend.backend() != BACKEND:
        raise SystemExit(f"Keras runs on {keras.backend.backend()}, not KERAS_BACKEND={BACKEND}.")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        case = Case(name)
        model = case.model()
        weights = check_model(model, case, f"{name} build_model(weights=)")
        expected = [case.expected[f"attn_{i}"] for i in range(len(weights))]
        check(f"{name} rollout", visualize.rollout(weights), numpy_rollout(expected), ROLLOUT_ATOL)
        grid = visualize.grid_shape(model)
        check(f"{name} rollout_grid", visualize.rollout_grid(weights, grid),
              numpy_grid(numpy_rollout(expected), grid), ROLLOUT_ATOL)
        model.save(out / f"{name}.keras")
        if name in BFLOAT16_CASES:
            copy = vit_keras.inference_copy(model, "bfloat16")
            check_bfloat16(copy, case, f"{name} inference_copy")
            if name == "tiny_r50":
                copy.save(out / f"{name}_bf16.keras")
        if name == "tiny_r50":  # the other ways in, on one case: load_npz, and a reload here
            fresh = vit_keras.build_model(**case.config())
            vit_keras.load_npz(fresh, str(case.params))
            check(f"{name} load_npz logits", fresh.predict(case.images, verbose=0),
                  case.expected["logits"], LOGITS_ATOL)
            check_model(keras.saving.load_model(out / f"{name}.keras", safe_mode=True), case,
                        f"{name} .keras reload")
    for folder in reads:
        for name in READ_CASES:
            path = pathlib.Path(folder) / f"{name}.keras"
            if not path.exists():
                failures.append(f"{path} is missing")
                continue
            model = keras.saving.load_model(path, safe_mode=True)
            check_model(model, Case(name), f"{name} .keras from {pathlib.Path(folder).name}")
        path = pathlib.Path(folder) / "tiny_r50_bf16.keras"
        if not path.exists():
            failures.append(f"{path} is missing")
            continue
        check_bfloat16(keras.saving.load_model(path, safe_mode=True), Case("tiny_r50"),
                       f"tiny_r50 bfloat16 .keras from {pathlib.Path(folder).name}")
    if BACKEND != "tensorflow":
        loaded = no_tensorflow.imported()
        if loaded:
            failures.append(f"TensorFlow modules were imported: {loaded[:5]}")
    if failures:
        print("FAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    print(f"{BACKEND}: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
