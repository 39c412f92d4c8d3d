"""Settings, from the environment (prefix MEMSVC_) or a .env file; defaults run embedded."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEMSVC_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("memsvc-data"), description="memories, snapshots, logs, SQLite catalog")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir")
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = Field(64 << 20, description="largest request body (413 beyond)")
    max_batch: int = Field(65536, description="most vectors in one add or search")
    max_k: int = Field(1024, description="largest k of a search")
    max_dim: int = Field(8192, description="largest key/value dimension of a memory")
    snapshot_bytes: int = Field(256 << 20, description="snapshot a memory once its log passes this")
    api_keys: str | None = Field(None, description="comma-separated bearer keys; unset = no auth")

    @property
    def catalog_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'catalog.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
