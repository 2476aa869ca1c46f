"""Class names as they go into prompt templates: no torch, so that the exporters and the
evaluation can clean names the same way without loading a model."""

__all__ = ["clean_class_name"]


def clean_class_name(name: str) -> str:
    """The text a class name contributes to a prompt.

    Dataset names use underscores for spaces (LVIS: ``"aerosol_can"``); the reference OV-SAM label
    preprocessing turns them into spaces and lower-cases the name (a no-op for CLIP's own BPE
    tokenizer, which lower-cases anyway). Unlike the reference, names are not split on ``/`` or
    ``_or_``: here synonyms are listed explicitly by the vocabulary.
    """
    return " ".join(name.replace("_", " ").lower().split())
