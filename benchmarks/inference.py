"""Inference images/s and peak memory: vit_keras against timm and the older vit-keras, one run.

    make bench                      # installs what it needs, then runs this script
    python benchmarks/inference.py [--models vit_r50_b16 vit_b16] [--batches 1 8]
                                   [--rounds 3] [--baseline GIT_REF] [--engines ...]
    python benchmarks/inference.py --engines vit_keras vit_keras-f32 timm vit_keras-mixed vit_keras-bf16 timm-bf16

Engines, each in a fresh process so that its peak resident memory is its own,
and strictly alternating: every round runs each engine once for a given model
and batch, and the table reports the median over rounds.

- `vit_keras`: this checkout, float32, the model as built, under `tf.function`.
- `vit_keras-folded`: the hybrid's inference copy whose ResNet kernels are
  standardised once (`vit_keras.fold_weight_standardization`; what the
  SavedModel export serves). Hybrids only: a plain ViT has nothing to fold.
- `vit_keras-xla`: the folded copy with `jit_compile=True`.
- `vit_keras-savedmodel`, `vit_keras-savedmodel-bf16`: what TF Serving runs: the model exported once
  (`vit_keras.serving.export_saved_model`, float32 / `precision="bfloat16"`, before the rounds), then
  in each process `tf.saved_model.load` and its `predict_images` signature (pixels in; preprocessing,
  softmax and top-5 inside); no Keras model is built in the timed process.
- `vit_keras-tflite`: the float32 TFLite file (converted once, before the rounds)
  in the LiteRT interpreter with all cores; this process does not import TensorFlow.
- `ENGINE@REF` (with `--baseline REF`): each `vit_keras` engine asked for
  (TFLite's aside) run again with the package as it was at git REF, for
  before/after figures from one run.
- `vit_keras-f32`, `vit_keras-bf16` (`-xla`: under `jit_compile=True`): the serving path,
  `vit_keras.inference_copy(model, dtype)` of the float32 model (ResNet kernels standardised once;
  bfloat16: weights stored once in bfloat16), the original let go before timing.
- `vit_keras-mixed`: the model built under the `mixed_bfloat16` policy (weights cast on every call).
- `timm-bf16`: timm under `torch.autocast("cpu", torch.bfloat16)`; the bfloat16 engines'
  `x timm` is against this row. `BF16_ENGINES` lists the float32-and-bfloat16 set for one run.
- `timm`: timm's `vit_base_r50_s16_224` / `vit_base_patch16_224` on PyTorch CPU,
  eager under `torch.inference_mode()` (the `bench` extra).
- `vit-keras-0.2`: the older `vit-keras` package's `vit_b16` (no hybrid there),
  under tf_keras, from `.bench/old-vit-keras` (it has our import name, so it lives
  in a folder of its own; `make bench-deps` puts it there).

On a GPU, TensorFlow and timm use it (timm when torch sees CUDA); `--precision
float32` turns TF32 off in both, `--precision bfloat16` runs vit_keras under the
`mixed_bfloat16` policy and timm under `torch.autocast` (TFLite and vit-keras rows
stay float32).
"""

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import GFLOPS_224, cpu_info, load_average, machine, matmul_gflops, table, timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, ".bench")
OLD_VIT_KERAS = os.path.join(BENCH_DIR, "old-vit-keras")
TIMM = {"vit_r50_b16": "vit_base_r50_s16_224", "vit_b16": "vit_base_patch16_224"}
OLD_BUILDERS = {"vit_b16": "vit_b16"}
HYBRIDS = {"vit_r50_b16"}
ENGINES = ["vit_keras", "vit_keras-folded", "vit_keras-xla", "vit_keras-tflite", "timm", "vit-keras-0.2"]
# float32 and bfloat16 side by side, one run (`--engines` picks; `--precision` is then ignored for these):
# the old paths (`vit_keras`, `vit_keras-mixed`), the inference copies, timm in both precisions.
BF16_ENGINES = ["vit_keras", "vit_keras-f32", "vit_keras-f32-xla", "timm", "vit_keras-mixed", "vit_keras-bf16",
                "vit_keras-bf16-xla", "timm-bf16"]
# The engines compared with `timm-bf16` (the rest with `timm`).
BF16_ROWS = {"vit_keras-mixed", "vit_keras-bf16", "vit_keras-bf16-xla", "timm-bf16", "vit_keras-savedmodel-bf16"}


def _tflite_path(name, size):
    return os.path.join(BENCH_DIR, f"{name}-{size}-float32.tflite")


def _saved_model_dir(name, size, precision, ref=None):
    return os.path.join(BENCH_DIR, f"{name}-{size}-savedmodel-{precision}" + (f"@{ref}" if ref else ""))


def _inputs(batch, size):
    import numpy as np

    return np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype("float32")


def _keras_fn(model, x, jit_compile=False):
    import tensorflow as tf

    tf.config.experimental.enable_tensor_float_32_execution(False)  # float32 means float32 on GPUs

    call = tf.function(lambda v: model(v, training=False), jit_compile=jit_compile)
    return lambda: call(x).numpy()


def prepare_tflite(name, size):
    """Converts the float32 TFLite file once (not timed)."""
    import vit_keras
    from vit_keras import export

    model = vit_keras.BUILDERS[name](image_size=size, classes=1000, pretrained=False)
    os.makedirs(BENCH_DIR, exist_ok=True)
    with open(_tflite_path(name, size), "wb") as f:
        f.write(export.convert_tflite(model, "float32"))


def _import_vit_keras(ref=None):
    """`vit_keras` from this checkout, or as it was at git `ref` (unpacked by main())."""
    ref_dir = None
    if ref:
        ref_dir = os.path.join(BENCH_DIR, "ref-" + ref)
        sys.path.insert(0, ref_dir)
    import vit_keras

    if ref_dir and not vit_keras.__file__.startswith(ref_dir):
        raise ImportError(f"imported {vit_keras.__file__}, not the package at {ref_dir}")
    return vit_keras


def prepare_saved_models(name, size, ref=None):
    """Exports the float32 and bfloat16 SavedModels once (not timed), with the package at `ref`."""
    import shutil

    vit_keras = _import_vit_keras(ref)
    from vit_keras.serving.saved_model import export_saved_model

    model = vit_keras.BUILDERS[name](image_size=size, classes=1000, pretrained=False)
    for precision in ("float32", "bfloat16"):
        out = _saved_model_dir(name, size, precision, ref)
        shutil.rmtree(out, ignore_errors=True)
        export_saved_model(model, out, name="model", precision=precision)


def make_fn(engine, name, batch, size, precision="float32"):
    x = _inputs(batch, size)
    engine, _, ref = engine.partition("@")
    if engine.startswith("vit_keras-savedmodel"):
        import tensorflow as tf

        saved = "bfloat16" if engine.endswith("-bf16") else "float32"
        served = tf.saved_model.load(os.path.join(_saved_model_dir(name, size, saved, ref), "model", "1"))
        predict = served.signatures["predict_images"]
        pixels = tf.constant((x + 1) * 127.5)
        return lambda: predict(images=pixels)["probabilities"].numpy()
    if engine == "vit_keras-tflite":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=_tflite_path(name, size), num_threads=os.cpu_count())
        index = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(index, x.shape)
        interpreter.allocate_tensors()
        pixels = (x + 1) * 127.5

        def fn():
            interpreter.set_tensor(index, pixels)
            interpreter.invoke()

        return fn
    if engine.startswith("vit_keras"):
        import keras

        vit_keras = _import_vit_keras(ref)

        if precision == "bfloat16" or engine == "vit_keras-mixed":
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
        model = vit_keras.BUILDERS[name](image_size=size, classes=1000, pretrained=False)
        if engine in ("vit_keras-folded", "vit_keras-xla"):
            model = vit_keras.fold_weight_standardization(model)
        if engine.startswith(("vit_keras-f32", "vit_keras-bf16")):  # the inference copy; the original let go
            model = vit_keras.inference_copy(model, "float32" if engine.startswith("vit_keras-f32") else "bfloat16")
            gc.collect()
        return _keras_fn(model, x, jit_compile=engine.endswith("-xla"))
    if engine in ("timm", "timm-bf16"):
        import timm
        import torch

        torch.set_num_threads(os.cpu_count())
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = timm.create_model(TIMM[name], pretrained=False).eval().to(device)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)

        def fn():
            with torch.inference_mode(), torch.autocast(device, torch.bfloat16,
                                                              enabled=precision == "bfloat16" or engine == "timm-bf16"):
                model(xt)[0, 0].item()  # waits for the device

        return fn
    if engine == "vit-keras-0.2":
        if name not in OLD_BUILDERS:
            raise ValueError(f"vit-keras has no {name}")
        if not os.path.isdir(OLD_VIT_KERAS):
            raise FileNotFoundError(f"{OLD_VIT_KERAS} missing: run make bench-deps")
        os.environ["TF_USE_LEGACY_KERAS"] = "1"  # vit-keras is written for Keras 2 (tf_keras)
        sys.path.insert(0, OLD_VIT_KERAS)
        from vit_keras import vit

        if not vit.__file__.startswith(OLD_VIT_KERAS):
            raise ImportError(f"imported {vit.__file__}, not the old package")
        model = getattr(vit, OLD_BUILDERS[name])(image_size=size, classes=1000, pretrained=False,
                                                 pretrained_top=False)
        return _keras_fn(model, x)
    raise ValueError(f"unknown engine {engine}")


def torch_matmul_gflops(n=2048, dtype="float32"):
    """PyTorch's own matmul rate on this machine, for the timm rows' context."""
    import time

    import torch

    torch.set_num_threads(os.cpu_count())
    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 2 * n**3 * 5 / (time.perf_counter() - t) / 1e9


def child(args):
    engine, name, batch = args.child
    if engine == "prepare-tflite":
        prepare_tflite(name, args.image_size)
        result = {}
    elif engine.startswith("prepare-savedmodel"):
        prepare_saved_models(name, args.image_size, engine.partition("@")[2])
        result = {}
    elif engine == "torch-matmul":
        result = {"gflops": torch_matmul_gflops(), "bf16 gflops": torch_matmul_gflops(dtype="bfloat16")}
    else:
        fn = make_fn(engine, name, int(batch), args.image_size, args.precision)
        seconds = timed(fn, warmup=2, repeats=5, min_seconds=2.0)
        result = {"images/s": int(batch) / seconds}
    result["peak MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def spawn(image_size, precision, engine, name, batch):
    """Runs one configuration in a fresh process; returns its result or an error line."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--image-size", str(image_size),
                           "--precision", precision, "--child", engine, name, str(batch)],
                          capture_output=True, text=True)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or ["failed"]
        return {"error": lines[-1][:70]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def unpack_ref(ref):
    """Unpacks the vit_keras package as it was at git `ref` into .bench/ref-REF."""
    target = os.path.join(BENCH_DIR, "ref-" + ref)
    if not os.path.isdir(target):
        os.makedirs(target)
        archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "vit_keras"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    return target


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(TIMM))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--engines", nargs="+", default=ENGINES)
    p.add_argument("--baseline", help="also run the package as it was at this git ref")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    engines = list(args.engines)
    if args.baseline:
        unpack_ref(args.baseline)
        engines = [twin for e in engines for twin in
                   ([e, f"{e}@{args.baseline}"] if e.startswith("vit_keras") and e != "vit_keras-tflite" else [e])]
    loads = [load_average()]
    ceiling = matmul_gflops()
    bf16_rate = matmul_gflops(dtype="bfloat16")
    torch_rates = spawn(args.image_size, args.precision, "torch-matmul", "-", 0)
    torch_rate = torch_rates.get("gflops")
    rows = []
    for name in args.models:
        flops = GFLOPS_224[name] * (args.image_size / 224) ** 2
        active = [e for e in engines if (e != "vit-keras-0.2" or name in OLD_BUILDERS)
                  and (e != "vit_keras-folded" or name in HYBRIDS)]
        if "vit_keras-tflite" in active:
            prepared = spawn(args.image_size, args.precision, "prepare-tflite", name, 0)
            if "error" in prepared:
                print("TFLite conversion failed:", prepared["error"], flush=True)
        for ref in sorted({e.partition("@")[2] for e in active if e.startswith("vit_keras-savedmodel")}):
            prepared = spawn(args.image_size, args.precision, "prepare-savedmodel" + (f"@{ref}" if ref else ""),
                             name, 0)
            if "error" in prepared:
                print("SavedModel export failed:", ref or "", prepared["error"], flush=True)
        for batch in args.batches:
            results = {e: [] for e in active}
            for r in range(args.rounds):
                for engine in active:  # strictly alternating
                    results[engine].append(spawn(args.image_size, args.precision, engine, name, batch))
                    loads.append(load_average())
                    print(r, name, batch, engine, results[engine][-1], flush=True)
            speeds = {e: [x["images/s"] for x in v if "images/s" in x] for e, v in results.items()}
            timm = statistics.median(speeds["timm"]) if speeds.get("timm") else None
            timm_bf16 = statistics.median(speeds["timm-bf16"]) if speeds.get("timm-bf16") else None
            for engine, runs in results.items():
                row = {"model": name, "batch": batch, "engine": engine}
                if not speeds[engine]:
                    row["images/s"] = "n/a: " + runs[-1]["error"]
                else:
                    ips = statistics.median(speeds[engine])
                    row.update({"images/s": f"{ips:.2f}",
                                "peak MB": f"{max(x['peak MB'] for x in runs if 'peak MB' in x):.0f}",
                                "of ceiling": f"{ips * flops / ceiling:.0%}"})
                    bf16 = engine.split("@")[0] in BF16_ROWS or args.precision == "bfloat16"
                    if bf16 and timm_bf16:  # bfloat16 rows against timm's autocast row
                        row["x timm"] = f"{ips / timm_bf16:.2f} (bf16)"
                    elif timm:
                        row["x timm"] = f"{ips / timm:.2f}"
                rows.append(row)
    loads = [x for x in loads if x is not None]
    print(f"\nCPU: {cpu_info()}. Matmul 2048x2048, GFLOP/s: TensorFlow float32 {ceiling:.0f}, bfloat16 "
          f"{bf16_rate:.0f}; PyTorch float32 {torch_rate or 0:.0f}, "
          f"bfloat16 {torch_rates.get('bf16 gflops') or 0:.0f}. "
          + (f"1-min load average during the run: {min(loads):.1f}-{max(loads):.1f} "
             f"(median {statistics.median(loads):.1f}) on {os.cpu_count()} cores." if loads else ""))
    print(f"\nInference at {args.image_size}x{args.image_size}, {args.precision}, on {machine()}; "
          f"median of {args.rounds} alternating rounds, each a fresh process.\n"
          f"float32 matmul ceiling (TensorFlow, 2048x2048): {ceiling:.0f} GFLOP/s; PyTorch's own: "
          + (f"{torch_rate:.0f} GFLOP/s" if torch_rate else "n/a")
          + "; forward GFLOPs/image: "
          + ", ".join(f"{k} {GFLOPS_224[k] * (args.image_size / 224) ** 2:.1f}" for k in args.models) + "\n")
    print(table(rows, ["model", "batch", "engine", "images/s", "x timm", "peak MB", "of ceiling"]))


if __name__ == "__main__":
    main()
