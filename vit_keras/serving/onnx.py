"""An ONNX file for ONNX Runtime: pixels in, probabilities out (`export_onnx`, `onnx_predict`).

The file has the core of the SavedModel's `predict_images` signature: input
`images` float32 `[N, H, W, 3]` (pixels 0..255, any batch), output
`probabilities` float32 `[N, C]`; `x / 127.5 - 1` and the softmax are inside.
It is converted with tf2onnx, which is also what Keras's own
`model.export(format="onnx")` calls on the TensorFlow backend; that exporter
converts only the model's `call`, so the preprocessing and softmax would be
left to clients. Needs the `onnx` extra: `pip install 'vit_keras[onnx]'`
(tf2onnx, onnx, onnxruntime). The module imports without it.
"""

import contextlib
import gc
import json
import logging
import os

import numpy as np
import tensorflow as tf

from vit_keras import console
from vit_keras.files import atomic_dir, check_target
from vit_keras.precision import EXPORT_PRECISIONS, check_dtype
from vit_keras.predict import BATCH_SIZE, label_names, probabilities
from vit_keras.serving.prepare import prepare_export_model

ONNX_FILE = "model.onnx"
# Weights of models whose float32 weights exceed this go into `model.onnx.data` beside the
# graph (ONNX external data): one protobuf message cannot exceed 2 GiB (ViT-H/14: 2.5 GB).
EXTERNAL_DATA_FILE = ONNX_FILE + ".data"
EXTERNAL_DATA_BYTES = 3 * 2**29  # 1.5 GiB
DEFAULT_OPSET = 17  # ONNX Runtime >= 1.12 runs it; tf2onnx 1.17 writes up to 18
MIN_OPSET = 17
INSTALL_HINT = "pip install 'vit_keras[onnx]'"


def _import(*names):
    """Imports the named modules, or raises an ImportError that names the `onnx` extra."""
    import importlib

    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as e:
            raise ImportError(f"ONNX export and inference need {name} ({e}); install them with "
                              f"{INSTALL_HINT}", name=name) from e
    return modules


def max_opset():
    """The newest ONNX opset the installed tf2onnx writes."""
    _import("tf2onnx")
    from tf2onnx import constants

    return max(constants.OPSET_TO_IR_VERSION)


def _check_opset(opset):
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise ValueError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}.")
    newest = max_opset()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be between {MIN_OPSET} and {newest} (the newest that the installed "
                         f"tf2onnx writes), got {opset}.")


@contextlib.contextmanager
def _numpy2_compat():
    """tf2onnx 1.17's external-data path calls `np.product`, which NumPy 2 removed."""
    added = not hasattr(np, "product")
    if added:
        np.product = np.prod
    try:
        yield
    finally:
        if added:
            del np.product


@contextlib.contextmanager
def _fresh_node_protos():
    """tf2onnx refills each node's NodeProto after every optimiser pass; protobuf (upb) keeps the removed
    attributes in the message's arena, so every pass kept another copy of every weight (R50+ViT-B/16:
    17 GB). A new NodeProto per refill lets the old one, and its arena, go."""
    from tf2onnx import graph

    (onnx,) = _import("onnx")
    original = graph.Node.update_proto

    def update_proto(node, external_tensor_storage=None):
        old = node._op
        node._op = onnx.NodeProto(name=old.name, op_type=old.op_type, domain=old.domain, doc_string=old.doc_string)
        original(node, external_tensor_storage)

    graph.Node.update_proto = update_proto
    try:
        yield
    finally:
        graph.Node.update_proto = original


@contextlib.contextmanager
def _quiet_tf2onnx():
    """tf2onnx logs each conversion step at INFO; keep its warnings and errors only."""
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _weight_bytes(model):
    return 4 * sum(int(np.prod(w.shape)) for w in model.weights)


def _convert(model, opset):
    """tf2onnx conversion of pixels -> probabilities; returns (ModelProto, external tensor storage).

    Always tf2onnx's large-model path, whatever the model's size: it freezes the
    variables into a GraphDef without grappler's copy of it, keeps the weights
    out of the graph while converting, and runs the ONNX optimiser in place
    (the default path deep-copies the whole graph before each of its passes):
    R50+ViT-B/16 peaks at ~3 GB instead of 9.7 (`benchmarks/RESULTS.md`).
    Every tensor over 1,000 bytes is left in the storage; `_write` places it.
    """
    tf2onnx, _ = _import("tf2onnx", "onnx")
    height, width = model.input_shape[1:3]
    spec = [tf.TensorSpec([None, height, width, 3], tf.float32, name="images")]

    @tf.function(input_signature=spec)
    def predict_images(images):
        return {"probabilities": probabilities(model, images)}

    with _quiet_tf2onnx(), _numpy2_compat(), _fresh_node_protos():
        proto, storage = tf2onnx.convert.from_function(predict_images, input_signature=spec, opset=opset,
                                                       large_model=True)
    del predict_images
    gc.collect()
    return proto, storage


def _bfloat16_weights(proto, storage):
    """Stores every float32 weight (initializers of more than one value) in bfloat16, with a Cast back to float32.

    ONNX Runtime's CPU provider has no bfloat16 Conv or MatMul kernels (a graph
    that computes in bfloat16 does not load), so the file keeps the weights in
    bfloat16, half the bytes, and computes in float32. Scalars (the pixel
    scaling, epsilons) stay float32. Weights in `storage` (external data) are
    rounded there.
    """
    import ml_dtypes
    from onnx import TensorProto, external_data_helper, helper, numpy_helper

    inputs = {value.name for value in proto.graph.input}
    casts = []
    for tensor in proto.graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or int(np.prod(tensor.dims)) <= 1 or tensor.name in inputs:
            continue
        if external_data_helper.uses_external_data(tensor):
            location = {e.key: e.value for e in tensor.external_data}["location"]
            values = np.frombuffer(storage.name_to_tensor_data[location], "<f4")
        else:
            values = numpy_helper.to_array(tensor)
        rounded = np.asarray(values, "float32").astype(ml_dtypes.bfloat16).view("<u2").tobytes()  # nearest, ties even
        if external_data_helper.uses_external_data(tensor):
            storage.name_to_tensor_data[location] = rounded
        else:
            tensor.ClearField("float_data")
            tensor.raw_data = rounded
        tensor.data_type = TensorProto.BFLOAT16
        name, tensor.name = tensor.name, f"{tensor.name}__bfloat16"
        casts.append(helper.make_node("Cast", [tensor.name], [name], to=TensorProto.FLOAT, name=f"{name}__to_float32"))
    nodes = casts + list(proto.graph.node)  # the casts first: the nodes stay in topological order
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _describe(proto, names, height, width):
    """Names the batch dimension, and records what the file expects and the class names."""
    for value in (proto.graph.input[0], proto.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "N"
    from vit_keras import __version__

    proto.doc_string = (f"vit_keras {__version__}: images float32 [N, {height}, {width}, 3], pixels 0..255 "
                        f"-> probabilities float32 [N, {len(names)}] (x / 127.5 - 1 and softmax inside)")
    entry = proto.metadata_props.add()
    entry.key, entry.value = "class_names", json.dumps(names)


def _inline(tensor, storage):
    """Puts a tensor held in tf2onnx's external `storage` back into its TensorProto."""
    (onnx,) = _import("onnx")

    location = {e.key: e.value for e in tensor.external_data}["location"]
    tensor.raw_data = storage.name_to_tensor_data.pop(location)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def _write_one_file(proto, storage, path):
    """Writes the ModelProto to `path` with the tensors held in `storage` inside the one file.

    Never the whole model in memory once more: protobuf merges repeated
    occurrences of a message field, so the model goes out without its big
    initializers, and each of them follows as a record of its own,
    `ModelProto(graph=GraphProto(initializer=[tensor]))`, made from its bytes
    in `storage` and let go before the next.
    """
    (onnx,) = _import("onnx")
    from onnx import external_data_helper

    graph = proto.graph
    moved = [i for i, t in enumerate(graph.initializer) if external_data_helper.uses_external_data(t)]
    records = []
    for i in moved:
        t = graph.initializer[i]
        records.append((t.name, list(t.dims), t.data_type, {e.key: e.value for e in t.external_data}["location"]))
    for i in reversed(moved):
        del graph.initializer[i]
    for tensor in external_data_helper._get_all_tensors(proto):  # attributes, if any: small
        if external_data_helper.uses_external_data(tensor):
            _inline(tensor, storage)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        for name, dims, data_type, location in records:
            record = onnx.ModelProto()
            tensor = record.graph.initializer.add()
            tensor.name, tensor.data_type = name, data_type
            tensor.dims.extend(dims)
            tensor.raw_data = storage.name_to_tensor_data.pop(location)
            f.write(record.SerializeToString())
            del record, tensor


def _write(proto, storage, path):
    """Writes the ModelProto to `path`; tensors held in `storage` go to one external-data file beside it."""
    if storage is not None and storage.name_to_tensor_data:
        (onnx,) = _import("onnx")
        from onnx import external_data_helper

        data = os.path.join(os.path.dirname(path), EXTERNAL_DATA_FILE)
        with open(data, "wb") as f:
            for tensor in external_data_helper._get_all_tensors(proto):
                if not external_data_helper.uses_external_data(tensor):
                    continue
                location = {e.key: e.value for e in tensor.external_data}["location"]
                blob = storage.name_to_tensor_data.pop(location)
                f.seek(-f.tell() % 4096, os.SEEK_CUR)  # page-aligned, so the runtime may map it
                offset = f.tell()
                f.write(blob)
                del tensor.external_data[:]
                for key, value in (("location", EXTERNAL_DATA_FILE), ("offset", offset), ("length", len(blob))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, str(value)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del blob
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())


def _check_opset_written(proto, opset):
    written = {o.domain: o.version for o in proto.opset_import}
    if written.get("", written.get("ai.onnx")) != opset:
        raise ValueError(f"tf2onnx wrote opsets {written}, not the requested {opset}.")


def export_onnx(model, out_dir, opset=DEFAULT_OPSET, class_names=None, overwrite=False, keep=(),
                precision="float32"):
    """Writes `model.onnx` and `class_names.json` into the export folder `out_dir`, atomically.

    The ONNX file (opset `opset`, at least 17) takes `images`, float32
    `[N, H, W, 3]` pixels 0..255 with any N, and gives `probabilities`, float32
    `[N, C]`: the core of the SavedModel's `predict_images`, with
    `x / 127.5 - 1` and the softmax inside. It is converted from the model
    as `prepare_export_model` gives it (float32, the hybrid's weight
    standardisation folded into its kernels). Models with over 1.5 GiB of
    weights (ViT-H/14) keep them in `model.onnx.data` beside the file (ONNX
    external data; load the file from its folder). With
    `precision="bfloat16"` the weights are stored in bfloat16 (half the file)
    and cast to float32 in the graph: ONNX Runtime's CPU provider has no
    bfloat16 Conv or MatMul kernels, so it computes in float32 with the
    rounded weights (same inputs and outputs). The file's metadata holds
    the class names (`class_names`) too. The conversion takes tf2onnx's
    large-model path (`_convert`) and the file is written a weight at a time:
    R50+ViT-B/16 peaks at 3.4 GB (was 9.7), `benchmarks/RESULTS.md`.

    The folder appears only complete, with the manifest of every export;
    `overwrite` replaces only an earlier export (see `files.atomic_dir`), never a
    folder holding a path in `keep`. Needs `pip install 'vit_keras[onnx]'`.

    Returns:
        The path of `model.onnx` in `out_dir`.
    """
    check_dtype(precision, EXPORT_PRECISIONS, "precision")
    _, onnx = _import("tf2onnx", "onnx")
    _check_opset(opset)
    check_target(out_dir, overwrite, keep)  # before the slow part
    names = label_names(model, class_names)
    model = prepare_export_model(model)
    height, width = model.input_shape[1:3]
    with atomic_dir(out_dir, overwrite, keep) as tmp, console.Progress("ONNX", 3, "phase") as bar:
        external = _weight_bytes(model) > EXTERNAL_DATA_BYTES
        bar.update(0, note="converting with tf2onnx")
        with console.native_output("converting to ONNX"):
            proto, storage = _convert(model, opset)
        del model
        gc.collect()
        _check_opset_written(proto, opset)
        if precision == "bfloat16":
            _bfloat16_weights(proto, storage)
        _describe(proto, names, height, width)
        if precision == "bfloat16":
            proto.doc_string += "; weights stored in bfloat16, computed in float32"
        bar.update(1, note="writing")
        path = os.path.join(tmp, ONNX_FILE)
        if external:
            _write(proto, storage, path)
        else:
            _write_one_file(proto, storage, path)
        del proto, storage
        gc.collect()
        bar.update(2, note="checking")
        onnx.checker.check_model(path)  # by path: works with external data too
        with open(os.path.join(tmp, "class_names.json"), "w") as f:
            json.dump(names, f)
        bar.update(3, note="written")
    return os.path.join(out_dir, ONNX_FILE)


def onnx_session(path, threads=2):
    """An ONNX Runtime CPU session of an exported file (`model.onnx`, or the export folder holding it)."""
    (ort,) = _import("onnxruntime")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, ONNX_FILE)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_predict(path_or_session, images, batch_size=BATCH_SIZE):
    """Runs an exported ONNX file on pixels `[N, H, W, 3]`, `batch_size` images at a time -> numpy `[N, C]`.

    `path_or_session` is a path (file or export folder) or a session from
    `onnx_session` to reuse across calls. Pixels are cast to float32.
    """
    session = path_or_session if hasattr(path_or_session, "run") else onnx_session(path_or_session)
    images = np.asarray(images)
    batch_size = batch_size or max(len(images), 1)
    input_name = session.get_inputs()[0].name
    results = [session.run(["probabilities"], {input_name: images[i:i + batch_size].astype("float32")})[0]
               for i in range(0, len(images), batch_size)]
    if not results:
        return np.zeros((0, session.get_outputs()[0].shape[-1]), "float32")
    return np.concatenate(results)
