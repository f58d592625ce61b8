"""Where inference time goes, by TensorFlow op type: one model, one batch, one table.

    python benchmarks/profile_ops.py [--model vit_r50_b16] [--batch 8] [--dtype float32|bfloat16]
                                     [--runs 5] [--top 25]

The serving graph (`vit_keras.inference_copy` of the model, traced once,
variables frozen to constants) runs in a TF1 session with full tracing, so
Grappler's rewrites (oneDNN fusions included) are what is timed; per-op
times are summed over the runs and shown by op type with their share.
Read it for shares, not absolute rates: ops overlap on the cores, tracing
adds to each, and a frozen graph is not the served one (its constant weights
take other oneDNN paths: an einsum projection ran ~1.5x slower frozen than
under `tf.function` with variables). Wall-clock figures come from
`benchmarks/inference.py`.
"""

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_info, model_parser, table


def main():
    p = model_parser(__doc__, batch=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()

    import numpy as np
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    import vit_keras

    model = vit_keras.BUILDERS[args.model](image_size=args.image_size, classes=1000, pretrained=False)
    model = vit_keras.inference_copy(model, args.dtype)
    spec = tf.TensorSpec((args.batch, args.image_size, args.image_size, 3), tf.float32)
    concrete = tf.function(lambda v: model(v, training=False)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(concrete)
    graph_def = frozen.graph.as_graph_def()
    x = np.random.default_rng(0).uniform(-1, 1, spec.shape).astype("float32")

    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(graph_def, name="")
        inp = graph.get_tensor_by_name(frozen.inputs[0].name)
        out = graph.get_tensor_by_name(frozen.outputs[0].name)
        with tf.compat.v1.Session(graph=graph) as sess:
            for _ in range(2):
                sess.run(out, {inp: x})
            options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
            by_type, by_node, total = collections.Counter(), collections.Counter(), 0.0
            count = collections.Counter()
            for _ in range(args.runs):
                meta = tf.compat.v1.RunMetadata()
                sess.run(out, {inp: x}, options=options, run_metadata=meta)
                for dev in meta.step_stats.dev_stats:
                    for node in dev.node_stats:
                        micros = node.all_end_rel_micros
                        op = node.timeline_label.split("=", 1)[-1].strip().split("(")[0] or node.node_name
                        by_type[op] += micros
                        by_node[node.node_name] += micros
                        count[op] += 1
                        total += micros
    rows = [{"op": op, "ms/run": f"{t / 1000 / args.runs:.1f}", "share": f"{t / total:.1%}",
             "calls/run": count[op] // args.runs} for op, t in by_type.most_common(args.top)]
    print(f"{args.model}, batch {args.batch}, {args.dtype}; {cpu_info()}; op time summed over "
          f"{args.runs} runs (ops may overlap on {os.cpu_count()} cores): {total / 1000 / args.runs:.0f} ms/run\n")
    print(table(rows, ["op", "ms/run", "share", "calls/run"]))


if __name__ == "__main__":
    main()
