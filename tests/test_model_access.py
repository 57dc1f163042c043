"""vllama/model_access.py: which unconfigured names may start, and the back-off after failed starts (tables)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllama.errors import ModelNotAllowed, ModelNotFound, ModelUnavailable
from vllama.model_access import (
    AllowModels,
    StartBackoff,
    looks_like_model,
    parse_allow_models,
    unconfigured_source,
)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """/models/{hf (config.json), gguf (a .gguf inside), single.gguf, empty/}, and /elsewhere/hf."""
    root = tmp_path / "models"
    (root / "hf").mkdir(parents=True)
    (root / "hf" / "config.json").write_text("{}")
    (root / "gguf").mkdir()
    (root / "gguf" / "m-Q4.gguf").write_bytes(b"GGUF")
    (root / "single.gguf").write_bytes(b"GGUF")
    (root / "empty").mkdir()
    (tmp_path / "elsewhere" / "hf").mkdir(parents=True)
    (tmp_path / "elsewhere" / "hf" / "config.json").write_text("{}")
    (root / "link").symlink_to(tmp_path / "elsewhere" / "hf")  # a link out of the allowed folder
    return root


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("auto", AllowModels()),
        ("ANY", AllowModels("any")),
        ("configured", AllowModels("listed")),
        ("Qwen/*, /models ,", AllowModels("listed", ("Qwen/*", "/models"))),
        ("~/models", AllowModels("listed", ("~/models",))),
    ],
)
def test_parse_allow_models(raw: str, expected: AllowModels) -> None:
    assert parse_allow_models(raw) == expected


@pytest.mark.parametrize("raw", ["", " , ", "Qwen", "everything"])
def test_parse_allow_models_refuses_what_matches_nothing(raw: str) -> None:
    with pytest.raises(ValueError, match=r"Qwen/\*|auto"):
        parse_allow_models(raw)


@pytest.mark.parametrize(
    ("allow", "has_key", "restricted"),
    [
        (AllowModels(), False, False),  # the spec: a keyless daemon starts any HF id
        (AllowModels(), True, True),
        (AllowModels("any"), True, False),
        (AllowModels("listed"), False, True),
    ],
)
def test_auto_restricts_when_a_key_is_set(allow: AllowModels, has_key: bool, restricted: bool) -> None:
    assert allow.restricted(has_api_key=has_key) is restricted


def test_looks_like_model(models: Path) -> None:
    assert looks_like_model(str(models / "hf"))
    assert looks_like_model(str(models / "gguf"))
    assert looks_like_model(str(models / "single.gguf"))
    assert not looks_like_model(str(models / "empty"))
    assert not looks_like_model(str(models / "hf" / "config.json"))
    assert not looks_like_model("/")
    assert not looks_like_model("/no/such/thing")


ANY_BY_DEFAULT = AllowModels()


def _source(name: str, allow: AllowModels = ANY_BY_DEFAULT, *, has_key: bool = False) -> str:
    return unconfigured_source(name, allow, has_api_key=has_key, configured="A, B")


@pytest.mark.parametrize("name", ["/", "/proc", "/etc/passwd", "~", "/no/such/model", "/x\0y", "~nobody-here/x"])
def test_paths_that_are_not_models_are_404(name: str) -> None:
    with pytest.raises(ModelNotFound) as info:
        _source(name)
    assert not isinstance(info.value, ModelNotAllowed)
    assert info.value.status_code == 404 and "Configured" in info.value.message and info.value.param == "model"


@pytest.mark.parametrize("name", ["llama", "a/b/c", "-x/y", "../x", "org/", ""])
def test_names_that_are_neither_ids_nor_paths_are_404(name: str) -> None:
    with pytest.raises(ModelNotFound, match="Hugging Face id"):
        _source(name)


def test_tilde_is_expanded_for_vllm(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(models))
    assert _source("~/hf") == str(models / "hf")
    assert _source(str(models / "hf")) == str(models / "hf")
    assert _source("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"


@pytest.mark.parametrize(
    ("patterns", "name", "allowed"),
    [
        ((), "Qwen/Qwen3-0.6B", False),  # configured only
        (("Qwen/*",), "Qwen/Qwen3-0.6B", True),
        (("Qwen/*",), "qwen/Qwen3-0.6B", False),  # case-sensitive, as the Hub's ids
        (("Qwen/*",), "evil/Qwen", False),
        (("meta-llama/Llama-3.2-1B",), "meta-llama/Llama-3.2-1B", True),
        (("meta-llama/Llama-3.2-1B",), "meta-llama/Llama-3.2-1B-Instruct", False),
        (("{models}",), "{models}/hf", True),
        (("{models}/",), "{models}/gguf", True),
        (("{models}",), "{models}/single.gguf", True),
        (("{models}",), "{models}/../elsewhere/hf", False),  # no way out with ..
        (("{models}",), "{models}/link", False),  # nor with a symlink
        (("{models}",), "{elsewhere}/hf", False),
        (("Qwen/*",), "{models}/hf", False),  # an id pattern allows no path
        (("{models}",), "Qwen/Qwen3-0.6B", False),  # a folder allows no id
        (("{models}/h*",), "{models}/hf", True),
    ],
)
def test_restricted_patterns(models: Path, patterns: tuple[str, ...], name: str, allowed: bool) -> None:
    def fill(text: str) -> str:
        return text.format(models=models, elsewhere=models.parent / "elsewhere")

    allow = AllowModels("listed", tuple(fill(p) for p in patterns))
    if allowed:
        assert _source(fill(name), allow) == fill(name)
    else:
        with pytest.raises(ModelNotAllowed) as info:
            _source(fill(name), allow)
        assert info.value.status_code == 403 and "VLLAMA_ALLOW_MODELS" in info.value.message


def test_folder_pattern_with_tilde(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(models.parent))
    allow = AllowModels("listed", ("~/models",))
    assert _source("~/models/hf", allow) == str(models / "hf")
    with pytest.raises(ModelNotAllowed):
        _source("~/elsewhere/hf", allow)


def test_restriction_applies_with_a_key_under_auto() -> None:
    with pytest.raises(ModelNotAllowed, match=r"only the models of models\.yaml"):
        _source("Qwen/Qwen3-0.6B", AllowModels(), has_key=True)


# --- back-off after failed starts ------------------------------------------------------------------------------


def _blocked(backoff: StartBackoff, name: str, now: float) -> bool:
    try:
        backoff.check(name, now)
    except ModelUnavailable:
        return True
    return False


def test_backoff_doubles_and_caps() -> None:
    b = StartBackoff(10.0)
    expected_delays = [10, 20, 40, 80, 160, 300, 300]
    now = 0.0
    for count, delay in enumerate(expected_delays, start=1):
        b.record("M", failed=True, message="boom", now=now)
        assert _blocked(b, "M", now + delay - 0.01), (count, delay)
        assert not _blocked(b, "M", now + delay), (count, delay)
        now += delay
    with pytest.raises(ModelUnavailable, match=r"8 time\(s\).*vllama start M.*boom"):
        b.record("M", failed=True, message="boom", now=now)
        b.check("M", now + 1)


def test_backoff_success_forgets_and_models_are_separate() -> None:
    b = StartBackoff(10.0)
    b.record("M", failed=True, message="boom", now=0)
    assert _blocked(b, "M", 5) and not _blocked(b, "N", 5)
    b.record("M", failed=False, message=None, now=5)
    assert not _blocked(b, "M", 5)
    b.record("M", failed=True, message="boom", now=6)  # counting starts again
    assert not _blocked(b, "M", 16)


def test_backoff_off_and_long_bases() -> None:
    off = StartBackoff(0)
    off.record("M", failed=True, message="boom", now=0)
    assert not _blocked(off, "M", 0)
    long = StartBackoff(1000)  # a base above the cap is its own cap
    for _ in range(3):
        long.record("M", failed=True, message="x", now=0)
    assert _blocked(long, "M", 999) and not _blocked(long, "M", 1000)
    many = StartBackoff(1)
    for _ in range(5000):  # no overflow however long a model keeps failing
        many.record("M", failed=True, message="x", now=0)
    assert not _blocked(many, "M", 300)
