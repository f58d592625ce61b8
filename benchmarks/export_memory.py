"""Peak memory (RSS) of `vit-keras export` on full-size models, per format.

    python benchmarks/export_memory.py [--models vit_r50_b16 vit_b16] [--image-sizes 224 384]
                                       [--formats saved_model tflite] [--work DIR] [--kill-above-gb 20]

Each model is built with random weights (`pretrained=False`; a random head so the classes differ), saved
as `.keras` once (in a subprocess), and then exported by the real command,

    vit-keras export --model M.keras --format F --out OUT --dataset digits

run as a subprocess under `/usr/bin/time -v` ("Maximum resident set size"; falls back to
`resource.getrusage(RUSAGE_CHILDREN)`); an ONNX export is then checked against Keras on 4 random
images (max |p_onnx - p_keras|, in a process of its own). A watchdog samples the command's process tree every
0.2 s and kills it above `--kill-above-gb`, so a run that would take the machine down (the
parity table of issue 16 went past 21 GB) is reported as killed instead. Full-size runs take
minutes each (the int8 calibration of R50+ViT-B/16 on 200 images alone ~25 min on 2 cores);
run them one at a time on an otherwise quiet machine. `--python`/`--pythonpath` run another
checkout of the package (an earlier version, for a before/after table).
"""

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import table

BUILD = """
import sys
import numpy as np
import vit_keras
name, size, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = vit_keras.BUILDERS[name](image_size=size, classes=10, pretrained=False)
head = model.get_layer("head")  # zero-initialised: give it weights so the classes differ
head.kernel.assign(np.random.default_rng(0).normal(0, 0.05, head.kernel.shape).astype("float32"))
model.save(path)
"""

# The ONNX file against Keras on the same random pixels (a separate process, after the measured export).
ONNX_PARITY = """
import sys
import numpy as np
import keras
import vit_keras
from vit_keras.predict import batched_probabilities
from vit_keras.serving.onnx import onnx_predict
model = keras.saving.load_model(sys.argv[1])
size = model.input_shape[1]
pixels = np.random.default_rng(0).uniform(0, 255, (4, size, size, 3)).astype("float32")
diff = np.abs(onnx_predict(sys.argv[2], pixels) - batched_probabilities(model, pixels)).max()
print(f"max |p_onnx - p_keras| = {diff:.1e}")
"""


def tree_rss(pid):
    """Resident bytes of a process and all its descendants (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_measured(cmd, env, kill_above):
    """Runs `cmd`; returns (rc, peak RSS bytes, wall s, stdout, stderr, killed)."""
    time_bin = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    full = [time_bin, "-v", *cmd] if time_bin else cmd
    start = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    state = {"peak": 0, "killed": False}

    def watch():
        while proc.poll() is None:
            rss = tree_rss(proc.pid)
            state["peak"] = max(state["peak"], rss)
            if rss > kill_above:
                state["killed"] = True
                subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], check=False)  # the export under time
                proc.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    wall = time.perf_counter() - start
    peak = state["peak"]
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    if found:
        peak = max(peak, int(found.group(1)) * 1024)
    elif not time_bin:
        peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    return proc.returncode, peak, wall, out, err, state["killed"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_r50_b16", "vit_b16"])
    p.add_argument("--image-sizes", nargs="+", type=int, default=[224])
    p.add_argument("--formats", nargs="+", default=["saved_model", "tflite"])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--work", default=None, help="folder for the models and exports (default: a temporary one)")
    p.add_argument("--kill-above-gb", type=float, default=20.0)
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the export")
    p.add_argument("--pythonpath", default=None, help="PYTHONPATH for the export (another checkout)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more arguments for `vit-keras export`")
    args = p.parse_args()

    work = args.work or tempfile.mkdtemp(prefix="export_memory_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    rows = []
    for name in args.models:
        for size in args.image_sizes:
            model_path = os.path.join(work, f"{name}_{size}.keras")
            if not os.path.exists(model_path):
                subprocess.run([sys.executable, "-c", BUILD, name, str(size), model_path], check=True,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
            for fmt in args.formats:
                out = os.path.join(work, f"out_{name}_{size}_{fmt}")
                shutil.rmtree(out, ignore_errors=True)
                cmd = [args.python, "-m", "vit_keras.cli", "export", "--model", model_path, "--format", fmt,
                       "--out", out, "--dataset", args.dataset, *args.extra]
                print("$", " ".join(cmd), flush=True)
                rc, peak, wall, stdout, stderr, killed = run_measured(cmd, env, args.kill_above_gb * 2**30)
                print(stdout, flush=True)
                if rc != 0:
                    print(stderr[-3000:], flush=True)
                result = (f"killed above {args.kill_above_gb:g} GB" if killed else
                          "ok" if rc == 0 else f"rc {rc}")
                if rc == 0 and fmt == "tflite":
                    result += ", parity table printed" if "top-1 agree" in stdout else ", no parity table"
                if rc == 0 and fmt == "onnx":
                    check = subprocess.run([args.python, "-c", ONNX_PARITY, model_path, out], env=env,
                                           capture_output=True, text=True)
                    lines = (check.stdout or check.stderr).strip().splitlines()
                    result += ", " + (lines[-1] if lines else f"parity check rc {check.returncode}")
                rows.append({"model": name, "size": size, "format": fmt, "peak RSS GB": f"{peak / 2**30:.2f}",
                             "wall s": f"{wall:.0f}", "result": result})
                print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(table(rows, ["model", "size", "format", "peak RSS GB", "wall s", "result"]))


if __name__ == "__main__":
    main()
