"""Tiny random-initialised OWLv2 and Grounding DINO folders in ``save_pretrained`` layout (no
download): small configs, tokenizers built from vocabularies generated here, the processors'
own preprocessing settings at a small image size."""

from __future__ import annotations

import string

import numpy as np
import pyarrow as pa
import torch


def _clip_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per character (CLIP's layout; the
    end-of-text token has the highest id, which OWLv2's text pooling relies on)."""
    from transformers import CLIPTokenizer

    chars = [c for c in string.printable if not c.isspace()]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def _bert_tokenizer():
    """A WordPiece vocabulary with BERT's special-token ids (Grounding DINO's text masks look for
    [CLS]=101, [SEP]=102, '.'=1012 and '?'=1029): filler entries, the specials, then letters."""
    from transformers import BertTokenizer

    vocab = [f"[unused{i}]" for i in range(1100)]
    for i, tok in (
        (0, "[PAD]"),
        (100, "[UNK]"),
        (101, "[CLS]"),
        (102, "[SEP]"),
        (103, "[MASK]"),
        (1012, "."),
        (1029, "?"),
    ):
        vocab[i] = tok
    vocab += list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase] + list(string.digits)
    return BertTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}), len(vocab)


def save_tiny_owlv2(folder: str, *, image_size: int = 64, seed: int = 0) -> str:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    torch.manual_seed(seed)
    tok = _clip_tokenizer()
    cfg = Owlv2Config(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 16,
        },
        projection_dim=32,
    )
    Owlv2ForObjectDetection(cfg).eval().save_pretrained(folder)
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": image_size, "width": image_size}), tokenizer=tok
    )
    processor.save_pretrained(folder)
    return folder


def save_tiny_grounding_dino(
    folder: str,
    *,
    max_text_len: int = 32,
    num_queries: int = 30,
    seed: int = 0,
    shortest_edge: int = 64,
    longest_edge: int = 96,
) -> str:
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    torch.manual_seed(seed)
    tok, vocab_size = _bert_tokenizer()
    backbone = SwinConfig(
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = {
        "model_type": "bert",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": max(64, max_text_len),
    }
    cfg = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=num_queries,
        max_text_len=max_text_len,
    )
    GroundingDinoForObjectDetection(cfg).eval().save_pretrained(folder)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": shortest_edge, "longest_edge": longest_edge})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder


def save_tiny_sam3(folder: str, *, image_size: int = 56, seed: int = 0) -> str:
    """A random SAM 3 (``Sam3Model``) a few hundred kilobytes large: a one-layer ViT on 14-pixel
    patches of a ``image_size`` square, a one-layer CLIP text encoder (the character tokenizer
    above, 32 tokens as the published processor pads to), one-layer DETR encoder and decoder
    with 8 queries, the mask decoder at hidden size 16."""
    from transformers import CLIPTokenizer, Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    torch.manual_seed(seed)
    tok = _clip_tokenizer()
    grid = image_size // 14
    hidden = 16
    cfg = Sam3Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam3_vit_model",
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": image_size,
                "patch_size": 14,
                "window_size": grid,
                "global_attn_indexes": [0],
                "pretrain_image_size": image_size,
            },
            "fpn_hidden_size": hidden,
            "backbone_feature_sizes": [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
        },
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 16,
            "intermediate_size": 32,
            "projection_dim": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.eos_token_id,
        },
        geometry_encoder_config={
            "hidden_size": hidden,
            "num_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
        },
        detr_encoder_config={"hidden_size": hidden, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
        detr_decoder_config={
            "hidden_size": hidden,
            "num_layers": 1,
            "num_queries": 8,
            "num_attention_heads": 2,
            "intermediate_size": 32,
        },
        mask_decoder_config={"hidden_size": hidden, "num_attention_heads": 2},
    )
    Sam3Model(cfg).eval().save_pretrained(folder)
    image_processor = Sam3ImageProcessor(
        size={"height": image_size, "width": image_size}, mask_size={"height": grid * 4, "width": grid * 4}
    )
    assert isinstance(tok, CLIPTokenizer)
    Sam3Processor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder


# --- the detector stage's input and output, for tests of any detector ---------------------------


def decoded_batch(images: list[np.ndarray], sizes: list[tuple[int, int]], status: list[str]) -> pa.Table:
    """The DECODED columns the detector stage reads: resized images, original (width, height)."""
    return pa.table(
        {
            "status": status,
            "error": [None] * len(images),
            "image": [im.tobytes() for im in images],
            "in_h": pa.array([im.shape[0] for im in images], pa.int32()),
            "in_w": pa.array([im.shape[1] for im in images], pa.int32()),
            "width": pa.array([w for w, _ in sizes], pa.int32()),
            "height": pa.array([h for _, h in sizes], pa.int32()),
        }
    )


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def boxes_of(out: pa.Table, i: int) -> np.ndarray:
    return np.asarray(out.column("det_boxes")[i].as_py(), np.float32).reshape(-1, 4)
