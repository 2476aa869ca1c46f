"""``ovsam-ray``: the command line. Each subcommand parses flags into a config and calls run_*()."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ovsam_ray.inference import ModelConfig


def add_model_args(p: argparse.ArgumentParser, default_preset: str = "ovsam_rn50x16") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=default_preset)
    g.add_argument("--weights", help="folder or s3:// prefix holding the standard weight file names")
    g.add_argument("--sam-checkpoint", help="SAM file (only prompt_encoder.* is used for inference)")
    g.add_argument("--clip-checkpoint", help="open_clip state dict or OpenAI's CLIP file")
    g.add_argument("--sam2clip-checkpoint")
    g.add_argument("--clip2sam-checkpoint")
    g.add_argument("--train-vocab", default="coco", help="vocabulary the clip2sam file was trained on (coco|lvis)")
    g.add_argument("--vocab", help="coco_ov, lvis_v1, or a .txt/.json file")
    g.add_argument("--class-embeddings", help="(C, S, D) text-embedding tensor file (reference format)")
    g.add_argument("--random-init", action="store_true", help="untrained weights (smoke tests, benchmarks)")
    g.add_argument("--topk", type=int, default=5)
    g.add_argument("--text-cache", help="text-embedding cache folder (default ~/.cache/ovsam_ray/text)")
    g.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL)")


def model_config(a: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        preset=a.preset,
        weights=a.weights,
        sam_checkpoint=a.sam_checkpoint,
        clip_checkpoint=a.clip_checkpoint,
        sam2clip_checkpoint=a.sam2clip_checkpoint,
        clip2sam_checkpoint=a.clip2sam_checkpoint,
        train_vocab=a.train_vocab,
        vocab=a.vocab,
        class_embeddings=a.class_embeddings,
        random_init=a.random_init,
        topk=a.topk,
        text_cache=a.text_cache,
        s3_endpoint=a.s3_endpoint,
    )


def _predict(a: argparse.Namespace) -> int:
    from ovsam_ray.predict import PredictConfig, run_predict

    result = run_predict(
        PredictConfig(
            image=a.image,
            prompts=a.prompts,
            output=a.output,
            model=model_config(a),
            save_logits=a.save_logits,
            device=a.device,
            with_embedding=a.with_embedding,
        )
    )
    print(f"{len(result['instances'])} instances -> {a.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovsam-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="masks and labels for the prompts of one image")
    p.add_argument("--image", required=True)
    p.add_argument("--prompts", required=True, help='JSON: {"boxes": [...], "points": [...], "point_boxes": [...]}')
    p.add_argument("--output", required=True)
    p.add_argument("--save-logits", help="write low_res/head/clip/fused logits and labels to this .npz")
    p.add_argument("--device", default="cpu")
    p.add_argument("--with-embedding", action="store_true")
    add_model_args(p)
    p.set_defaults(func=_predict)

    from ovsam_ray import cli_jobs

    cli_jobs.add_subcommands(sub)
    return parser


#: What a job that cannot start or go on raises (a bad flag, storage unreachable, an output in
#: use or not writable...): the CLI reports it as one line and exits EXIT_STOPPED, no traceback.
STOP_ERRORS = (ValueError, RuntimeError, OSError)
EXIT_STOPPED = 2


def report_stop(e: BaseException, prefix: str = "") -> int:
    """Log ``e`` as one line (the traceback at DEBUG level) and return EXIT_STOPPED."""
    from ovsam_ray.io import redact, safe_for_log

    log = logging.getLogger("ovsam_ray")
    log.debug("stopped by", exc_info=e)
    log.error("%s%s", prefix, safe_for_log(redact(str(e) or type(e).__name__), limit=2000))
    return EXIT_STOPPED


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except STOP_ERRORS as e:
        return report_stop(e)


if __name__ == "__main__":
    sys.exit(main())
