"""The export functions under their first import path (`vit_keras.export`); they live in `vit_keras.serving`."""

from vit_keras.model import float32_copy  # noqa: F401
from vit_keras.predict import (  # noqa: F401
    BATCH_SIZE,
    as_probabilities,
    batched_probabilities,
    label_names,
    probabilities,
)
from vit_keras.files import MANIFEST, check_name_and_version  # noqa: F401
from vit_keras.serving.images import MAX_GIF_STEPS, MAX_PIXELS, checked_pixels, decode_images  # noqa: F401
from vit_keras.serving.onnx import export_onnx, onnx_predict, onnx_session  # noqa: F401
from vit_keras.serving.saved_model import export_saved_model  # noqa: F401
from vit_keras.serving.tflite import (  # noqa: F401
    INT8_OPS,
    TFLITE_VARIANTS,
    convert_tflite,
    export_tflite,
    format_parity,
    parity_table,
    tflite_interpreter,
    tflite_predict,
    tflite_rollout,
)
from vit_keras.serving.warmup import warmup_request  # noqa: F401

_check_name_and_version = check_name_and_version  # its name here before it became public in `files`
