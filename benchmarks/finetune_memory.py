"""Peak memory of one training step: plain vs --remat vs --lora-rank 8 vs --trainable head.

    python benchmarks/finetune_memory.py [--backends tensorflow jax] [--limit-gb 10] [--out results.jsonl]

Each configuration runs in a fresh process under its Keras backend: build the
model (random weights, 10 classes), `finetune.prepare` it as `vit-keras
train` does, compile with the training recipe's SGD, reset the process's
peak RSS (Linux `/proc/self/clear_refs`) after the optimizer's slots are built, and run the
first step: the memory column is that step's peak RSS above the RSS before
it: activations, gradients, temporaries and what tracing/compiling the step
takes (the same for every variant; a second step would reuse the
allocators' cached buffers, which hides the activations). On JAX that RSS is
dominated by XLA compiling the step, so the JAX rows also give XLA's own
account of the compiled step's temporary memory (`memory_analysis()`), which
is where remat shows. Time is a second
step's wall time, batch 8 only (noisy on a shared machine). Configurations whose estimated growth exceeds
`--limit-gb` are listed as not run. On a GPU, `benchmarks/gpu.py` records the
device's peak memory for the same configurations.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

MODELS = {"vit_b16": "ViT-B/16", "vit_r50_b16": "R50+ViT-B/16"}
VARIANTS = ("plain", "remat", "lora8", "head")
# (model, size, batch) in the order they run; the first rows are the ones that must run.
GRID = [("vit_b16", 224, 8), ("vit_r50_b16", 224, 8), ("vit_b16", 224, 32), ("vit_b16", 384, 8),
        ("vit_r50_b16", 224, 32), ("vit_r50_b16", 384, 8), ("vit_b16", 384, 32), ("vit_r50_b16", 384, 32)]


def estimate_gb(model, size, batch, variant):
    """A rough upper estimate of a plain step's activations (float32), to skip what cannot fit."""
    tokens = (size // 16) ** 2 + 1
    per_block = batch * tokens * (768 * 16 + 3072 * 3) * 4 + batch * 12 * tokens * tokens * 4 * 3
    resnet = batch * (size / 4) ** 2 * 256 * 4 * 30 if model == "vit_r50_b16" else 0
    total = 12 * per_block + resnet
    if variant == "remat":
        total = total / 6
    return total / 2**30


def remat_overhead(model_name, size, batch, rounds=4):
    """Median step times of the plain and the remat model, steps alternated so that load from other
    processes hits both alike."""
    import numpy as np

    import keras
    import vit_keras
    from vit_keras import training

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32")
    y = np.eye(10, dtype="float32")[np.arange(batch) % 10]
    models = {}
    for remat in (False, True):
        m = vit_keras.create(model_name, classes=10, image_size=size, remat=remat)
        m.compile(optimizer=training.make_optimizer("sgd", 0.01, 1000, 10),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  jit_compile=keras.backend.backend() == "jax")
        m.train_on_batch(x, y)
        models[remat] = m
    times = {False: [], True: []}
    for _ in range(rounds):
        for remat, m in models.items():
            start = time.perf_counter()
            m.train_on_batch(x, y)
            times[remat].append(time.perf_counter() - start)
    plain, remat = (float(np.median(times[k])) for k in (False, True))
    return {"backend": keras.backend.backend(), "model": model_name, "size": size, "batch": batch,
            "plain_s": plain, "remat_s": remat, "overhead": remat / plain - 1}


def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def one(model_name, size, batch, variant):
    """Runs in the child: returns its measurements."""
    import numpy as np

    import keras
    import vit_keras
    from vit_keras import finetune, training

    model = vit_keras.create(model_name, classes=10, image_size=size, remat=variant == "remat")
    model = finetune.prepare(model, trainable="head" if variant == "head" else None,
                             lora_rank=8 if variant == "lora8" else None)
    counts = finetune.param_counts(model)
    model.compile(optimizer=training.make_optimizer("sgd", 0.01, 1000, 10),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  jit_compile=keras.backend.backend() == "jax")
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32")
    y = np.eye(10, dtype="float32")[np.arange(batch) % 10]
    model.optimizer.build(model.trainable_variables)  # the slots are there before the step
    before = rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass  # VmHWM is then the process's peak so far, which is below `before` + the step's
    start = time.perf_counter()
    model.train_on_batch(x, y)  # traces and compiles too: part of what a first step costs
    first = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    seconds = None
    if batch <= 8:  # a second step, for the time without tracing (slow on 2 cores at batch 32)
        start = time.perf_counter()
        model.train_on_batch(x, y)
        seconds = time.perf_counter() - start
    row = {"growth_gb": (peak - before) / 2**20, "rss_before_gb": before / 2**20, "step_s": seconds,
           "first_step_s": first, **counts}
    if keras.backend.backend() == "jax":
        row["xla_temp_gb"] = xla_temp_bytes(model, x, y) / 2**30
    return row


def xla_temp_bytes(model, x, y):
    """The temporary memory XLA's buffer assignment gives the compiled train step (JAX): its activations.

    Measured RSS on JAX is dominated by compiling the step, which is the same
    with and without remat; this is the step's own working memory.
    """
    import jax

    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                 optimizer_variables=True, metrics_variables=True, purge_model_variables=False)
    compiled = jax.jit(model.train_step).lower(state, (x, y, None)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["tensorflow", "jax"])
    p.add_argument("--limit-gb", type=float, default=10.0)
    p.add_argument("--out", default="finetune_memory.jsonl", help="results, one JSON line per configuration")
    p.add_argument("--only", nargs="*", default=None, help="model:size:batch entries of the grid to run")
    p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--timing", nargs=3, metavar=("MODEL", "SIZE", "BATCH"),
                   help="only the remat step-time overhead: plain and remat steps alternated in one process")
    args = p.parse_args()
    if args.timing:
        print(json.dumps(remat_overhead(args.timing[0], int(args.timing[1]), int(args.timing[2]))))
        return
    if args.one:
        model_name, size, batch, variant = args.one
        print("RESULT " + json.dumps(one(model_name, int(size), int(batch), variant)))
        return
    print(describe_machine())
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {tuple(r["key"]) for r in map(json.loads, f)}
    grid = GRID if args.only is None else [g for g in GRID if f"{g[0]}:{g[1]}:{g[2]}" in args.only]
    for model_name, size, batch in grid:
        for backend in args.backends:
            for variant in VARIANTS:
                key = [backend, model_name, size, batch, variant]
                if tuple(key) in done:
                    continue
                row = {"key": key}
                need = estimate_gb(model_name, size, batch, variant)
                if need > args.limit_gb:
                    row["skipped"] = f"not run: would exceed {args.limit_gb:g} GB (about {need:.0f} GB)"
                else:
                    env = dict(os.environ, KERAS_BACKEND=backend, MALLOC_MMAP_THRESHOLD_="65536",
                               TF_CPP_MIN_LOG_LEVEL="2")
                    proc = subprocess.run([sys.executable, __file__, "--one", model_name, str(size), str(batch),
                                           variant], env=env, capture_output=True, text=True)
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if lines:
                        row.update(json.loads(lines[-1][len("RESULT "):]))
                    else:
                        row["skipped"] = "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print_table(args.out)


def describe_machine():
    """CPU model and flags, and the matmul rate (TensorFlow); on a machine without TensorFlow, JAX's devices."""
    cpu, flags = "?", []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "?":
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = [x for x in line.split(":", 1)[1].split() if x.startswith(("avx512", "amx", "fma"))]
    text = f"CPU: {cpu}, {os.cpu_count()} cores; flags: {' '.join(sorted(flags)[:8])}"
    try:
        from common import machine, matmul_gflops

        return f"{text}\n{machine()}; matmul {matmul_gflops():.0f} GFLOP/s (float32, TensorFlow, all cores)"
    except ImportError:  # the GPU machine has no TensorFlow
        import jax

        return f"{text}\nJAX devices: {jax.devices()}"


def print_table(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    by = {tuple(r["key"]): r for r in rows}
    print("| backend | model | size | batch | variant | trainable / total params | step peak RSS growth (GB) "
          "| vs plain | XLA temp (GB) | vs plain | step time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        backend, model_name, size, batch, variant = r["key"]
        if "skipped" in r:
            print(f"| {backend} | {MODELS[model_name]} | {size} | {batch} | {variant} | | {r['skipped']} | | | | |")
            continue
        plain = by.get((backend, model_name, size, batch, "plain"), {})
        ratio = f"{r['growth_gb'] / plain['growth_gb']:.2f}x" if plain.get("growth_gb") else ""
        temp = f"{r['xla_temp_gb']:.2f}" if "xla_temp_gb" in r else ""
        temp_ratio = f"{r['xla_temp_gb'] / plain['xla_temp_gb']:.2f}x" if plain.get("xla_temp_gb") and temp else ""
        share = 100 * r["trainable_params"] / r["total_params"]
        step = "" if r.get("step_s") is None else f"{r['step_s']:.1f}"
        print(f"| {backend} | {MODELS[model_name]} | {size} | {batch} | {variant} | "
              f"{r['trainable_params']:,} / {r['total_params']:,} ({share:.2f}%) | {r['growth_gb']:.2f} | "
              f"{ratio} | {temp} | {temp_ratio} | {step} |")


if __name__ == "__main__":
    main()
