"""Shared helpers of the benchmark scripts: timing, the float32 matmul ceiling, tables."""

import os
import platform
import time

import numpy as np

# Forward FLOPs per 224x224 image (multiply-add = 2 FLOPs), from the model definitions.
GFLOPS_224 = {"vit_r50_b16": 43.1, "vit_b16": 35.1}


def timed(fn, warmup=2, repeats=10, min_seconds=1.0):
    """Median seconds per call of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 10 * repeats:
            break
    return float(np.median(times))


def matmul_gflops(n=2048, dtype="float32"):
    """The machine's measured float32 matmul rate in GFLOP/s (TensorFlow, all cores)."""
    import tensorflow as tf

    a = tf.random.normal((n, n), dtype=dtype)
    b = tf.random.normal((n, n), dtype=dtype)
    seconds = timed(lambda: tf.linalg.matmul(a, b).numpy(), warmup=2, repeats=5)
    return 2 * n**3 / seconds / 1e9


def model_parser(doc, batch):
    """The argument parser of a one-model script: its docstring as help, `--model` and `--batch`."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_r50_b16")
    p.add_argument("--batch", type=int, default=batch)
    return p


def machine():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        return f"{name} ({len(gpus)} GPU)"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def table(rows, columns):
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    def line(values):
        return "| " + " | ".join(str(v).ljust(w) for v, w in zip(values, widths)) + " |"

    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line([r.get(c, "") for c in columns]) for r in rows]
    return "\n".join(out)


BF16_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info():
    """'CPU model; flags: ...' from /proc/cpuinfo (the flags that decide bfloat16/int8 speed), or the platform."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    have = [f for f in BF16_FLAGS if f in flags]
    return f"{model}, {os.cpu_count()} cores; flags: {' '.join(have) or 'none of ' + ' '.join(BF16_FLAGS)}"


def load_average():
    """The 1-minute load average (other processes on a shared machine), or None."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
