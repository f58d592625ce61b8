"""The model an export converts, prepared once and passed to every step of the export."""

from vit_keras.model import float32_copy, fold_weight_standardization
from vit_keras.precision import EXPORT_PRECISIONS, check_dtype, inference_copy


def prepare_export_model(model, precision="float32"):
    """Returns the inference copy that the exports convert: float32, weight standardisation folded.

    With `precision="bfloat16"` (SavedModel) it is `inference_copy(model,
    "bfloat16")` instead: weights stored once in bfloat16, statistics and
    softmax in float32, float32 logits.

    - float32 throughout (`float32_copy`): TFLite cannot convert bfloat16, and
      the served files take float32 pixels and give float32 probabilities;
    - the hybrid's ResNet kernels stored standardised
      (`fold_weight_standardization`): the served graph skips that work.

    The outputs are the model's within float32 rounding. A model that is
    prepared already comes back as it is (no copy), so each export function
    may prepare what it is given and `serving.export` prepares once for all
    of its steps (conversion, parity table).

    Args:
        model: keras.Model. A model from this package's builders.
        precision: str. "float32" or "bfloat16". Defaults to "float32".

    Example:
    >>> import vit_keras
    >>> model = vit_keras.build_model(32, 1, 1, 64, 4, 128, classes=10, resnet_layers=(1,))
    >>> ready = prepare_export_model(model)
    >>> ready is not model, prepare_export_model(ready) is ready
    (True, True)
    """
    check_dtype(precision, EXPORT_PRECISIONS, "precision")
    if precision == "bfloat16":
        return inference_copy(model, "bfloat16")  # a bfloat16 copy already comes back as it is
    return fold_weight_standardization(float32_copy(model))

