"""Class text embeddings: template averaging, synonym padding and batched CLIP encoding (DESIGN 2.9)."""

import math

import pytest
import torch
from torch import nn

from ovsam_ray.model.text_embedding import (
    average_template_embeddings,
    clean_class_name,
    embed_class_names,
    pad_synonyms,
)
from ovsam_ray.vocabulary import load_templates

TEMPLATES = ["a photo of a {}.", "There is a {} in the scene", "a {}"]


class ByteTokenizer:
    """Texts -> (N, 64) byte ids; remembers what it was asked to tokenize."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        tokens = torch.zeros(len(texts), 64, dtype=torch.long)
        for i, text in enumerate(texts):
            codes = list(text.encode("utf-8"))[:64]
            tokens[i, : len(codes)] = torch.tensor(codes)
        return tokens


class FakeTextTower(nn.Module):
    """Deterministic text 'encoder' with no parameters (sum of position-dependent byte vectors)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("table", torch.randn(256, 64, dim, generator=generator))
        self.batch_sizes: list[int] = []

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(int(tokens.shape[0]))
        return 3.0 * self.table[tokens, torch.arange(tokens.shape[1])].sum(dim=1)


def direct_embedding(model, tokenizer, name: str, templates: list[str]) -> torch.Tensor:
    """The definition, one name at a time: mean of unit template embeddings, re-normalised."""
    with torch.no_grad():
        raw = model.encode_text(tokenizer([t.format(name.replace("_", " ")) for t in templates])).float()
    unit = raw / raw.norm(dim=-1, keepdim=True)
    mean = unit.mean(dim=0)
    return mean / mean.norm()


# ---------------------------------------------------------------- average_template_embeddings


def test_average_template_embeddings_golden():
    # unit vectors (0.6, 0.8) and (0, 1): mean (0.3, 0.9), renormalised (1, 3) / sqrt(10)
    raw = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    out = average_template_embeddings(raw)
    expected = torch.tensor([1.0, 3.0]) / math.sqrt(10.0)
    torch.testing.assert_close(out, expected)


def test_average_template_embeddings_batched_and_scale_invariant():
    raw = torch.randn(2, 3, 5, 7)
    out = average_template_embeddings(raw)
    assert out.shape == (2, 3, 7) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 3))
    rescaled = raw * torch.rand(2, 3, 5, 1).add(0.5)  # a template's length must not weigh it
    torch.testing.assert_close(average_template_embeddings(rescaled), out)
    torch.testing.assert_close(out[1, 2], average_template_embeddings(raw[1, 2]))


def test_average_template_embeddings_half_input_gives_float32():
    out = average_template_embeddings(torch.randn(4, 3, 8).half())
    assert out.dtype == torch.float32


def test_average_template_embeddings_empty_batch():
    out = average_template_embeddings(torch.zeros(0, 14, 8))
    assert out.shape == (0, 8)


def test_average_template_embeddings_rejects_zero_templates_and_1d():
    with pytest.raises(ValueError, match="zero templates"):
        average_template_embeddings(torch.zeros(3, 0, 8))
    with pytest.raises(ValueError):
        average_template_embeddings(torch.zeros(8))


# ---------------------------------------------------------------- pad_synonyms


def test_pad_synonyms_repeats_first_synonym():
    a, b, c, d, e, f = (torch.full((2,), float(v)) for v in range(1, 7))
    out = pad_synonyms([torch.stack([a, b]), torch.stack([c]), torch.stack([d, e, f])])
    assert out.shape == (3, 3, 2)
    torch.testing.assert_close(out[0], torch.stack([a, b, a]))
    torch.testing.assert_close(out[1], torch.stack([c, c, c]))
    torch.testing.assert_close(out[2], torch.stack([d, e, f]))


def test_pad_synonyms_keeps_dtype_and_single_class():
    x = torch.randn(4, 5, dtype=torch.float64)
    out = pad_synonyms([x])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x[None])


def test_pad_synonyms_empty():
    assert pad_synonyms([]).shape == (0, 0, 0)
    assert pad_synonyms([], dim=16).shape == (0, 0, 16)


def test_pad_synonyms_rejects_class_without_synonyms_and_mixed_dims():
    with pytest.raises(ValueError, match="at least one synonym"):
        pad_synonyms([torch.randn(2, 4), torch.randn(0, 4)])
    with pytest.raises(ValueError, match="one D"):
        pad_synonyms([torch.randn(2, 4), torch.randn(1, 5)])


# ---------------------------------------------------------------- embed_class_names


def test_clean_class_name():
    assert clean_class_name("aerosol_can") == "aerosol can"
    assert clean_class_name("arctic_(type_of_shoe)") == "arctic (type of shoe)"
    assert clean_class_name("Band_Aid") == "band aid"
    assert clean_class_name("  sports  ball ") == "sports ball"


def test_embed_class_names_matches_definition_and_pads_with_first_synonym():
    model, tokenizer = FakeTextTower(), ByteTokenizer()
    synonyms = [["aerosol_can", "spray_can"], ["person"], ["car", "automobile", "auto"]]
    out = embed_class_names(model, tokenizer, synonyms, TEMPLATES)
    assert out.shape == (3, 3, 8) and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 3))
    for c, names in enumerate(synonyms):
        for s in range(3):
            name = names[s] if s < len(names) else names[0]
            torch.testing.assert_close(out[c, s], direct_embedding(model, ByteTokenizer(), name, TEMPLATES))
    texts = [t for call in tokenizer.calls for t in call]
    assert "a photo of a aerosol can." in texts and not any("_" in t for t in texts)


def test_embed_class_names_bounds_batches_and_is_batch_size_invariant():
    synonyms = [[f"class_{i}", f"alias_{i}"] for i in range(7)] + [["last"]]
    small_model = FakeTextTower()
    small = embed_class_names(small_model, ByteTokenizer(), synonyms, TEMPLATES, batch_size=7)
    assert max(small_model.batch_sizes) <= 7 and sum(small_model.batch_sizes) == 15 * len(TEMPLATES)
    one_model = FakeTextTower()
    one = embed_class_names(one_model, ByteTokenizer(), synonyms, TEMPLATES, batch_size=1)
    assert set(one_model.batch_sizes) == {len(TEMPLATES)}  # never fewer than one name's templates
    big = embed_class_names(FakeTextTower(), ByteTokenizer(), synonyms, TEMPLATES, batch_size=10_000)
    torch.testing.assert_close(small, big)
    torch.testing.assert_close(one, big)


def test_embed_class_names_empty_vocabulary_encodes_nothing():
    model = FakeTextTower()
    out = embed_class_names(model, ByteTokenizer(), [], TEMPLATES)
    assert out.shape == (0, 0, 0) and model.batch_sizes == []


def test_embed_class_names_rejects_bad_input():
    model, tokenizer = FakeTextTower(), ByteTokenizer()
    with pytest.raises(ValueError, match="at least one synonym"):
        embed_class_names(model, tokenizer, [["cat"], []], TEMPLATES)
    with pytest.raises(TypeError):
        embed_class_names(model, tokenizer, ["cat", "dog"], TEMPLATES)
    with pytest.raises(ValueError, match="template"):
        embed_class_names(model, tokenizer, [["cat"]], [])
    with pytest.raises(ValueError, match="no class name|'\\{\\}'"):
        embed_class_names(model, tokenizer, [["cat"]], ["a photo"])
    with pytest.raises(ValueError, match="batch_size"):
        embed_class_names(model, tokenizer, [["cat"]], TEMPLATES, batch_size=0)
    assert model.batch_sizes == []


def test_embed_class_names_no_grad_with_explicit_device():
    layer = nn.Linear(64, 8)  # a parameterised tower: the output must not track gradients

    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = layer

        def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.proj(tokens.float())

    out = embed_class_names(Tower(), ByteTokenizer(), [["cat"]], TEMPLATES, device="cpu")
    assert not out.requires_grad and out.shape == (1, 1, 8)


@pytest.fixture(scope="module")
def tiny_clip():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=64),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()
    return model, open_clip.get_tokenizer("RN50")


def test_embed_class_names_with_tiny_open_clip(tiny_clip):
    model, tokenizer = tiny_clip
    templates = load_templates()
    synonyms = [["aerosol_can", "spray_can"], ["person", "child", "girl"], ["Band_Aid"]]
    out = embed_class_names(model, tokenizer, synonyms, templates, batch_size=30)
    assert out.shape == (3, 3, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, 3))
    for c, names in enumerate(synonyms):
        for s, name in enumerate(names):
            torch.testing.assert_close(out[c, s], direct_embedding(model, tokenizer, name, templates))
        for s in range(len(names), 3):
            torch.testing.assert_close(out[c, s], out[c, 0])


# ---------------------------------------------------------------- template_tokens (the splice)


@pytest.fixture(scope="module")
def bpe():
    import open_clip

    return open_clip.get_tokenizer("RN50")


def _boundary_templates(templates: list[str]) -> list[str]:
    """One template per distinct pair of joins (the prefix's last character, the suffix): the
    pre-tokenizer is local, so a name's tokens in one template of a pair are its tokens in all."""
    seen, out = set(), []
    for t in templates:
        pre, post = t.split("{}", 1)
        key = (pre[-1:], post)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


@pytest.mark.slow
def test_template_tokens_equal_the_tokenizer_over_the_whole_in21k_vocabulary(bpe):
    """Every name of the built-in in21k vocabulary (timm's ImageNet-22k, 40,737 names), in one
    template per kind of join, and a sample in all 14 templates: the spliced tokens are the
    tokenizer's own. (All 570k texts one by one take ~40 s; this takes a third of that.)"""
    from ovsam_ray.model.text_embedding import template_tokens
    from ovsam_ray.vocabulary import load_vocabulary

    names = [clean_class_name(n) for syn in load_vocabulary("in21k").synonyms for n in syn]
    assert len(names) == 40_737
    templates = load_templates()
    joins = _boundary_templates(templates)
    assert {t.split("{}", 1)[1] for t in joins} == {t.split("{}", 1)[1] for t in templates}
    expected = bpe([t.format(n) for n in names for t in joins])
    assert torch.equal(template_tokens(bpe, names, joins), expected)
    sample = names[::97]
    assert torch.equal(template_tokens(bpe, sample, templates), bpe([t.format(n) for n in sample for t in templates]))


@pytest.mark.parametrize(
    "name",
    [
        "u.s.a.",
        "it's",
        "rock 'n' roll",
        "o'",
        "b&amp;w",
        "fish & chips",
        "r2-d2",
        "3",
        "x 10",
        "(n12345)",
        "cafe\u0301",
        "naïve",
        "\u4e2d\u6587",
        "Upper Case",
        "two  spaces",
        "a-" * 60,
        "word " * 80,
    ],
)
def test_template_tokens_edge_names(bpe, name):
    from ovsam_ray.model.text_embedding import template_tokens

    templates = load_templates() + ["{}", "'{}'", "{}s", "x{}y", "{}."]
    got = template_tokens(bpe, [name, "cat"], templates)
    assert torch.equal(got, bpe([t.format(n) for n in (name, "cat") for t in templates]))


def test_template_tokens_hands_other_tokenizers_the_texts():
    from ovsam_ray.model.text_embedding import template_tokens

    tok = ByteTokenizer()
    out = template_tokens(tok, ["cat", "dog"], TEMPLATES)
    assert tok.calls == [[t.format(n) for n in ("cat", "dog") for t in TEMPLATES]] and out.shape == (6, 64)
