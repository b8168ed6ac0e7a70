"""Every setting of the service, in one class, read from CONVIRT_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "CONVIRT_"
MiB = 1024 * 1024


class Settings(BaseSettings):
    """`convirt serve` settings: CONVIRT_<NAME> in the environment, or --name on the command line."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    model: Path | None = Field(
        None, description="model bundle directory (`convirt train` writes RUN/bundle); required"
    )
    index_root: Path | None = Field(
        None, description="index root written by `convirt index build --out ROOT`; required"
    )
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: all interfaces)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    api_key: SecretStr | None = Field(
        None,
        description="key for POST /v1/admin/reload, sent as the X-API-Key header; "
        "unset: the admin API refuses every request",
    )
    device: str = Field("cpu", description="torch device for the model (cpu, cuda, cuda:1)")
    max_upload_bytes: int = Field(
        20 * MiB, gt=0, description="largest image upload in bytes (413 above it)"
    )
    max_json_bytes: int = Field(
        1 * MiB, gt=0, description="largest body of any other request in bytes (413 above it)"
    )
    max_text_chars: int = Field(
        20_000,
        gt=0,
        description="longest query text in characters (422 above it); texts past the "
        "encoder's token limit but under this are truncated, and the response says so",
    )
    batch_window_ms: float = Field(
        5.0,
        ge=0,
        description="how long a micro-batch waits for more queries when the service is busy",
    )
    max_batch: int = Field(32, ge=1, description="most text queries one encoder call embeds")
    max_image_batch: int = Field(
        4,
        ge=1,
        description="most image queries one encoder call embeds (on CPU a CNN gains nothing "
        "past a few images per call, and larger batches cost memory; raise it on a GPU)",
    )
    reload_poll_seconds: float = Field(
        0.0,
        ge=0,
        description="check the index root for a newer version every N seconds and switch to "
        "it (0: only on POST /v1/admin/reload)",
    )
    torch_threads: int = Field(
        0, ge=0, description="torch intra-op threads for the model (0: torch's default)"
    )
    log_level: str = Field("info", description="uvicorn log level (debug, info, warning, error)")
    access_log: bool = Field(False, description="log every request (uvicorn's access log)")


def env_name(field: str) -> str:
    """The environment variable of a setting: model -> CONVIRT_MODEL."""
    return f"{ENV_PREFIX}{field.upper()}"
