"""Open-vocabulary classifier over class text embeddings, with the head/CLIP fusion (DESIGN §2.6-7)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ovsam_ray.model.functional import classify_embeddings, fuse_open_vocab_logits

# The released models' logit scale: exp(4.6052) = 100.00296.
RELEASED_LOGIT_SCALE = 4.6052
# The paper's CLIP weights in the fusion of seen (alpha) and unseen (beta) classes.
FUSION_ALPHA = 0.1
FUSION_BETA = 0.9


@dataclass
class ClassifierOutput:
    """(N, C + 1) logits, background last: head (CLIP2SAM), CLIP branch, and fused."""

    head_logits: torch.Tensor
    clip_logits: torch.Tensor
    fused_logits: torch.Tensor


class OpenVocabClassifier(nn.Module):
    # Buffers registered in __init__.
    text_embeddings: torch.Tensor
    seen: torch.Tensor
    excluded: torch.Tensor

    """Scores region and CLIP embeddings against a vocabulary.

    Args:
        text_embeddings: (C, S, D) unit-norm class embeddings, synonyms padded.
        seen: (C,) bool, classes in the checkpoint's training vocabulary (fused with a).
        excluded: (C,) bool, classes forced to -1000 (e.g. COCO-OV's 15 unused classes).
        logit_scale: log of the temperature multiplier (4.6052 for the released models).
        alpha, beta: CLIP weights for seen and unseen classes (0.1 / 0.9).
    """

    def __init__(
        self,
        *,
        text_embeddings: torch.Tensor,
        seen: torch.Tensor | None = None,
        excluded: torch.Tensor | None = None,
        logit_scale: float = RELEASED_LOGIT_SCALE,
        alpha: float = FUSION_ALPHA,
        beta: float = FUSION_BETA,
    ) -> None:
        super().__init__()
        if text_embeddings.ndim != 3:
            raise ValueError(f"text_embeddings must be (C, S, D), got {tuple(text_embeddings.shape)}")
        num_classes = text_embeddings.shape[0]
        if seen is None:
            seen = torch.ones(num_classes, dtype=torch.bool)
        if excluded is None:
            excluded = torch.zeros(num_classes, dtype=torch.bool)
        if seen.shape != (num_classes,) or excluded.shape != (num_classes,):
            raise ValueError("seen/excluded must have one flag per class")
        self.register_buffer("text_embeddings", text_embeddings.float(), persistent=False)
        self.register_buffer("seen", seen.bool(), persistent=False)
        self.register_buffer("excluded", excluded.bool(), persistent=False)
        self.logit_scale = float(logit_scale)
        self.alpha = alpha
        self.beta = beta

    @property
    def num_classes(self) -> int:
        return int(self.text_embeddings.shape[0])

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C + 1) logits."""
        return classify_embeddings(embeddings, self.text_embeddings, self.logit_scale)

    def forward(
        self, region_embeddings: torch.Tensor, clip_embeddings: torch.Tensor, clip_valid: torch.Tensor
    ) -> ClassifierOutput:
        head = self.logits(region_embeddings)
        clip = self.logits(clip_embeddings)
        fused = fuse_open_vocab_logits(
            head, clip, clip_valid, self.seen, self.excluded, alpha=self.alpha, beta=self.beta
        )
        return ClassifierOutput(head_logits=head, clip_logits=clip, fused_logits=fused)
