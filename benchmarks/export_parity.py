"""Exported files against timm: max abs difference and cosine of the embeddings.

    KERAS_BACKEND=jax python benchmarks/export_parity.py --output benchmarks/results/export_jax

For the active Keras backend, every format it exports (ONNX, LiteRT float32 /
float16 / int8, SavedModel; `weights_convert.export`) is made from the embedding
model of a random-weight timm checkpoint (every parameter randomised, timm's
default pretrained_cfg: 224x224, bicubic, crop 0.875), run by onnxruntime,
LiteRT's interpreter or TensorFlow, and compared with timm's L2-normalised
pre-logits on scikit-image's photographs preprocessed by the sidecar's recipe.
Prints a table and writes it as JSON and Markdown. Random weights: the numbers
say how faithfully the file computes the network, not how well it recognises.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import timm  # noqa: F401  (before TensorFlow: see tests/conftest.py)
import torch

# isort: split
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from convnext_common.jsonable import jsonable  # noqa: E402  (from the checkout, put on the path)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")
VARIANTS = (("onnx", "m.onnx", {}), ("litert", "m.tflite", {}),
            ("litert", "m16.tflite", {"dtype": "float16"}),
            ("litert", "m8.tflite", {"dtype": "int8"}), ("saved_model", "sm/", {}))  # fmt: skip


def timm_checkpoint(arch, folder, seed):
    from safetensors.torch import save_file

    from weights_convert import randomize_timm_parameters

    model = randomize_timm_parameters(timm.create_model(arch, pretrained=False), seed)
    os.makedirs(folder, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        os.path.join(folder, "model.safetensors"),
    )
    cfg = jsonable(model.pretrained_cfg)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architecture": arch, "num_classes": 1000, "pretrained_cfg": cfg}, f)
    return model


def run(format, path, x):
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    if format == "litert":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path)
        index = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(index, x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    return loaded.serve(tf.constant(x)).numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="path without extension")
    args = parser.parse_args(argv)
    import keras
    import skimage.data

    from embedding import Embedder, Preprocessor
    from weights_convert.export import ExportUnavailableError, check_backend_supports

    backend = keras.backend.backend()
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-parity-") as work:
        for seed, arch in enumerate(("convnext_atto", "convnextv2_atto")):
            folder = os.path.join(work, arch)
            timm_model = timm_checkpoint(arch, folder, seed)
            embedder = Embedder(folder, cache=False)
            for format, name, options in VARIANTS:
                row = {"backend": backend, "arch": arch, "format": format}
                row["dtype"] = options.get("dtype", "float32")
                try:
                    check_backend_supports(format)
                    path = os.path.join(work, f"{arch}-{name}")
                    sidecar = embedder.export(path, **options)
                except ExportUnavailableError as error:
                    rows.append({**row, "refused": str(error)})
                    print(f"{arch} {format} {row['dtype']}: refused: {error}", flush=True)
                    continue
                preprocessor = Preprocessor(sidecar["preprocessing"])
                x = np.stack([preprocessor(image) for image in photos])
                with torch.no_grad():
                    nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
                    features = timm_model.forward_features(nchw)
                    ref = timm_model.forward_head(features, pre_logits=True)
                    ref = torch.nn.functional.normalize(ref, dim=1).numpy()
                out = run(format, path, x)
                cosine = np.sum(out * ref, axis=1) / np.linalg.norm(out, axis=1)
                row.update(
                    max_abs_diff=float(np.abs(out - ref).max()), min_cosine=float(cosine.min())
                )
                rows.append(row)
                print(
                    f"{arch} {format} {row['dtype']}: max abs diff {row['max_abs_diff']:.2e}, "
                    f"min cosine {row['min_cosine']:.7f}",
                    flush=True,
                )
    if args.output:
        with open(args.output + ".json", "w") as f:
            json.dump({"images": list(PHOTOS), "size": 224, "rows": rows}, f, indent=1)
        lines = ["| backend | model | format | dtype | max abs diff | min cosine |"]
        lines.append("|---|---|---|---|---:|---:|")
        for row in rows:
            if "refused" in row:
                continue
            lines.append(
                f"| {row['backend']} | {row['arch']} | {row['format']} | {row['dtype']} "
                f"| {row['max_abs_diff']:.1e} | {row['min_cosine']:.6f} |"
            )
        with open(args.output + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
