"""Unit tests of vllama.config: durations, the models.yaml schema and its error messages, update_model_entry
and Settings.from_env. No daemon, no subprocess."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from vllama.config import (
    AdapterRef,
    KeepAlive,
    ModelConfig,
    Settings,
    load_models_file,
    parse_duration,
    parse_models,
    update_model_entry,
)
from vllama.errors import ConfigError

# --- parse_duration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (0, 0.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h30m15s", 5415.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        ("2d", 172800.0),
        (" 5M ", 300.0),
        (-1, None),
        ("-1", None),
        ("never", None),
        ("forever", None),
        (None, None),
    ],
)
def test_parse_duration(value: Any, seconds: float | None) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", " ", "abc", "5x", "m", "1h30", "5m30", "h1", "1 h", "--5m", True, False])
def test_parse_duration_refuses_garbage(value: Any) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(value)


def test_keep_alive_scalar_means_stop_after() -> None:
    ka = KeepAlive.parse("30m")
    assert (ka.sleep_l1, ka.sleep_l2, ka.stop) == (None, None, 1800.0)
    assert KeepAlive.parse(-1).stop is None
    ladder = KeepAlive.parse({"sleep_l1": "1m", "sleep_l2": None, "stop": "1h"})
    assert (ladder.sleep_l1, ladder.sleep_l2, ladder.stop) == (60.0, None, 3600.0)


# --- models.yaml validation -------------------------------------------------------------------------------------


def config_error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_models(data)
    return str(info.value)


def test_valid_entry_parses() -> None:
    models = parse_models(
        {
            "Qwen/Qwen3-0.6B": {
                "gpu_memory_utilization": 0.85,
                "max_model_len": 32768,
                "devices": [0],
                "tensor_parallel_size": 1,
                "keep_alive": "10m",
                "startup_timeout": "5m",
                "extra_args": ["--enforce-eager", "--dtype=bfloat16"],
                "env": {"X": "1"},
            },
            "big": {"devices": "0,1", "gpu_memory_gib": 20},
            "empty": None,
        }
    )
    cfg = models.models["Qwen/Qwen3-0.6B"]
    assert cfg.gpu_memory_utilization == 0.85
    assert cfg.keep_alive is not None and cfg.keep_alive.stop == 600.0
    assert cfg.startup_timeout == 300.0
    assert models.models["big"].devices == [0, 1]
    assert models.models["big"].tp == 2
    assert models.models["empty"] == ModelConfig()
    assert parse_models(None).models == {}


def test_unknown_key_names_model_key_and_known_keys() -> None:
    msg = config_error({"Qwen/Qwen3-0.6B": {"gpu_memory_utilisation": 0.5}})
    assert "Qwen/Qwen3-0.6B" in msg
    assert "gpu_memory_utilisation" in msg
    # the known keys are listed, so the typo is easy to fix
    for key in ("gpu_memory_utilization", "max_model_len", "devices", "tensor_parallel_size", "extra_args"):
        assert key in msg


def test_unknown_key_suggests_the_close_match() -> None:
    msg = config_error({"A": {"gpu_memory_utilisation": 0.5}})
    assert "did you mean 'gpu_memory_utilization'" in msg


@pytest.mark.parametrize(
    ("entry", "key", "value"),
    [
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization", "1.5"),
        ({"gpu_memory_utilization": 0}, "gpu_memory_utilization", "0"),
        ({"gpu_memory_utilization": "lots"}, "gpu_memory_utilization", "lots"),
        ({"gpu_memory_gib": -2}, "gpu_memory_gib", "-2"),
        ({"devices": "a"}, "devices", "a"),
        ({"devices": ["a"]}, "devices", "a"),
        ({"devices": [0, 0]}, "devices", "[0, 0]"),
        ({"devices": [-1]}, "devices", "-1"),
        ({"devices": []}, "devices", "[]"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size", "0"),
        ({"max_model_len": 0}, "max_model_len", "0"),
        ({"sleep_level": 4}, "sleep_level", "4"),
        ({"keep_alive": "soon"}, "keep_alive", "soon"),
        ({"startup_timeout": "later"}, "startup_timeout", "later"),
        ({"pinned": "maybe"}, "pinned", "maybe"),
        ({"env": ["X=1"]}, "env", "X=1"),
    ],
)
def test_bad_value_names_model_key_and_value(entry: dict[str, Any], key: str, value: str) -> None:
    msg = config_error({"my-model": entry})
    assert "my-model" in msg
    assert key in msg
    assert value in msg


def test_tensor_parallel_and_devices_mismatch() -> None:
    msg = config_error({"m": {"tensor_parallel_size": 2, "devices": [0]}})
    assert "'m'" in msg
    assert "tensor_parallel_size" in msg and "2" in msg
    assert "devices" in msg and "[0]" in msg
    # the same numbers agree
    assert parse_models({"m": {"tensor_parallel_size": 2, "devices": [0, 1]}}).models["m"].tp == 2


def test_utilization_and_gib_are_exclusive() -> None:
    msg = config_error({"m": {"gpu_memory_utilization": 0.5, "gpu_memory_gib": 4}})
    assert "'m'" in msg
    assert "gpu_memory_utilization" in msg and "gpu_memory_gib" in msg


def test_entry_not_a_mapping() -> None:
    msg = config_error({"m": "fast please"})
    assert "'m'" in msg and "fast please" in msg


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--host", "0.0.0.0"], "--host"),
        (["--host=0.0.0.0"], "--host"),
        (["--port", "8000"], "--port"),
        (["--enforce-eager", "--port=8000"], "--port"),
        (["--served-model-name", "x"], "--served-model-name"),
        (["--model", "other"], "--model"),
    ],
)
def test_extra_args_cannot_take_vllamas_flags(args: list[str], flag: str) -> None:
    msg = config_error({"m": {"extra_args": args}})
    assert "'m'" in msg and "extra_args" in msg and flag in msg
    assert parse_models({"m": {"extra_args": ["--enforce-eager", "--hostname-ok"]}}).models["m"].extra_args


def test_aliases_resolve() -> None:
    models = parse_models({"Qwen/Qwen3-0.6B": {"aliases": ["qwen", "small"]}, "other": {}})
    assert models.canonical("qwen") == "Qwen/Qwen3-0.6B"
    assert models.canonical("small") == "Qwen/Qwen3-0.6B"
    assert models.canonical("other") == "other"
    assert models.canonical("unknown") == "unknown"
    assert models.get("small") is models.models["Qwen/Qwen3-0.6B"]
    assert models.get("unknown") is None


def test_duplicate_alias_refused() -> None:
    msg = config_error({"a": {"aliases": ["x"]}, "b": {"aliases": ["x"]}})
    assert "'x'" in msg
    msg = config_error({"a": {"aliases": ["b"]}, "b": {}})
    assert "'b'" in msg and "'a'" in msg


@pytest.mark.parametrize("data", [["a", "b"], "just a string", 42])
def test_top_level_must_be_a_mapping(data: Any) -> None:
    msg = config_error(data)
    assert "mapping" in msg
    assert type(data).__name__ in msg


def test_model_name_must_be_a_string() -> None:
    msg = config_error({42: {}})
    assert "42" in msg


def test_load_models_file(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    assert load_models_file(path).models == {}  # a missing file is an empty configuration
    path.write_text("")
    assert load_models_file(path).models == {}
    path.write_text("A:\n  gpu_memory_gib: 4\n")
    assert load_models_file(path).models["A"].gpu_memory_gib == 4


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("A:\n  devices: [0, 1\n  max_model_len: 5\n")
    with pytest.raises(ConfigError) as info:
        load_models_file(path)
    assert str(path) in str(info.value)
    assert "YAML" in str(info.value)


def test_bad_file_message_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("A:\n  max_model_len: many\n")
    with pytest.raises(ConfigError) as info:
        load_models_file(path)
    msg = str(info.value)
    assert str(path) in msg and "'A'" in msg and "max_model_len" in msg and "many" in msg


# --- update_model_entry -------------------------------------------------------------------------------------


def test_update_model_entry_merges_and_drops_none(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        yaml.safe_dump({"A": {"gpu_memory_utilization": 0.5, "max_model_len": 4096, "env": {"X": "1"}}, "B": {}})
    )
    cfg = update_model_entry(path, "A", {"devices": [1], "gpu_memory_utilization": None, "gpu_memory_gib": 3})
    assert cfg.devices == [1] and cfg.gpu_memory_gib == 3 and cfg.gpu_memory_utilization is None
    data = yaml.safe_load(path.read_text())
    assert data["A"] == {"max_model_len": 4096, "env": {"X": "1"}, "devices": [1], "gpu_memory_gib": 3}
    assert data["B"] == {}
    assert not (tmp_path / "models.yaml.tmp").exists()


def test_update_model_entry_creates_file_and_entry(tmp_path: Path) -> None:
    path = tmp_path / "home" / "models.yaml"
    cfg = update_model_entry(path, "Qwen/Qwen3-0.6B", {"gpu_memory_utilization": 0.85, "devices": [0]})
    assert cfg.gpu_memory_utilization == 0.85
    assert yaml.safe_load(path.read_text()) == {"Qwen/Qwen3-0.6B": {"gpu_memory_utilization": 0.85, "devices": [0]}}


@pytest.mark.parametrize(
    "changes",
    [
        {"gpu_memory_utilization": 1.5},
        {"gpu_memory_gib": 4},  # together with the file's gpu_memory_utilization
        {"devices": [0, 1], "tensor_parallel_size": 3},
        {"no_such_key": 1},
    ],
)
def test_update_model_entry_refuses_invalid_and_leaves_file(tmp_path: Path, changes: dict[str, Any]) -> None:
    path = tmp_path / "models.yaml"
    original = "# my comment\nA:\n  gpu_memory_utilization: 0.5\nB: {}\n"
    path.write_text(original)
    with pytest.raises(ConfigError) as info:
        update_model_entry(path, "A", changes)
    assert "'A'" in str(info.value)
    assert path.read_text() == original
    assert not (tmp_path / "models.yaml.tmp").exists()


def test_update_model_entry_on_broken_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    for original in ("A: [unclosed\n", "- a\n- b\n", "A: fast\n"):
        path.write_text(original)
        with pytest.raises(ConfigError) as info:
            update_model_entry(path, "A", {"devices": [0]})
        assert str(path) in str(info.value)
        assert path.read_text() == original


# --- Settings.from_env ------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for key in list(os.environ):
        if key.startswith("VLLAMA_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_settings_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("HOME", str(tmp_path))
    s = Settings.from_env()
    assert s.host == "0.0.0.0" and s.port == 33258
    assert s.home == tmp_path / ".vllama"
    assert s.models_path == tmp_path / ".vllama" / "models.yaml"
    assert s.logs_dir == tmp_path / ".vllama" / "logs"
    assert s.keep_alive == KeepAlive()


def test_settings_from_env(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("VLLAMA_HOME", str(tmp_path / "h"))
    clean_env.setenv("VLLAMA_HOST", "127.0.0.1")
    clean_env.setenv("VLLAMA_PORT", "40000")
    clean_env.setenv("VLLAMA_PORT_RANGE", "41000-41010")
    clean_env.setenv("VLLAMA_GPU_PROBE", "fake")
    clean_env.setenv("VLLAMA_FAKE_GPU_TOTAL_GIB", "8,16")
    clean_env.setenv("VLLAMA_FAKE_GPU_LEDGER", str(tmp_path / "ledger"))
    clean_env.setenv("VLLAMA_VLLM_COMMAND", "python -m fake.engine")
    clean_env.setenv("VLLAMA_STOP_TIMEOUT", "3")
    clean_env.setenv("VLLAMA_MAX_BODY_BYTES", "1000")
    clean_env.setenv("VLLAMA_KEEP_ALIVE", '{"sleep_l1": "1m", "sleep_l2": null, "stop": "2h"}')
    s = Settings.from_env()
    assert s.home == tmp_path / "h"
    assert s.host == "127.0.0.1" and s.port == 40000
    assert s.port_range == (41000, 41010)
    assert s.gpu_probe == "fake"
    assert s.fake_gpu_total_gib == [8.0, 16.0]
    assert s.fake_gpu_ledger == tmp_path / "ledger"
    assert s.vllm_command == ["python", "-m", "fake.engine"]
    assert s.stop_timeout == 3.0
    assert s.max_body_bytes == 1000
    assert s.keep_alive == KeepAlive(sleep_l1=60.0, sleep_l2=None, stop=7200.0)


@pytest.mark.parametrize(("raw", "stop"), [("30m", 1800.0), ("-1", None), ("never", None), ("90", 90.0)])
def test_settings_keep_alive_scalar(clean_env: pytest.MonkeyPatch, raw: str, stop: float | None) -> None:
    clean_env.setenv("VLLAMA_KEEP_ALIVE", raw)
    s = Settings.from_env()
    assert s.keep_alive == KeepAlive(sleep_l1=None, sleep_l2=None, stop=stop)


def test_settings_overrides_win_unless_none(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("VLLAMA_PORT", "40000")
    assert Settings.from_env(port=41000, host=None).port == 41000
    assert Settings.from_env(port=None).port == 40000


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("VLLAMA_PORT", "http"),
        ("VLLAMA_PORT_RANGE", "33300"),
        ("VLLAMA_PORT_RANGE", "a-b"),
        ("VLLAMA_PORT_RANGE", "34000-33000"),
        ("VLLAMA_STOP_TIMEOUT", "soon"),
        ("VLLAMA_FAKE_GPU_TOTAL_GIB", "8,x"),
        ("VLLAMA_KEEP_ALIVE", "later"),
        ("VLLAMA_KEEP_ALIVE", '{"stop": "1h", "typo": 1}'),
    ],
)
def test_settings_bad_env_is_a_config_error_naming_the_variable(
    clean_env: pytest.MonkeyPatch, var: str, value: str
) -> None:
    clean_env.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        Settings.from_env()
    assert var in str(info.value)
    assert value in str(info.value)


@pytest.mark.parametrize(
    ("var", "value", "allowed"),
    [
        ("VLLAMA_KEEP_ALIVE_INTERVAL", "0", ">= 0.1 and <= 86400"),  # a busy loop
        ("VLLAMA_CAPACITY_WAIT", "nan", ">= 0 and <= 31536000"),
        ("VLLAMA_CAPACITY_WAIT", "inf", ">= 0 and <= 31536000"),
        ("VLLAMA_STARTUP_TIMEOUT", "-5", "> 0 and <= 31536000"),
        ("VLLAMA_STARTUP_TIMEOUT", "0", "> 0 and <= 31536000"),
        ("VLLAMA_DRAIN_TIMEOUT", "-1", ">= 0"),
        ("VLLAMA_STOP_TIMEOUT", "1e400", ">= 0"),
        ("VLLAMA_MEMORY_SETTLE_TIMEOUT", "-0.5", ">= 0"),
        ("VLLAMA_SHUTDOWN_GRACE", "nan", ">= 0"),
        ("VLLAMA_MAX_BODY_BYTES", "-1", "whole number of bytes >= 1 and"),
        ("VLLAMA_MAX_BODY_BYTES", "1.5", "whole number of bytes >= 1 and"),
        ("VLLAMA_PORT", "99999", ">= 1 and <= 65535"),
        ("VLLAMA_PORT", "0", ">= 1 and <= 65535"),
        ("VLLAMA_SLEEP_RESIDUAL_GIB", "-3", "GiB >= 0 and <= 1024"),
        ("VLLAMA_CPU_MEMORY_GIB", "0", "GiB > 0"),
        ("VLLAMA_CPU_DEFAULT_MODEL_GIB", "nan", "GiB > 0"),
        ("VLLAMA_FAKE_GPU_TOTAL_GIB", "8,-1", "GiB > 0"),
        ("VLLAMA_POOL_SIZE", "-1", ">= 0 and <= 64"),
        ("VLLAMA_AUTO_MEMORY_SEQUENCES", "0", ">= 1"),
        ("VLLAMA_GPU_PROBE", "cuda", "auto, nvml, cpu, fake"),
    ],
)
def test_settings_out_of_range_are_refused_with_the_range(
    clean_env: pytest.MonkeyPatch, var: str, value: str, allowed: str
) -> None:
    clean_env.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        Settings.from_env()
    message = str(info.value)
    assert var in message and repr(value) in message and allowed in message, message


@pytest.mark.parametrize(
    ("var", "value", "attribute", "expected"),
    [
        ("VLLAMA_KEEP_ALIVE_INTERVAL", "0.1", "keep_alive_interval", 0.1),
        ("VLLAMA_DRAIN_TIMEOUT", "0", "drain_timeout", 0.0),
        ("VLLAMA_SLEEP_RESIDUAL_GIB", "0", "sleep_residual_gib", 0.0),
        ("VLLAMA_PORT", "65535", "port", 65535),
        ("VLLAMA_POOL_SIZE", "0", "pool_size", 0),
        ("VLLAMA_GPU_PROBE", "CPU", "gpu_probe", "cpu"),
    ],
)
def test_settings_at_the_edges_of_their_range_are_accepted(
    clean_env: pytest.MonkeyPatch, var: str, value: str, attribute: str, expected: Any
) -> None:
    clean_env.setenv(var, value)
    assert getattr(Settings.from_env(), attribute) == expected


@pytest.mark.parametrize(
    ("overrides", "expected"), [({"port": 99999}, "--port"), ({"log_level": "loud"}, "--log-level")]
)
def test_settings_command_line_values_are_checked(
    clean_env: pytest.MonkeyPatch, overrides: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        Settings.from_env(**overrides)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"-dash": {}}, "'-dash'"),
        ({"A": {"aliases": ["-a"]}}, "'-a'"),
        ({"A": {"aliases": ["--port"]}}, "'--port'"),
        ({"A": {"aliases": [""]}}, "aliases"),
        ({"A": {"model": "--help"}}, "--help"),
    ],
)
def test_names_that_vllm_would_read_as_flags_are_refused(data: dict[str, Any], expected: str) -> None:
    # the name and aliases become `--served-model-name NAME ALIAS...` and `model` becomes `--model M`
    msg = config_error(data)
    assert expected in msg and "flag" in msg


# --- LoRA adapters ---------------------------------------------------------------------------------------------


def _adapter(folder: Path, rank: int = 8) -> str:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(f'{{"r": {rank}, "peft_type": "LORA"}}')
    return str(folder)


def test_adapters_resolve_to_their_base(tmp_path: Path) -> None:
    a = _adapter(tmp_path / "a")
    _adapter(tmp_path / "dir" / "b")
    _adapter(tmp_path / "dir" / "c")
    (tmp_path / "dir" / "not-an-adapter").mkdir()
    models = parse_models(
        {
            "base": {"adapters": {"sql": a}, "adapter_dirs": [str(tmp_path / "dir")], "max_loras": 2},
            "other": {},
        }
    )
    assert models.adapter("sql") == AdapterRef("sql", "base", Path(a))
    assert models.adapter("b") == AdapterRef("b", "base", tmp_path / "dir" / "b")
    assert models.adapter("base") is None and models.adapter(None) is None
    assert [r.name for r in models.adapters_of("base")] == ["b", "c", "sql"]
    assert models.adapters_of("other") == []
    assert models.models["base"].adapters == {
        "b": str(tmp_path / "dir" / "b"),
        "c": str(tmp_path / "dir" / "c"),
        "sql": a,
    }


def test_adapter_path_is_not_checked_at_load_but_must_be_absolute() -> None:
    models = parse_models({"base": {"adapters": {"x": "/nonexistent/adapter"}}})
    assert models.adapter("x") is not None  # a wrong path fails that adapter's requests only (vllama/lora.py)
    with pytest.raises(ConfigError, match=r"model 'base'.*'adapters'.*'relative/x' is not an absolute path"):
        parse_models({"base": {"adapters": {"x": "relative/x"}}})


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"base": {"adapters": {"base": "/a"}}}, "adapter 'base' of model 'base' is already a model or alias"),
        ({"base": {"aliases": ["al"], "adapters": {"al": "/a"}}}, "adapter 'al' of model 'base' is already a model"),
        (
            {"b1": {"adapters": {"x": "/a"}}, "b2": {"adapters": {"x": "/b"}}},
            "adapter 'x' of model 'b2' is already an adapter of model 'b1'",
        ),
        ({"base": {"adapters": {"-x": "/a"}}}, "model 'base': key 'adapters'.*must be non-empty"),
        ({"base": {"adapters": {"x": "/a"}, "max_lora_rank": 12}}, "'max_lora_rank' has bad value 12.*1, 8, 16"),
        ({"base": {"adapters": {"x": "/a"}, "max_loras": 0}}, "'max_loras' has bad value 0"),
        ({"base": {"max_loras": 2}}, "max_loras/max_lora_rank without adapters"),
        (
            {"base": {"adapter_dirs": ["/nonexistent/dir"]}},
            "model 'base': key 'adapter_dirs' has bad value '/nonexistent",
        ),
    ],
)
def test_bad_adapter_settings_name_model_key_and_value(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_models(data)


def test_same_adapter_name_in_two_adapter_dirs(tmp_path: Path) -> None:
    _adapter(tmp_path / "d1" / "x")
    _adapter(tmp_path / "d2" / "x")
    with pytest.raises(ConfigError, match="adapter 'x' is in two adapter_dirs"):
        parse_models({"base": {"adapter_dirs": [str(tmp_path / "d1"), str(tmp_path / "d2")]}})


def test_a_model_name_with_a_control_character_or_line_break_is_refused() -> None:
    # '\x85' (NEL) came back from yaml.safe_dump/safe_load as a space: `vllama assign` would rename the model
    for name in ("a\x85", "a\nb", "a\x00", "a\u2028"):
        with pytest.raises(ConfigError, match="control character or line break"):
            parse_models({name: {}})
