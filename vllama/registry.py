"""Names: models.yaml (re-read when it changes), what a requested model name resolves to, and the one
instance (owner) per canonical name."""

from __future__ import annotations

import logging
from collections.abc import Callable

from vllama.config import ModelConfig, ModelsFile, Settings, load_models_file
from vllama.errors import ConfigError, ModelNotFound
from vllama.instance import Instance
from vllama.model_access import unconfigured_source
from vllama.sizing import hf_cache_dir

log = logging.getLogger("vllama")


def cached_hf_models() -> list[str]:
    """Hugging Face ids present in the local hub cache (`models--org--name`)."""
    root = hf_cache_dir()
    if not root.is_dir():
        return []
    return sorted(p.name[len("models--") :].replace("--", "/") for p in root.glob("models--*") if p.is_dir())


class Registry:
    def __init__(self, settings: Settings, new_instance: Callable[[str, ModelConfig], Instance]) -> None:
        self.settings = settings
        self.models_path = settings.models_path
        self.instances: dict[str, Instance] = {}
        self.config_error: str | None = None
        self._new_instance = new_instance
        self._models = ModelsFile()
        self._models_mtime: float | None = None

    def load_config(self, *, strict: bool = False) -> None:
        """(Re)load models.yaml when it changed. At start-up a bad file is fatal; later, the last good
        configuration stays and the error is reported in `info`."""
        path = self.models_path
        try:
            mtime = path.stat().st_mtime if path.exists() else None
        except OSError:
            mtime = None
        if mtime == self._models_mtime and not strict:
            return
        try:
            models = load_models_file(path)
        except ConfigError as exc:
            if strict:
                raise
            self.config_error = str(exc)
            self._models_mtime = mtime
            log.error("keeping the last good configuration: %s", exc)
            return
        self._models, self._models_mtime, self.config_error = models, mtime, None
        for name, inst in self.instances.items():
            inst.cfg = models.get(name) or ModelConfig()

    @property
    def models(self) -> ModelsFile:
        self.load_config()
        return self._models

    def resolve(self, name: object) -> tuple[str, ModelConfig]:
        """The canonical name and config for a requested model name, or ModelNotFound."""
        if not isinstance(name, str) or not name.strip():
            raise ModelNotFound('request has no model name: set "model" to one of GET /v1/models', param="model")
        models = self.models
        canonical = models.canonical(name)
        cfg = models.get(canonical)
        if cfg is not None:
            return canonical, cfg
        if canonical in self.instances:
            return canonical, self.instances[canonical].cfg
        # whether an unconfigured name may start (VLLAMA_ALLOW_MODELS) is vllama/model_access.py's call
        known = ", ".join(sorted(models.models)) or f"none ({self.models_path} configures none)"
        keyed = bool(self.settings.api_key or self.settings.admin_api_key)
        source = unconfigured_source(name, self.settings.allow_models, has_api_key=keyed, configured=known)
        return name, ModelConfig() if source == name else ModelConfig(model=source)

    def instance(self, name: object) -> Instance:
        """The owner of a requested model, created on first use."""
        canonical, cfg = self.resolve(name)
        inst = self.instances.get(canonical)
        if inst is None:
            inst = self._new_instance(canonical, cfg)
            self.instances[canonical] = inst
        return inst
