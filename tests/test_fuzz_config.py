"""Property tests (hypothesis) of the models.yaml loader: whatever the file holds, loading it gives either a valid
configuration that vllama can launch, or a ConfigError that says what is wrong — never another exception (which
would be a traceback at `vllama serve`, or a 500 on a reload)."""

from __future__ import annotations

import contextlib
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllama import engine as eng
from vllama.config import ModelConfig, ModelsFile, load_models_file, parse_duration, parse_models, parse_models_text
from vllama.errors import ConfigError

EXAMPLES = 400
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))

FIELDS = sorted(ModelConfig.model_fields)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["5m", "1h30m", "-1", "never", "0.5", "--host", "0,1", "0.9", "4k", "", "  ", "1e999", "nan"])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.sampled_from(FIELDS), inner),
    max_leaves=12,
)
# entries that look like real ones: mostly known keys, with plausible or hostile values
entries = st.dictionaries(
    st.sampled_from([*FIELDS, "sleep_l1", "stop", "gpu_memory_utilisation", "host"]) | st.text(max_size=8),
    values,
    max_size=6,
)
names = st.text(max_size=16) | st.sampled_from(["A", "org/model", "-flag", "", " ", "a/b/c", "/tmp", "模型"])
documents = st.dictionaries(names | st.integers() | st.none() | st.booleans(), entries | values, max_size=5) | values


def check_launchable(models: ModelsFile) -> None:
    """A configuration that loads must produce a vLLM command line (every flag vllama owns set by vllama)."""
    for name, cfg in models.models.items():
        assert models.get(name) is cfg
        for alias in cfg.aliases:
            assert models.canonical(alias) == name
        spec = eng.build_launch(
            name=name,
            cfg=cfg,
            vllm_command=["vllm"],
            port=33300,
            devices=tuple(cfg.devices or range(cfg.tp)),
            device_kind="cuda",
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            logs_dir=Path("/nonexistent/logs"),
            sleep_mode=True,
        )
        assert spec.argv.count("--host") == 1 and spec.argv[spec.argv.index("--host") + 1] == "127.0.0.1"
        assert spec.argv.count("--port") == 1
        assert spec.log_path.parent == Path("/nonexistent/logs")
        if cfg.startup_timeout is not None:
            assert cfg.startup_timeout > 0 and not math.isnan(cfg.startup_timeout)
        # every keep-alive step can be shown as a date (`ps`, Ollama's expires_at)
        ka = cfg.keep_alive
        for step in (ka.sleep_l1, ka.sleep_l2, ka.stop) if ka else ():
            if step is not None:
                assert step >= 0
                datetime.fromtimestamp(time.time() + step, timezone.utc)


def load_or_config_error(data: Any) -> ModelsFile | None:
    try:
        models = parse_models(data)
    except ConfigError as exc:
        assert str(exc).startswith("models.yaml"), exc
        return None
    check_launchable(models)
    return models


@FUZZ
@given(documents)
def test_random_documents_load_or_raise_config_error(data: Any) -> None:
    load_or_config_error(data)


@FUZZ
@given(scalars)
def test_durations_are_none_a_finite_number_or_a_value_error(value: Any) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return
    if seconds is not None:
        assert 0 <= seconds < 100 * 365 * 86400
        datetime.fromtimestamp(time.time() + seconds, timezone.utc)


def test_huge_and_nan_durations() -> None:
    assert parse_duration(6e20) is None and parse_duration("1e999") is None and parse_duration(2**70) is None
    assert parse_duration("999999999h") is None  # a century or more: never
    with pytest.raises(ValueError):
        parse_duration(float("nan"))
    with pytest.raises(ValueError):
        parse_duration("nan")


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(names, entries, max_size=4))
def test_random_entries_round_trip_through_yaml(data: dict[Any, Any]) -> None:
    """What `vllama assign` writes (yaml.safe_dump) loads the same way as the data itself."""
    direct = None
    with contextlib.suppress(ConfigError):
        direct = parse_models(data)
    text = yaml.safe_dump(data, allow_unicode=True)
    try:
        through_yaml = parse_models_text(text)
    except ConfigError:
        through_yaml = None
    if direct is not None:
        assert through_yaml is not None and sorted(through_yaml.models) == sorted(direct.models)


@FUZZ
@given(
    st.text(max_size=200) | st.sampled_from(["[" * 5000, "{a: " * 3000, "a: &x [*x]", "!!python/object:os.system {}"])
)
def test_random_text_loads_or_raises_config_error(text: str) -> None:
    try:
        models = parse_models_text(text)
    except ConfigError:
        return
    check_launchable(models)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=64))
def test_random_bytes_in_the_file_load_or_raise_config_error(
    tmp_path_factory: pytest.TempPathFactory, raw: bytes
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "models.yaml"
    path.write_bytes(raw)
    try:
        check_launchable(load_models_file(path))
    except ConfigError as exc:
        assert str(path) in str(exc)


def test_unreadable_models_file_is_a_config_error(tmp_path: Path) -> None:
    folder = tmp_path / "models.yaml"
    folder.mkdir()  # a folder where the file should be
    with pytest.raises(ConfigError, match="cannot be read"):
        load_models_file(folder)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"A:\n  gpu_memory_gib: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_models_file(binary)
