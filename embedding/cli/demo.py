"""`python -m embedding demo`: embeddings of scikit-image's sample photographs.

Keras, timm and torch are imported inside the functions: timm and torch (when
installed) must come before Keras (with the TensorFlow backend the other order
crashes), and `--backend` must be chosen before Keras loads.

With the pretrained default model (network, or a cached copy) it prints their
cosine-similarity matrix. Without either it says so, then shows what works
offline: with timm installed (the `convert` extra: timm + torch), a timm
convnext_atto with RANDOM weights is built on the spot, ported to Keras and
checked against timm (preprocessing and embeddings, max abs diff); then the
photographs are embedded by an untrained (randomly initialised) network, and
those similarities are labelled as such, never as pretrained results. Without
timm (the default install: one Keras backend, no torch) the untrained network
is built by this library itself, labelled the same way, and the demo says
which extra adds the comparison with timm.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

import weights_convert  # a light package face: each name loads its module when used
from convnext_common.cli import CommandError
from convnext_common.errors import error_message
from convnext_common.jsonable import jsonable
from embedding.errors import ModelUnavailableError
from embedding.gallery import cosine_similarity
from weights_convert.pretrained import DEFAULT_MODEL, license_notice

RANDOM_ARCH = "convnext_atto"
# (name, skimage.data function, augmentation); augmented copies show that a
# near-duplicate scores high even with random weights
SAMPLES = (
    ("astronaut", "astronaut", None),
    ("astronaut-flip", "astronaut", "flip"),
    ("coffee", "coffee", None),
    ("chelsea", "chelsea", None),
    ("chelsea-crop", "chelsea", "crop"),
    ("rocket", "rocket", None),
    ("camera (grey)", "camera", None),
    ("logo (RGBA)", "logo", None),
)


def _import_convert_extra():
    """timm + torch, imported before Keras (TensorFlow backend: torch must come first)."""
    try:  # the `convert` extra, optional; before Keras when present (see above)
        import timm  # noqa: F401
        import torch
    except ImportError:
        return None
    return torch


def sample_images():
    """[(name, HWC uint8 array)] from skimage.data (ships with scikit-image)."""
    try:  # the `demo` extra: scikit-image's photographs
        import skimage.data
    except ImportError as error:
        raise SystemExit(
            "The demo embeds scikit-image's sample photographs: pip install scikit-image"
        ) from error
    images = []
    for name, function, augmentation in SAMPLES:
        image = getattr(skimage.data, function)()
        if augmentation == "flip":
            image = image[:, ::-1]
        elif augmentation == "crop":
            h, w = image.shape[:2]
            image = image[h // 10 : h - h // 20, w // 8 : w - w // 10]
        images.append((name, image.copy()))
    return images


def similarity_table(names, vectors) -> str:
    sims = np.atleast_2d(cosine_similarity(vectors, vectors))
    width = max(len(n) for n in names)
    short = [n.split(" ")[0][:8] for n in names]
    lines = [" " * (width + 2) + " ".join(f"{s:>8}" for s in short)]
    for name, row in zip(names, sims, strict=True):
        lines.append(f"{name:<{width}}  " + " ".join(f"{v:8.3f}" for v in row))
    return "\n".join(lines)


def _pretrained(source, offline):
    """An Embedder for `source`, or None (with the reason printed) if unavailable."""
    from embedding.embedder import Embedder  # Keras: after timm / torch (see above)

    if offline:
        print("--offline: not trying the Hub.")
        return None
    try:
        return Embedder(source)
    except ModelUnavailableError as error:
        print(f"Pretrained model unavailable: {error}")
        return None


def _port(timm_model, batch_size):
    """An Embedder holding the Keras port of `timm_model` (same weights)."""
    # Keras: after timm / torch (see above)
    from embedding.embedder import Embedder
    from embedding.model import embedding_model_from_state

    state = {k: v.detach().numpy() for k, v in timm_model.state_dict().items()}
    config = {
        "architecture": RANDOM_ARCH,
        "pretrained_cfg": jsonable(timm_model.pretrained_cfg),
    }
    return Embedder(model=embedding_model_from_state(state, config), batch_size=batch_size)


def _random_weights_demo(torch, images):
    if torch is None:
        return _untrained_keras_demo(images)
    # the `convert` extra, present here (imported by _import_convert_extra already)
    import timm
    from timm.data import create_transform, resolve_data_config

    # 1. parity: every parameter random (timm's own init leaves blocks ~identity)
    timm_model = weights_convert.randomize_timm_parameters(
        timm.create_model(RANDOM_ARCH, pretrained=False), seed=0
    )
    embedder = _port(timm_model, len(images))
    print(
        f"1. Built timm {RANDOM_ARCH} with every weight RANDOM, ported it to Keras "
        f"(embedding dim {embedder.dim}, input {embedder.preprocessor.config.input_size})."
    )
    transform = create_transform(**resolve_data_config({}, model=timm_model))
    ours = np.stack([embedder.preprocess(image) for _, image in images])
    theirs = np.stack(
        [
            transform(Image.fromarray(image).convert("RGB")).numpy().transpose(1, 2, 0)
            for _, image in images
        ]
    )
    vectors = embedder.embed([image for _, image in images])
    with torch.no_grad():
        x = torch.from_numpy(theirs.transpose(0, 3, 1, 2).copy())
        reference = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
        reference = torch.nn.functional.normalize(reference, dim=1).numpy()
    print("   Keras vs timm on the sample photographs, max abs diff:")
    print(f"   preprocessing (vs timm's eval transform): {np.abs(ours - theirs).max():.2e}")
    print(f"   embeddings (vs timm pre-logits, L2):      {np.abs(vectors - reference).max():.2e}")
    print()

    # 2. similarities from an untrained network (timm's default random init)
    torch.manual_seed(0)  # timm's default init, but the same matrix on every run
    untrained = timm.create_model(RANDOM_ARCH, pretrained=False).eval()
    embedder = _port(untrained, len(images))
    vectors = embedder.embed([image for _, image in images])
    print("2. Cosine similarity of the photographs under an UNTRAINED convnext_atto")
    print("   (timm's random initialisation, NOT pretrained weights: this shows the")
    print("   pipeline running, not what the pretrained model would say):")
    print(similarity_table([name for name, _ in images], vectors))
    return 0


def _untrained_keras_demo(images):
    """Without timm: an untrained ConvNeXt built by this library, clearly labelled."""
    from embedding.embedder import Embedder  # Keras: only now (--backend is chosen)

    print(
        "timm is not installed, so the comparison of this port with timm is skipped; the "
        "`convert` extra adds it (timm + torch): pip install -e '.[convert]'."
    )
    model = weights_convert.keras_model_for(RANDOM_ARCH, num_classes=0, normalize=True)
    embedder = Embedder(model=model, batch_size=len(images))
    vectors = embedder.embed([image for _, image in images])
    print()
    print(
        f"Cosine similarity of the photographs under an UNTRAINED {RANDOM_ARCH} "
        f"({embedder.dim}-dim embeddings, input {embedder.preprocessor.config.input_size})"
    )
    print("(random initialisation by this library, NOT pretrained weights: this shows the")
    print(" pipeline running, not what the pretrained model would say):")
    print(similarity_table([name for name, _ in images], vectors))
    return 0


def run_demo(model=None, offline=False) -> int:
    torch = _import_convert_extra()  # before Keras, see above
    source = model or DEFAULT_MODEL
    images = sample_images()
    import keras  # only now: after timm / torch, and --backend is chosen

    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}")
    embedder = _pretrained(source, offline)
    if embedder is not None:
        vectors = embedder.embed([image for _, image in images])
        license_name = embedder.pretrained_cfg.get("license", "unknown")
        print(f"Pretrained {source} (licence {license_name})")
        notice = license_notice(embedder.pretrained_cfg)
        if notice:
            print(f"note: {notice}")
        print(
            f"{embedder.dim}-dim embeddings, cosine similarity of scikit-image's sample "
            "photographs:"
        )
        print(similarity_table([name for name, _ in images], vectors))
        return 0
    print()
    print("Showing what works offline instead, with RANDOM weights.")
    return _random_weights_demo(torch, images)


def register(subparsers):
    p = subparsers.add_parser(
        "demo",
        help="embed scikit-image's sample photos (pretrained if available, else random weights)",
    )
    p.add_argument("--model", default=None, metavar="SOURCE", help="checkpoint to try first")
    p.add_argument(
        "--offline", action="store_true", help="skip the Hub, go straight to the offline demo"
    )
    p.set_defaults(handler=run)


def run(args):
    _import_convert_extra()  # before the model check below loads Keras
    if args.model is not None and not args.offline:
        problem = weights_convert.source_problem(args.model)
        if problem is not None:
            raise CommandError(f"--model {args.model}: {problem}")
    try:
        return run_demo(model=args.model, offline=args.offline)
    except (ValueError, OSError) as error:
        if args.model is None:
            raise
        raise CommandError(f"--model {args.model}: {error_message(error)}") from error
