"""Tiny random-initialised OWLv2 and Grounding DINO folders in ``save_pretrained`` layout (no
download): small configs, tokenizers built from vocabularies generated here, the processors'
own preprocessing settings at a small image size."""

from __future__ import annotations

import string

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
