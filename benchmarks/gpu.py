"""GPU checks and timings on the Keras backend of this process (run by benchmarks/gpu.sh, one process per backend).

    KERAS_BACKEND=jax python benchmarks/gpu.py --sections parity,train,infer --out jax.jsonl
    KERAS_BACKEND=torch python benchmarks/gpu.py --sections parity,infer,timm,train --out torch.jsonl
    python benchmarks/gpu.py --report jax.jsonl torch.jsonl

Sections:
- parity: the fixture cases of tests/fixtures/vit_jax built from their `.npz`,
  logits (2e-5) and attention (1e-5) against the Flax outputs, TF32 off.
- train: `model.fit` images/s and MFU of R50+ViT-B/16 at 224 (SGD recipe of
  `vit_keras.training`, jit_compile), mixed_bfloat16 and float32, batch 64 and
  256, on one synthetic batch fed again each step; peak GPU memory.
- infer: `predict_on_batch` images/s at batch 1 and 256 (mixed_bfloat16).
- timm: timm's `vit_base_r50_s16_224` (random weights) at batch 1 and 256,
  bf16 autocast, eager and `torch.compile` (PyTorch process only).

MFU = (3 for training, 1 for inference) x 43.1 GFLOPs/image (forward, R50+ViT-B/16
at 224, benchmarks/RESULTS.md) x images/s, over the device's dense peak for the
precision: the nominal spec where the device is known (H100/H200 SXM: 989 TFLOP/s
bf16, 495 TF32, 67 float32) and the measured 8192^3 matmul rate of this process.
Peak memory: on JAX the process's peak so far (it cannot be reset), on
PyTorch the configuration's own. Each row is a JSON line in `--out`; `--report` prints the tables. A section
that would end past `--deadline` (epoch seconds) is skipped with a row saying
so. `--dry-run`: a tiny hybrid at 32x32, one training configuration of 2 timed
steps, batch 1 inference, one fixture case, on whatever device there is (the
CPU in the test suite); timm (eager, batch 1) only if installed.
"""

import argparse
import gc
import json
import os
import pathlib
import sys
import time
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

GFLOPS = 43.1  # forward, per 224x224 image, R50+ViT-B/16 (benchmarks/RESULTS.md)
# Dense peaks in TFLOP/s (NVIDIA's data sheets, SXM parts; no sparsity).
NOMINAL = {"H100": {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9},
           "H200": {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9}}
# Seconds a section is expected to need on an H100, to skip it where the deadline is nearer.
NEEDS = {"parity": 60, "train": 150, "infer": 50, "timm": 100}


def emit(out, row):
    row = dict(row, backend=os.environ.get("KERAS_BACKEND", "?"))
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def device_info():
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return {"platform": d.platform, "device": d.device_kind, "count": jax.device_count()}
    import torch

    if torch.cuda.is_available():
        return {"platform": "gpu", "device": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return {"platform": "cpu", "device": "cpu", "count": 1}


def nominal_peak(device, precision):
    for name, peaks in NOMINAL.items():
        if name in device:
            return peaks[precision] * 1e12
    return None


def sync():
    import keras

    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def peak_memory_gib(reset=False):
    import keras

    if keras.backend.backend() == "jax":
        import jax

        stats = jax.local_devices()[0].memory_stats() or {}
        value = stats.get("peak_bytes_in_use")
    else:
        import torch

        if not torch.cuda.is_available():
            return None
        value = torch.cuda.max_memory_allocated()
        if reset:
            torch.cuda.reset_peak_memory_stats()
    return None if value is None else round(value / 2**30, 2)


def matmul_tflops(dtype, dry):
    """Measured dense matmul rate of this process in TFLOP/s (n=8192; 512 in a dry run)."""
    import keras

    n = 512 if dry else 8192
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        start = time.perf_counter()
        for _ in range(10):
            r = f(a)
        r.block_until_ready()
    else:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        a = torch.ones((n, n), dtype=getattr(torch, dtype), device=dev)
        a @ a
        sync()
        start = time.perf_counter()
        for _ in range(10):
            a @ a
        sync()
    return 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12


def tf32_off():
    """Full float32 matmuls and convolutions (no TF32) in this process; returns a restore function."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        before = jax.config.jax_default_matmul_precision
        jax.config.update("jax_default_matmul_precision", "highest")
        return lambda: jax.config.update("jax_default_matmul_precision", before)
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def restore():
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before

    return restore


def parity(args):
    import keras
    import numpy as np

    try:
        import pytest  # noqa: F401 (conftest's fixtures)
    except ImportError:
        sys.modules["pytest"] = types.SimpleNamespace(fixture=lambda *a, **k: (lambda f: f))
    import vit_keras
    from conftest import CASES, Case

    restore = tf32_off()
    try:
        for name in CASES[:1] if args.dry_run else CASES:
            case = Case(name)
            logits, weights = vit_keras.attention_model(case.model()).predict(case.images, verbose=0)
            err_logits = float(np.abs(keras.ops.convert_to_numpy(logits) - case.expected["logits"]).max())
            err_attn = max(float(np.abs(keras.ops.convert_to_numpy(w) - case.expected[f"attn_{i}"]).max())
                           for i, w in enumerate(weights))
            emit(args.out, {"section": "parity", "case": name, "logits_err": err_logits, "attn_err": err_attn,
                            "ok": err_logits <= 2e-5 and err_attn <= 1e-5})
    finally:
        restore()


class SameBatch:
    """An endless `PyDataset` of one synthetic batch (made lazily, so that Keras is imported first)."""

    @staticmethod
    def make(batch, size, classes):
        import keras
        import numpy as np

        class _SameBatch(keras.utils.PyDataset):
            def __init__(self):
                super().__init__()
                rng = np.random.default_rng(0)
                self.x = rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32")
                self.y = np.eye(classes, dtype="float32")[rng.integers(0, classes, batch)]

            @property
            def num_batches(self):
                return None

            def __getitem__(self, index):
                return self.x, self.y

        return _SameBatch()


def build(args, precision):
    import keras

    import vit_keras

    keras.config.set_dtype_policy(precision)
    try:
        if args.dry_run:
            return vit_keras.build_model(32, 4, 2, 64, 4, 128, classes=10, resnet_layers=(1,),
                                         resnet_width_factor=0.5, dropout=0.1), 32, 10
        return vit_keras.vit_r50_b16(image_size=224, classes=1000, pretrained=False), 224, 1000
    finally:
        keras.config.set_dtype_policy("float32")


def is_oom(error):
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def train(args, info):
    import keras

    from vit_keras import training

    backend = keras.backend.backend()
    steps, warmup = (2, 1) if args.dry_run else (args.steps, 3)
    batches = (64, 256)
    precisions = ("mixed_bfloat16", "float32")
    if backend == "torch":
        batches = (64,)  # eager PyTorch: one batch size is enough to compare
    if args.dry_run:  # one configuration (bf16 is slow on a CPU in PyTorch)
        batches, precisions = (4,), ("mixed_bfloat16" if backend == "jax" else "float32",)
    for precision in precisions:
        for batch in batches:
            if time.time() + (10 if args.dry_run else 40) > args.deadline:
                emit(args.out, {"section": "train", "precision": precision, "batch": batch, "skipped": "deadline"})
                continue
            peak_memory_gib(reset=True)
            model, size, classes = build(args, precision)
            model.compile(
                optimizer=training.make_optimizer("sgd", 0.01, 10_000, 100),
                loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                jit_compile=backend == "jax",  # torch.compile of the whole step costs minutes
            )
            marks = []

            class Mark(keras.callbacks.Callback):
                def on_train_batch_end(self, b, logs=None):
                    if b + 1 in (warmup, warmup + steps):
                        float(keras.ops.convert_to_numpy(logs["loss"]))  # waits for the step
                        sync()
                        marks.append(time.perf_counter())

            row = {"section": "train", "precision": precision, "batch": batch, "size": size,
                   "jit_compile": backend == "jax"}
            start = time.perf_counter()
            try:
                model.fit(SameBatch.make(batch, size, classes), epochs=1, steps_per_epoch=warmup + steps,
                          verbose=0, callbacks=[Mark()])
            except Exception as e:
                if not is_oom(e):
                    raise
                row["error"] = "out of memory"
            else:
                seconds = marks[1] - marks[0]
                ips = batch * steps / seconds
                row.update(images_per_s=round(ips, 1), first_steps_s=round(marks[0] - start, 1),
                           step_ms=round(1000 * seconds / steps, 1))
                row.update(mfu(info, precision, 3 * GFLOPS * 1e9 * ips, args))
            row["peak_gib"] = peak_memory_gib()
            emit(args.out, row)
            del model
            keras.backend.clear_session()
            gc.collect()


def mfu(info, precision, flops, args):
    if args.dry_run or info["platform"] != "gpu":
        return {}
    key = "bfloat16" if "bfloat16" in precision else "float32"
    measured = args.matmul[key]
    out = {"tflops": round(flops / 1e12, 1), "mfu_measured": round(flops / (measured * 1e12), 3)}
    nominal = nominal_peak(info["device"], key if key == "bfloat16" or args.matmul_is_fp32 else "tf32")
    if nominal:
        out["mfu_nominal"] = round(flops / nominal, 3)
    return out


def timed_per_image(fn, batch, min_seconds):
    fn()
    fn()
    sync()
    count, start = 0, time.perf_counter()
    while True:
        fn()
        count += 1
        if count >= 3 and time.perf_counter() - start > min_seconds:
            break
    sync()
    return batch * count / (time.perf_counter() - start)


def infer(args, info):
    import keras
    import numpy as np

    model, size, _ = build(args, "mixed_bfloat16")
    for batch in (1,) if args.dry_run else (1, 256):
        x = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype("float32")
        if keras.backend.backend() == "torch":
            import torch

            dev = "cuda" if torch.cuda.is_available() else "cpu"
            xt = torch.as_tensor(x, device=dev)

            def run():
                with torch.no_grad():
                    return model(xt, training=False)
        else:
            def run():
                return model.predict_on_batch(x)
        ips = timed_per_image(run, batch, 0.2 if args.dry_run else 3.0)
        row = {"section": "infer", "model": "vit_keras " + ("tiny (dry run)" if args.dry_run else "vit_r50_b16"),
               "precision": "mixed_bfloat16",
               "batch": batch, "images_per_s": round(ips, 1)}
        row.update(mfu(info, "bfloat16", GFLOPS * 1e9 * ips, args))
        row["peak_gib"] = peak_memory_gib()
        emit(args.out, row)


def timm_section(args, info):
    try:
        import timm
        import torch
    except ImportError as e:
        emit(args.out, {"section": "timm", "skipped": f"not installed ({e})"})
        return
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = "vit_base_r50_s16_224"
    base = timm.create_model(name, pretrained=False).eval().to(dev)
    modes = [("eager", base)]
    if not args.dry_run:
        modes.append(("torch.compile", torch.compile(base, dynamic=False)))
    for mode, model in modes:
        for batch in (1,) if args.dry_run else (1, 256):
            if time.time() + 30 > args.deadline:
                emit(args.out, {"section": "timm", "mode": mode, "batch": batch, "skipped": "deadline"})
                continue
            x = torch.randn(batch, 3, 224, 224, device=dev)
            torch.cuda.reset_peak_memory_stats() if dev == "cuda" else None

            def run():
                with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16):
                    return model(x)

            ips = timed_per_image(run, batch, 0.2 if args.dry_run else 3.0)
            row = {"section": "timm", "model": f"timm {name}", "mode": mode, "precision": "bf16 autocast",
                   "batch": batch, "images_per_s": round(ips, 1)}
            row.update(mfu(info, "bfloat16", GFLOPS * 1e9 * ips, args))
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None
            emit(args.out, row)


def report(paths):
    rows = [json.loads(line) for p in paths if os.path.exists(p) for line in open(p) if line.strip()]
    columns = ["backend", "section", "case", "model", "mode", "precision", "batch", "images_per_s", "step_ms",
               "tflops", "mfu_nominal", "mfu_measured", "peak_gib", "logits_err", "attn_err", "ok", "seconds",
               "skipped",
               "error"]
    used = [c for c in columns if any(c in r for r in rows)]
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in used}
    print("| " + " | ".join(c.ljust(widths[c]) for c in used) + " |")
    print("|" + "|".join("-" * (widths[c] + 2) for c in used) + "|")
    for r in rows:
        print("| " + " | ".join(_cell(r.get(c)).ljust(widths[c]) for c in used) + " |")
    failed = [r for r in rows if r.get("ok") is False]
    return 1 if failed else 0


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float) and value and abs(value) < 1e-2:
        return f"{value:.1e}"
    return str(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="parity,train,infer")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--deadline", type=float, default=None, help="epoch seconds; default: 8 minutes from now")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--report", nargs="*", default=None, help="print the tables of these JSON-lines files")
    args = parser.parse_args()
    if args.report is not None:
        return report(args.report)
    args.deadline = args.deadline or time.time() + 480
    import keras

    info = device_info()
    emit(args.out, {"section": "device", **info, "keras": keras.__version__})
    if info["platform"] != "gpu" and not args.dry_run:
        emit(args.out, {"section": "device", "error": "no GPU: use --dry-run for the CPU check"})
        return 1
    sections = args.sections.split(",")
    args.matmul, args.matmul_is_fp32 = {}, False
    if {"train", "infer", "timm"} & set(sections) and not args.dry_run:
        args.matmul = {"bfloat16": matmul_tflops("bfloat16", args.dry_run),
                       "float32": matmul_tflops("float32", args.dry_run)}
        # Where float32 matmuls run at most a little above the float32 peak, TF32 is not in use.
        fp32 = nominal_peak(info["device"], "float32")
        args.matmul_is_fp32 = bool(fp32 and args.matmul["float32"] * 1e12 < 1.2 * fp32)
        emit(args.out, {"section": "matmul", **{f"{k}_tflops": round(v, 1) for k, v in args.matmul.items()},
                        "float32_matmuls_are_tf32": not args.matmul_is_fp32})
    run = {"parity": parity, "train": train, "infer": infer, "timm": timm_section}
    for name in sections:
        if name not in run:
            raise SystemExit(f"Unknown section {name!r}; use {', '.join(run)}.")
        if not args.dry_run and time.time() + NEEDS[name] > args.deadline:
            emit(args.out, {"section": name, "skipped": "deadline"})
            continue
        started = time.time()
        if name == "parity":
            parity(args)
        else:
            run[name](args, info)
        emit(args.out, {"section": name, "seconds": round(time.time() - started, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
