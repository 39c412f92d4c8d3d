"""Settings, from the environment (prefix MEMSVC_) or a .env file; defaults run embedded."""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from memsvc.contract import InvalidInput, check_device

DEFAULT_DATA_DIR = Path("memsvc-data")
ENV_PREFIX = "MEMSVC_"
# One entry of MEMSVC_API_KEYS: KEY, KEY=PREFIX, KEY:ro or KEY=PREFIX:ro (keys are URL-safe tokens).
API_KEY_ENTRY = re.compile(r"(?P<key>[A-Za-z0-9._~+/-]+)(?:=(?P<prefix>[A-Za-z0-9._-]+))?(?P<ro>:ro)?")


class ApiKey(BaseModel):
    """A bearer key, the name prefix its holder is confined to ("" = every name), and whether it may write."""

    model_config = ConfigDict(frozen=True)

    secret: SecretStr
    prefix: str = ""
    read_only: bool = False

    def allows(self, name: str) -> bool:
        return name.startswith(self.prefix)


def parse_api_keys(text: str) -> list[ApiKey]:
    """MEMSVC_API_KEYS: comma-separated `KEY[=PREFIX][:ro]` entries; empty means no auth. Errors name the
    entry by position, never by its text (which holds a key)."""
    keys = []
    for number, entry in enumerate((e.strip() for e in text.split(",") if e.strip()), start=1):
        match = API_KEY_ENTRY.fullmatch(entry)
        if match is None:
            raise ValueError(f"entry {number} is not KEY, KEY=PREFIX, KEY:ro or KEY=PREFIX:ro "
                             "(keys: letters, digits and ._~+/-; prefixes: letters, digits and ._-)")
        keys.append(ApiKey(secret=match["key"], prefix=match["prefix"] or "", read_only=bool(match["ro"])))
    secrets = [k.secret.get_secret_value() for k in keys]
    if len(set(secrets)) < len(secrets):
        raise ValueError("the same key appears twice")
    return keys


class Settings(BaseSettings):
    # hide_input_in_errors: a bad MEMSVC_API_KEYS must not print its keys in the startup error
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore",
                                      hide_input_in_errors=True)

    data_dir: Path = Field(DEFAULT_DATA_DIR, description="memories, snapshots, logs, SQLite catalog")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="TCP port of `memsvc serve` (0: any free port)")
    max_body_bytes: int = Field(64 << 20, gt=0, description="largest request body (413 beyond)")
    max_batch: int = Field(65536, gt=0, description="most vectors in one add or search")
    max_k: int = Field(1024, gt=0, description="largest k of a search")
    max_dim: int = Field(8192, gt=0, description="largest key/value dimension of a memory")
    snapshot_bytes: int = Field(256 << 20, gt=0, description="snapshot a memory once its log passes this")
    vector_backend: Literal["faiss", "milvus"] = Field("faiss", description="where memories' vectors live")
    milvus_uri: str | None = Field(None, description="Milvus server URI or milvus-lite file; default data_dir")
    milvus_timeout: float = Field(60.0, gt=0, description="seconds before a Milvus call fails with 503")
    api_keys: Annotated[list[ApiKey], NoDecode] = Field(
        default_factory=list, description="comma-separated KEY[=PREFIX][:ro] bearer keys; empty = no auth")
    log_level: str = Field("INFO", description="level of the server's JSON log lines")
    access_log: bool = Field(True, description="one memsvc.access log line per request (false: none; "
                                               "0.15-0.3 ms of server CPU per request, 7-12% of a batch-1 search)")
    model: str = Field("smollm2", description="language model of collections' ask: 'smollm2', a local HF "
                                              "model directory or a .gguf file")
    preload_model: bool = Field(True, description="load the model of ask and the embedder of new collections "
                                                  "at start, in the background (ask answers 503 model_loading + "
                                                  "Retry-After until its model is ready; collection requests wait "
                                                  "for the embedder); false: load each on first use")
    device: str | None = Field(None, description="torch device of the language model of ask: cpu, cuda or "
                                                 "cuda:N; default cuda when torch sees a GPU, else cpu")
    model_cache: Path | None = Field(
        None, description="converted copies of GGUF models and the exported embedders; default "
        "$XDG_CACHE_HOME/memsvc/models or ~/.cache/memsvc/models")
    embed_backend: Literal["auto", "torch", "openvino", "openvino-int8"] = Field(
        "auto", description="how new collections run their embedder (all-MiniLM-L6-v2): torch; openvino "
        "(bf16 where the CPU has it, else fp32); openvino-int8 (NNCF static int8, built once into model_cache); "
        "auto: torch on a CUDA GPU, else openvino where the CPU has AMX (amx_bf16), else openvino-int8 "
        "(the fastest on CPU with retrieval quality held); torch when the openvino extra is not installed. A "
        "collection keeps the embedder it was created with")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str | None) -> str | None:
        """A name no device has is a bad setting at start (it was found by the first ask, as a 4xx to the client)."""
        try:
            return check_device(value)
        except InvalidInput as exc:
            raise ValueError(exc.message) from None

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: Any) -> Any:
        return parse_api_keys(value) if isinstance(value, str) else value

    @property
    def catalog_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'catalog.db').resolve()}"

    @property
    def model_cache_dir(self) -> Path:
        """`model_cache`, else `$XDG_CACHE_HOME/memsvc/models`, else `~/.cache/memsvc/models` (the XDG base
        directory convention). Safe to delete at any time: what is there is rebuilt on next use."""
        if self.model_cache is not None:
            return self.model_cache.expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memsvc" / "models"


def settings_error(exc: ValidationError) -> str:
    """One line naming each bad setting by its environment variable, for a `ValidationError` of `Settings`
    (a value given as a command-line option, e.g. `--port`, has the same name): "MEMSVC_MAX_K: Input should
    be greater than 0". The values themselves are not repeated (MEMSVC_API_KEYS holds secrets)."""
    return "; ".join(f"{ENV_PREFIX}{str(err['loc'][0]).upper() if err['loc'] else ''}: {err['msg']}"
                     for err in exc.errors())


@lru_cache
def get_settings() -> Settings:
    return Settings()
