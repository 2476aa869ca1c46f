"""Each model fact has one home: the label run's record takes its thresholds from the model the
predictor runs (the mask threshold it applies, the classifier's fusion weights), and the logit
scale is an export's learnt one or the released models'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovsam_ray.inference import ModelConfig, load_model, make_predictor, vocabulary_text
from ovsam_ray.model.classifier import RELEASED_LOGIT_SCALE
from ovsam_ray.model.ovsam import OVSAM
from ovsam_ray.model.predictor import ImagePrompts
from ovsam_ray.pipeline.label_job import LabelConfig, _run_record
from ovsam_ray.vocabulary import Vocabulary
from ovsam_ray.weights.released import LoadedModel

VOCAB = Vocabulary.from_json({"name": "two", "classes": [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]})


@pytest.fixture(scope="module")
def tiny() -> tuple[ModelConfig, LoadedModel]:
    cfg = ModelConfig(preset="ovsam_tiny", random_init=True, vocab="coco_ov", topk=3)
    return cfg, load_model(cfg)


def _image() -> np.ndarray:
    y, x = np.mgrid[0:96, 0:128]
    return np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)


def test_run_record_thresholds_are_the_predictors(tiny) -> None:
    cfg, loaded = tiny
    text, vocab = vocabulary_text(cfg, loaded)
    predictor = make_predictor(cfg, loaded, text, vocab)
    thresholds = _run_record(LabelConfig(input="in", output="out", model=cfg), loaded.identity(), VOCAB).identity[
        "thresholds"
    ]
    assert thresholds == {
        "mask_logit": predictor.model.mask_threshold,
        "alpha": predictor.classifier.alpha,
        "beta": predictor.classifier.beta,
        "topk": predictor.topk,
    }
    # The values a run record written before them holds, so that such runs still resume.
    assert thresholds == {"mask_logit": 0.0, "alpha": 0.1, "beta": 0.9, "topk": 3}


def test_predictor_binarises_masks_at_the_models_threshold(tiny, monkeypatch) -> None:
    cfg, loaded = tiny
    text, vocab = vocabulary_text(cfg, loaded)
    predictor = make_predictor(cfg, loaded, text, vocab)
    prompts = [ImagePrompts(boxes=np.array([[10, 10, 90, 80]], np.float32), points=np.zeros((0, 2), np.float32))]
    logits = predictor([_image()], prompts)[0].low_res_logits
    monkeypatch.setattr(OVSAM, "mask_threshold", float(logits.min()) - 1.0)
    assert predictor([_image()], prompts)[0].areas.tolist() == [96 * 128]
    monkeypatch.setattr(OVSAM, "mask_threshold", float(logits.max()) + 1.0)
    assert predictor([_image()], prompts)[0].areas.tolist() == [0]


def test_logit_scale_is_the_exports_or_the_released_one() -> None:
    model = torch.nn.Identity()
    assert LoadedModel("ovsam_tiny", model, model, True).logit_scale == RELEASED_LOGIT_SCALE
    assert LoadedModel("ovsam_tiny", model, model, False, meta={"logit_scale": 2.5}).logit_scale == 2.5
