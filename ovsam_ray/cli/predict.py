"""``ovsam-ray predict``: masks and labels for the prompts of one image."""

from __future__ import annotations

import argparse

from ovsam_ray.cli.common import add_model_args, model_config

__all__ = ["add_predict"]


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
            grid=a.grid,
        )
    )
    print(f"{len(result['instances'])} instances -> {a.output}")
    return 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="masks and labels for the prompts of one image")
    p.add_argument("--image", required=True)
    p.add_argument("--prompts", help='JSON: {"boxes": [...], "points": [...], "point_boxes": [...]}')
    p.add_argument("--grid", type=int, metavar="N", help="instead of --prompts: segment everything from an N x N "
                   "point grid (stability, mask NMS: OVSAMAutomaticMaskGenerator's defaults)")
    p.add_argument("--output", required=True)
    p.add_argument("--save-logits", help="write low_res/head/clip/fused logits and labels to this .npz")
    p.add_argument("--device", default="cpu")
    p.add_argument("--with-embedding", action="store_true")
    add_model_args(p)
    p.set_defaults(func=_predict)
