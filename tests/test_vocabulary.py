"""Vocabularies, templates, reference embedding files and the text-embedding cache (DESIGN 2.6, 2.7, 2.9)."""

import dataclasses
import hashlib
import io
import json
import logging
import os
import uuid

import fsspec
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ovsam_ray.text_cache import TextEmbeddingCache, TextEmbeddingKey, class_text_embeddings, load_class_embeddings
from ovsam_ray.vocabulary import BUILTIN_VOCABULARIES, Vocabulary, load_templates, load_vocabulary

# The reference OV-SAM COCO 48/17 split (contiguous ids), ext/class_names/coco_4817_ids.py.
COCO_BASE_IDS = {
    0,
    1,
    2,
    3,
    7,
    8,
    13,
    14,
    17,
    18,
    22,
    23,
    24,
    26,
    30,
    33,
    37,
    39,
    44,
    45,
    46,
    47,
    49,
    50,
    51,
    53,
    54,
    56,
    59,
    62,
    63,
    65,
    68,
    69,
    72,
    73,
    74,
    75,
    79,
    6,
    21,
    28,
    29,
    42,
    48,
    61,
    64,
    70,
}
COCO_NOVEL_IDS = {5, 16, 19, 20, 25, 27, 36, 41, 43, 55, 57, 66, 71, 76, 4, 15, 31}


def tiny_vocab(**changes) -> Vocabulary:
    fields = dict(
        name="tiny",
        class_names=("cat", "dog"),
        synonyms=(("cat", "kitty"), ("dog",)),
        seen=(True, False),
        excluded=(False, False),
        class_ids=(1, 2),
    )
    return Vocabulary(**{**fields, **changes})


def memory_url(name: str) -> str:
    return f"memory://ovsam-tests/{uuid.uuid4().hex}/{name}"


def write_url(url: str, data: bytes) -> None:
    with fsspec.open(url, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- built-in vocabularies


def test_coco_ov_builtin_protocol():
    vocab = load_vocabulary("coco_ov")
    assert vocab.name == "coco_ov" and vocab.num_classes == 80
    assert vocab.class_ids == tuple(range(80))
    seen_ids = {i for i, s in zip(vocab.class_ids, vocab.seen, strict=True) if s}
    excluded_ids = {i for i, e in zip(vocab.class_ids, vocab.excluded, strict=True) if e}
    assert seen_ids == COCO_BASE_IDS and len(seen_ids) == 48
    assert set(range(80)) - seen_ids - excluded_ids == COCO_NOVEL_IDS
    assert len(excluded_ids) == 15 and not excluded_ids & (COCO_BASE_IDS | COCO_NOVEL_IDS)
    assert vocab.class_names[0] == "person" and vocab.synonyms[0][:3] == ("person", "child", "girl")
    assert vocab.max_synonyms == max(len(s) for s in vocab.synonyms)
    seen, excluded = vocab.seen_tensor(), vocab.excluded_tensor()
    assert seen.dtype == excluded.dtype == torch.bool and seen.shape == excluded.shape == (80,)
    assert int(seen.sum()) == 48 and int(excluded.sum()) == 15 and int((~seen & ~excluded).sum()) == 17


def test_lvis_v1_builtin_frequency_mapping():
    vocab = load_vocabulary("lvis_v1")
    assert vocab.num_classes == 1203 and vocab.class_ids == tuple(range(1, 1204))
    assert sum(vocab.seen) == 461 + 405 and not any(vocab.excluded)
    by_name = dict(zip(vocab.class_names, vocab.seen, strict=True))
    assert by_name["aerosol_can"] is True  # c
    assert by_name["air_conditioner"] is True  # f
    assert by_name["applesauce"] is False  # r
    assert vocab.synonyms[0] == ("aerosol_can", "spray_can")
    assert vocab.max_synonyms == 8


def test_builtins_round_trip_through_json():
    for spec in BUILTIN_VOCABULARIES:
        vocab = load_vocabulary(spec)
        again = Vocabulary.from_json(vocab.to_json())
        assert again == vocab and again.sha256 == vocab.sha256


def test_load_templates():
    templates = load_templates()
    assert len(templates) == 14 and templates[0] == "a photo of a {}."
    assert all(t.count("{}") == 1 for t in templates)


def test_unknown_spec_lists_builtins():
    with pytest.raises(ValueError, match="coco_ov.*lvis_v1"):
        load_vocabulary("imagenet21k")


# ---------------------------------------------------------------- files


def test_txt_vocabulary(tmp_path):
    path = tmp_path / "kitchen.txt"
    path.write_text(
        "\ufeff# my classes\n\ncup, mug ,teacup\n  kettle   # an inline comment\nfork,fork, table fork\n   \n",
        encoding="utf-8",
    )
    vocab = load_vocabulary(str(path))
    assert vocab.name == "kitchen"
    assert vocab.class_names == ("cup", "kettle", "fork")
    assert vocab.synonyms == (("cup", "mug", "teacup"), ("kettle",), ("fork", "table fork"))
    assert vocab.class_ids == (0, 1, 2)
    assert vocab.seen == (True, True, True) and vocab.excluded == (False, False, False)


def test_empty_txt_vocabulary_is_an_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing here\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no classes"):
        load_vocabulary(str(path))


def test_json_list_of_names_and_list_of_lists(tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["cat", "dog"]))
    vocab = load_vocabulary(str(names))
    assert vocab.class_names == ("cat", "dog") and vocab.synonyms == (("cat",), ("dog",))
    assert vocab.seen == (True, True) and vocab.class_ids == (0, 1)

    lists = tmp_path / "lists.json"
    lists.write_text(json.dumps([["cat", "kitty"], ["dog"]]))
    vocab = load_vocabulary(str(lists))
    assert vocab.class_names == ("cat", "dog") and vocab.synonyms == (("cat", "kitty"), ("dog",))


def test_json_builtin_format(tmp_path):
    data = {
        "name": "mixed",
        "classes": [
            {"id": 7, "name": "cat", "synonyms": ["cat", "kitty"], "split": "base"},
            {"id": 9, "name": "dog", "split": "novel"},
            {"id": 3, "name": "fox", "split": "none"},
            {"id": 4, "name": "owl", "frequency": "r"},
            {"id": 5, "name": "bee", "frequency": "c", "seen": False, "excluded": True},
        ],
    }
    path = tmp_path / "file_stem.json"
    path.write_text(json.dumps(data))
    vocab = load_vocabulary(str(path))
    assert vocab.name == "mixed" and vocab.class_ids == (7, 9, 3, 4, 5)
    assert vocab.synonyms[1] == ("dog",)
    assert vocab.seen == (True, False, False, False, False)
    assert vocab.excluded == (False, False, True, False, True)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"name": "x"}), "'classes'"),
        (json.dumps([]), "no classes"),
        (json.dumps([{"name": "cat", "split": "weird"}]), "unknown split"),
        (json.dumps([{"id": 1}]), "needs a 'name'"),
        (json.dumps([["cat"], 3]), "expected a name"),
        (json.dumps(["cat", "cat"]), "duplicate class_names"),
        (json.dumps([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]), "duplicate class_ids"),
    ],
)
def test_malformed_json_vocabulary(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_vocabulary(str(path))


def test_vocabulary_files_through_fsspec_urls():
    txt_url = memory_url("remote.txt")
    write_url(txt_url, b"cat, kitty\ndog\n")
    vocab = load_vocabulary(txt_url)
    assert vocab.name == "remote" and vocab.synonyms == (("cat", "kitty"), ("dog",))

    json_url = memory_url("remote.json")
    write_url(json_url, load_vocabulary("coco_ov").to_json().encode())
    assert load_vocabulary(json_url) == load_vocabulary("coco_ov")


# ---------------------------------------------------------------- seen overrides


def test_seen_override_all_none():
    assert all(load_vocabulary("coco_ov", seen="all").seen)
    vocab = load_vocabulary("coco_ov", seen="none")
    assert not any(vocab.seen) and sum(vocab.excluded) == 15  # the protocol's exclusions stay


def test_seen_from_training_vocabulary(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("Aerosol can, spray can\napplesauce\nmy_new_gadget\n")
    vocab = load_vocabulary(str(path), seen="lvis_v1")
    assert vocab.seen == (True, False, False)  # common, rare, unknown

    trained = tmp_path / "trained.txt"
    trained.write_text("my new gadget\n")
    assert load_vocabulary(str(path), seen=str(trained)).seen == (False, False, True)


def test_seen_override_unknown_value():
    with pytest.raises(ValueError, match="seen="):
        load_vocabulary("coco_ov", seen="most")


# ---------------------------------------------------------------- the Vocabulary type and its hash


def test_vocabulary_hash_golden_and_stable():
    canonical = (
        '{"class_ids":[1,2],"class_names":["cat","dog"],"excluded":[false,false],'
        '"seen":[true,false],"synonyms":[["cat","kitty"],["dog"]]}'
    )
    expected = hashlib.sha256(canonical.encode()).hexdigest()
    assert tiny_vocab().sha256 == expected
    assert expected == "003ce02fadf260fc9157f58d1f5c6b9d596829a6c614bc7568cbb99ec77736a6"
    as_lists = tiny_vocab(class_names=["cat", "dog"], synonyms=[["cat", "kitty"], ["dog"]], seen=[1, 0])
    assert as_lists == tiny_vocab() and as_lists.sha256 == expected
    assert tiny_vocab(name="renamed").sha256 == expected  # the label is not content


@pytest.mark.parametrize(
    "change",
    [
        {"class_names": ("cat", "wolf")},
        {"synonyms": (("cat",), ("dog",))},
        {"synonyms": (("kitty", "cat"), ("dog",))},
        {"seen": (True, True)},
        {"excluded": (False, True)},
        {"class_ids": (1, 3)},
    ],
)
def test_vocabulary_hash_sensitivity(change):
    assert tiny_vocab(**change).sha256 != tiny_vocab().sha256


def test_vocabulary_validation():
    with pytest.raises(ValueError, match="no classes"):
        tiny_vocab(class_names=(), synonyms=(), seen=(), excluded=(), class_ids=())
    with pytest.raises(ValueError, match="field lengths"):
        tiny_vocab(seen=(True,))
    with pytest.raises(ValueError, match="blank"):
        tiny_vocab(synonyms=(("cat",), ()))
    with pytest.raises(TypeError):
        tiny_vocab(synonyms=("cat", "dog"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny_vocab().name = "other"


def test_vocabulary_json_round_trip():
    vocab = tiny_vocab()
    data = json.loads(vocab.to_json())
    assert data["sha256"] == vocab.sha256 and data["classes"][1] == {
        "id": 2,
        "name": "dog",
        "synonyms": ["dog"],
        "seen": False,
        "excluded": False,
    }
    assert Vocabulary.from_json(vocab.to_json()) == vocab
    assert Vocabulary.from_json(data) == vocab


# ---------------------------------------------------------------- reference embedding files


def unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def test_load_class_embeddings_bare_and_dict(tmp_path):
    emb = unit(5, 3, 16)
    torch.save(emb, tmp_path / "bare.pth")
    torch.testing.assert_close(load_class_embeddings(str(tmp_path / "bare.pth")), emb)
    torch.save({"classifier": emb.half(), "note": "x"}, tmp_path / "dict.pth")
    loaded = load_class_embeddings(str(tmp_path / "dict.pth"))
    assert loaded.dtype == torch.float32 and loaded.shape == (5, 3, 16)

    url = memory_url("emb.pth")
    buffer = io.BytesIO()
    torch.save(emb, buffer)
    write_url(url, buffer.getvalue())
    torch.testing.assert_close(load_class_embeddings(url), emb)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        (unit(5, 16), "num_classes, num_synonyms, dim"),
        (torch.randn(5, 3, 16) * 4, "L2-normalised"),
        ({"a": unit(2, 1, 4), "b": unit(2, 1, 4)}, "one tensor"),
        (torch.ones(2, 1, 4, dtype=torch.long), "float"),
    ],
)
def test_load_class_embeddings_rejects_bad_tensors(tmp_path, obj, match):
    path = tmp_path / "bad.pth"
    torch.save(obj, path)
    with pytest.raises(ValueError, match=match) as info:
        load_class_embeddings(str(path))
    assert "bad.pth" in str(info.value)


class Unpicklable:
    pass


def test_load_class_embeddings_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": Unpicklable()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_class_embeddings(str(path))


# ---------------------------------------------------------------- cache


KEY = TextEmbeddingKey("RN50", "a" * 64, "b" * 64, "c" * 64)


def test_cache_round_trip_local(tmp_path):
    cache = TextEmbeddingCache(str(tmp_path / "cache"))
    assert cache.get(KEY) is None
    emb = unit(4, 2, 8)
    cache.put(KEY, emb)
    torch.testing.assert_close(cache.get(KEY), emb)
    assert cache.get(KEY._replace(clip_weights_sha256="d" * 64)) is None
    assert os.listdir(tmp_path / "cache") == [f"{KEY.digest()}.pt"]  # no temp files left behind
    assert cache.path(KEY) == str(tmp_path / "cache" / f"{KEY.digest()}.pt")
    cache.put(KEY, emb * 0 + unit(4, 2, 8))  # overwrite in place
    assert os.listdir(tmp_path / "cache") == [f"{KEY.digest()}.pt"]


def test_cache_key_digest_is_stable_and_sensitive():
    assert KEY.digest() == TextEmbeddingKey("RN50", "a" * 64, "b" * 64, "c" * 64).digest()
    digests = {KEY.digest()} | {KEY._replace(**{f: "z"}).digest() for f in KEY._fields}
    assert len(digests) == 1 + len(KEY._fields)


def test_cache_default_root_is_under_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = TextEmbeddingCache()
    assert cache.root == str(tmp_path / ".cache" / "ovsam_ray" / "text")
    cache.put(KEY, unit(1, 1, 4))
    assert (tmp_path / ".cache" / "ovsam_ray" / "text" / f"{KEY.digest()}.pt").is_file()


def test_cache_corrupt_entry_is_a_miss(tmp_path, caplog):
    cache = TextEmbeddingCache(str(tmp_path))
    (tmp_path / f"{KEY.digest()}.pt").write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING):
        assert cache.get(KEY) is None
    assert "unreadable" in caplog.text


def test_cache_round_trip_remote():
    root = memory_url("cache")
    cache = TextEmbeddingCache(root)
    emb = unit(3, 1, 8)
    assert cache.get(KEY) is None
    cache.put(KEY, emb)
    torch.testing.assert_close(cache.get(KEY), emb)
    assert cache.path(KEY).startswith("memory://") and cache.path(KEY).endswith(f"{KEY.digest()}.pt")
    torch.testing.assert_close(TextEmbeddingCache(root).get(KEY), emb)


# ---------------------------------------------------------------- class_text_embeddings


class CountingTower(nn.Module):
    """encode_text: a fixed random projection of token ids; counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 8, bias=False)
        self.calls = 0

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.proj(tokens.float() / 255.0) + 0.1


class FailingTower(nn.Module):
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a cache hit must not encode text")


def byte_tokenizer(texts: list[str]) -> torch.Tensor:
    tokens = torch.zeros(len(texts), 64, dtype=torch.long)
    for i, text in enumerate(texts):
        codes = list(text.encode())[:64]
        tokens[i, : len(codes)] = torch.tensor(codes)
    return tokens


def test_class_text_embeddings_uses_cache(tmp_path):
    torch.manual_seed(0)
    cache = TextEmbeddingCache(str(tmp_path))
    vocab, tower = tiny_vocab(), CountingTower()
    kwargs = dict(clip_name="fake", clip_weights_sha256="w" * 64, cache=cache)
    first = class_text_embeddings(vocab, tower, byte_tokenizer, **kwargs)
    assert first.shape == (2, 2, 8) and tower.calls > 0
    torch.testing.assert_close(first[1, 1], first[1, 0])  # padded with the first synonym
    hit = class_text_embeddings(vocab, FailingTower(), byte_tokenizer, **kwargs)
    torch.testing.assert_close(hit, first)

    calls = tower.calls
    class_text_embeddings(vocab, tower, byte_tokenizer, **{**kwargs, "clip_weights_sha256": "v" * 64})
    assert tower.calls > calls  # other weights, other entry
    calls = tower.calls
    class_text_embeddings(tiny_vocab(seen=(True, True)), tower, byte_tokenizer, **kwargs)
    assert tower.calls > calls  # other vocabulary hash, other entry


def test_class_text_embeddings_without_cache_or_with_stale_entry(tmp_path):
    vocab, tower = tiny_vocab(), CountingTower()
    kwargs = dict(clip_name="fake", clip_weights_sha256="w")
    out = class_text_embeddings(vocab, tower, byte_tokenizer, cache=None, **kwargs)
    assert out.shape == (2, 2, 8) and tower.calls > 0

    cache = TextEmbeddingCache(str(tmp_path))
    class_text_embeddings(vocab, tower, byte_tokenizer, cache=cache, **kwargs)
    (entry,) = os.listdir(tmp_path)
    key = TextEmbeddingKey(*torch.load(tmp_path / entry, weights_only=True)["key"])
    assert key[:3] == ("fake", "w", vocab.sha256)
    cache.put(key, unit(5, 1, 8))  # wrong shape for this vocabulary: recomputed and replaced
    calls = tower.calls
    again = class_text_embeddings(vocab, tower, byte_tokenizer, cache=cache, **kwargs)
    assert tower.calls > calls
    torch.testing.assert_close(again, out)
    torch.testing.assert_close(cache.get(key), out)


class FailingClip(nn.Module):
    """A CLIP stand-in whose text tower must not run (a cache hit)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a cache hit must not encode text")


def test_training_and_inference_embed_a_vocabulary_with_one_function(tmp_path):
    """Co-training and inference both embed through ``embed_vocabulary``: the same cache key, so
    an entry one writes the other reads; a CLIP without a weights file is never cached."""
    from types import SimpleNamespace

    from ovsam_ray.inference import ModelConfig, vocabulary_text
    from ovsam_ray.model.presets import create_clip_model
    from ovsam_ray.text_cache import embed_vocabulary
    from ovsam_ray.training.cotrain import text_embeddings_for
    from ovsam_ray.weights.files import file_sha256
    from ovsam_ray.weights.released import LoadedModel

    torch.manual_seed(0)
    clip = create_clip_model("ovsam_tiny")
    clip_file = tmp_path / "clip_tiny.pth"
    torch.save(clip.state_dict(), clip_file)
    vocab, root = tiny_vocab(seen=(True, True)), tmp_path / "text"
    cfg = SimpleNamespace(
        model=SimpleNamespace(preset="ovsam_tiny"), run=SimpleNamespace(s3_endpoint=None), text_cache=str(root)
    )
    trained = text_embeddings_for(SimpleNamespace(vocab=vocab), clip, cfg, {"clip": str(clip_file)})
    assert trained.shape == (2, 2, 64) and len(os.listdir(root)) == 1

    loaded = LoadedModel(
        "ovsam_tiny",
        nn.Identity(),
        FailingClip(),
        False,
        files={"clip": {"path": str(clip_file), "sha256": file_sha256(str(clip_file))}},
        meta={"vocabulary": vocab.to_json(), "seen_classes": ["cat", "dog"]},
    )
    text, resolved = vocabulary_text(ModelConfig(preset="ovsam_tiny", random_init=True, text_cache=str(root)), loaded)
    assert resolved.sha256 == vocab.sha256
    torch.testing.assert_close(text, trained)

    untracked = text_embeddings_for(SimpleNamespace(vocab=vocab), clip, cfg, {})
    torch.testing.assert_close(untracked, trained)
    direct = embed_vocabulary(vocab, clip, "ovsam_tiny", clip_weights_sha256=None, cache_root=str(root))
    torch.testing.assert_close(direct, trained)
    assert len(os.listdir(root)) == 1  # neither wrote an entry
