"""A few training steps with `vit-keras train` off TensorFlow; run by tests/test_backends.py.

    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python tests/backend_train_run.py OUT [train arguments ...]

Hides TensorFlow (tests/no_tensorflow.py), runs `vit_keras.cli.main(["train",
...])` and prints the run's metrics.json as one JSON line, and whether any
TensorFlow module was imported.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import no_tensorflow

no_tensorflow.install()

from vit_keras import cli  # noqa: E402

out, args = sys.argv[1], sys.argv[2:]
code = cli.main(["train", "--out", out, *args])
if code:
    sys.exit(code)
metrics = json.loads((pathlib.Path(out) / "metrics.json").read_text())
print(json.dumps({"metrics": metrics, "tensorflow_modules": no_tensorflow.imported()}))
