"""`python -m embedding finetune DATA_DIR --model SOURCE -o tuned.keras`: the command line
of `embedding.finetune` (which never imports this module).

The options fill one `FinetuneConfig`; everything cheap is checked before the
model is loaded (the data folder, the `-o` path and its suffix, the checkpoint
folder, the model source), and every expected error is one `error:` line
(`convnext_common.cli.run_command`).
"""

from __future__ import annotations

import argparse
import os
import sys

from convnext_common.cli import CommandError, finite_float, non_negative_int, positive_int
from convnext_common.files import check_output_path
from embedding.cli import options
from embedding.errors import ModelSourceError
from embedding.images import DEFAULT_MAX_PIXELS


def _fraction(text: str) -> float:
    value = finite_float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def register(subparsers):
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune with ArcFace on a folder of identities",
        description="Fine-tune an embedding model with ArcFace on DATA_DIR (one folder per "
        "identity: an image's identity is the top-level folder it lies in), report held-out "
        "verification metrics before and after, and write the model with the best held-out "
        "EER. Unreadable images are skipped and listed. Rerun the same command to resume "
        "after an interruption (also after kill -9); a changed setting is refused, naming it.",
    )
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("-o", "--output", required=True, help="output .keras (best held-out EER)")
    options.add_model_options(p, dtype=False)  # training keeps its own precision
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=positive_int, default=10)
    t.add_argument("--lr", type=finite_float, default=1e-3, help="AdamW peak learning rate")
    t.add_argument("--weight-decay", type=finite_float, default=0.05)
    t.add_argument(
        "--freeze-epochs",
        type=non_negative_int,
        default=0,
        help="warm-up epochs, backbone frozen",
    )
    t.add_argument(
        "--holdout",
        type=_fraction,
        default=0.2,
        help="share held out, in [0, 1) (default 0.2; 0: no held-out check)",
    )
    t.add_argument(
        "--holdout-by",
        choices=("identity", "image"),
        default="identity",
        help="hold out whole identities (open-set, default) or a share of each one's images",
    )
    t.add_argument(
        "--embedding-dim", type=positive_int, default=None, help="add a Dense projection"
    )
    t.add_argument("--scale", type=finite_float, default=30.0, help="ArcFace s (default 30)")
    t.add_argument("--margin", type=finite_float, default=0.35, help="ArcFace m in radians (0.35)")
    t.add_argument("--easy-margin", action="store_true")
    t.add_argument(
        "--image-size", type=positive_int, default=None, help="input side (default: model's)"
    )
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    t.add_argument("--checkpoint-dir", default=None, help="default OUTPUT.ckpt")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--keep-checkpoint", action="store_true")
    t.add_argument(
        "--distribute",
        choices=("auto", "none"),
        default="auto",
        help="auto: data-parallel over all local devices (JAX, >1 device)",
    )
    t.add_argument("--seed", type=non_negative_int, default=0)
    hosts = p.add_argument_group(
        "several processes (JAX; one per host, each started the same way but its id)"
    )
    hosts.add_argument(
        "--coordinator", default=None, metavar="HOST:PORT",
        help="process 0's address, where it listens (default $KERAS_DISTRIBUTION_JOB_ADDRESSES;"
        " under SLURM, found by JAX)",
    )  # fmt: skip
    hosts.add_argument("--num-processes", type=positive_int, default=None, metavar="N")
    hosts.add_argument(
        "--process-id", type=non_negative_int, default=None, metavar="I",
        help="this process's id, 0..N-1 (0 writes the checkpoints and the output)",
    )  # fmt: skip
    p.set_defaults(handler=run)


def config_from_args(args):
    """The `FinetuneConfig` the options describe (raises `FinetuneConfigError`)."""
    from embedding.finetune import FinetuneConfig  # Keras loads here, after --backend

    return FinetuneConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        freeze_epochs=args.freeze_epochs,
        holdout=args.holdout,
        holdout_by=args.holdout_by,
        embedding_dim=args.embedding_dim,
        scale=args.scale,
        margin=args.margin,
        easy_margin=args.easy_margin,
        augment=not args.no_augment,
        hflip=not args.no_flip,
        image_size=args.image_size,
        pooling=args.pooling,
        head_norm=not args.no_head_norm,
        seed=args.seed,
    )


def run(args):
    if not os.path.isdir(args.data_dir):
        what = "a file, not a folder" if os.path.exists(args.data_dir) else "no such folder"
        raise CommandError(f"DATA_DIR {args.data_dir}: {what}")
    check_output_path(args.output, option="-o", suffixes=(".keras",))
    checkpoint_dir = args.checkpoint_dir or args.output + ".ckpt"
    check_output_path(os.path.join(checkpoint_dir, "state.json"), option="--checkpoint-dir")
    source = options.check_model_source(args)
    from embedding.distribution import initialize_processes  # Keras loads here, after --backend
    from embedding.finetune import finetune  # Keras: as above

    initialize_processes(args.coordinator, args.num_processes, args.process_id)

    config = config_from_args(args)
    try:
        result = finetune(
            args.data_dir,
            source,
            output=args.output,
            config=config,
            cache=not args.no_cache,
            cache_dir=args.cache_dir,
            checkpoint_dir=checkpoint_dir,
            resume=not args.no_resume,
            keep_checkpoint=args.keep_checkpoint,
            distribution="auto" if args.distribute == "auto" else None,
            max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
            workers=args.workers,
            verbose=2 if args.no_progress else 1,
        )
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            f"\ninterrupted; run the same command again to resume from {checkpoint_dir}",
            file=sys.stderr,
        )
        return 130
    except ModelSourceError as error:
        raise CommandError(f"--model {error.source}: {error.reason}") from error
    if result.metrics_before is not None:
        print("held-out before:\n  " + result.metrics_before.summary().replace("\n", "\n  "))
        print(f"held-out after (epoch {result.best_epoch}):")
        print("  " + result.metrics_after.summary().replace("\n", "\n  "))
    print(f"wrote {args.output}")
    return 0
