"""Every setting of the service, in one class, read from CONVIRT_* environment variables."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
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
        description="an admin key, sent as the X-API-Key header: POST /v1/admin/reload, and "
        "every search where keys are required; unset: only CONVIRT_AUTH_DB's admin keys, or "
        "(open) no admin API",
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
    max_concurrent_decodes: int = Field(
        2,
        ge=1,
        description="most uploads decoded at once (each may take up to ~100 MB while it "
        "decodes); further uploads wait their turn",
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
    quantize: Literal["none", "int8"] = Field(
        "none",
        description="query text encoder: none (the bundle's fp32 model in torch) or int8 (its "
        "int8 ONNX Runtime copy from `convirt export --int8 MODEL`, quantised at startup when "
        "missing; CPU only: faster text queries, top-10 overlap with fp32 above 0.95)",
    )
    log_level: str = Field("info", description="uvicorn log level (debug, info, warning, error)")
    access_log: bool = Field(False, description="log every request (uvicorn's access log)")
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds a connection has to send a complete request head, from its opening "
        "or its previous response (then 408 and closed)",
    )
    body_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds a request has to send its whole body, from the end of its head "
        "(then 408 and closed)",
    )
    keep_alive_timeout: int = Field(
        5, ge=1, description="seconds an idle keep-alive connection is kept open"
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="largest request head (request line and headers) in bytes (431 above it)",
    )
    max_concurrency: int = Field(
        1000,
        ge=1,
        description="most open connections or requests in progress; past it new requests get "
        "a 503 at once",
    )
    allowed_hosts: str = Field(
        "auto",
        description="comma-separated Host header values served (*.example.com matches "
        "subdomains, auto: the bound address and localhost names, and on 0.0.0.0 or :: this "
        "machine's name and addresses); others get a 400 (*: any host, which lets a web page "
        "rebind its own name to this address and read the archive)",
    )
    forwarded_allow_ips: str = Field(
        "",
        description="comma-separated proxy addresses whose X-Forwarded-For/-Proto headers are "
        "trusted (empty: none, every client is its TCP peer; *: any, only when nothing but the "
        "proxy reaches the port)",
    )
    sensitive_fields: str = Field(
        "",
        description="comma-separated metadata fields /v1/facets never lists, besides patient "
        "and accession numbers and DICOM UIDs (they stay filterable by name)",
    )
    facets_show: str = Field(
        "",
        description="comma-separated metadata fields /v1/facets lists although its rule hides "
        "them (ids, paths, hashes, licences, split, free text, *_original, the archive's own "
        "spellings behind modality and body_part: index/read/facets.py offered); never the "
        "identifiers above",
    )
    facets_hide: str = Field(
        "", description="comma-separated metadata fields /v1/facets does not list, besides its rule"
    )
    # -- access control, audit trail, viewer links (service/guard/, service/search/viewer.py) ------
    auth: Literal["auto", "keys", "proxy"] = Field(
        "auto",
        description="who may search and view: keys (an X-API-Key of CONVIRT_AUTH_DB, or "
        "CONVIRT_API_KEY as an admin key), proxy (the user an authenticating reverse proxy at "
        "CONVIRT_FORWARDED_ALLOW_IPS names in a header; keys also work), auto (keys when "
        "CONVIRT_AUTH_DB is set, else open: no authentication, loopback only)",
    )
    auth_db: Path | None = Field(
        None, description="SQLite file of hashed API keys with roles (`convirt keys add`)"
    )
    insecure_no_auth: bool = Field(
        False,
        description="serve with no authentication on a non-loopback address (refused otherwise)",
    )
    proxy_user_header: str = Field(
        "X-Forwarded-User", description="proxy mode: the header naming the signed-in user"
    )
    proxy_groups_header: str = Field(
        "X-Forwarded-Groups", description="proxy mode: the header listing the user's groups"
    )
    proxy_admin_groups: str = Field(
        "convirt-admins", description="proxy mode: comma-separated groups given the admin role"
    )
    proxy_reader_groups: str = Field(
        "",
        description="proxy mode: comma-separated groups given the reader role (empty: every "
        "user the proxy signs in)",
    )
    rate_limit_per_minute: float = Field(
        1200, ge=0, description="requests a minute per key or proxy user (0: no limit)"
    )
    rate_limit_burst: int = Field(
        200, ge=1, description="requests a key or proxy user may make at once, past the rate"
    )
    # -- heat-maps, GET /v1/explain (service/model/explainer.py) -----------------------------------
    explain_worker: Literal["process", "thread"] = Field(
        "process",
        description="where heat-maps are computed, never on the model thread text and image "
        "queries use: process (a niced worker process with its own copy of the image tower, "
        "started at the first heat-map; the OS gives queries the CPU first) or thread (a thread "
        "of this process sharing the model, one torch thread; less memory)",
    )
    explain_concurrency: int = Field(
        1, ge=1, description="heat-maps computed at once (each takes a CPU core for ~0.5-1 s)"
    )
    explain_queue: int = Field(
        4,
        ge=0,
        description="heat-maps that may wait for the worker; past it 503 explain_busy with "
        "Retry-After",
    )
    explain_nice: int = Field(
        10, ge=0, le=19, description="niceness of the heat-map worker (process or thread)"
    )
    explain_rate_cost: float = Field(
        30.0,
        ge=1,
        description="requests of the caller's rate limit one computed heat-map costs (about "
        "the model time of that many text queries; a cached one costs 1)",
    )
    explain_cache_entries: int = Field(
        256, ge=0, description="heat-maps kept per (index version, image, query); 0: no cache"
    )
    audit_log: Path | None = Field(
        None,
        description="append-only, hash-chained audit log of searches and views (JSON lines; "
        "`convirt audit`); unset: none",
    )
    audit_queries: Literal["hash", "text"] = Field(
        "hash",
        description="how the audit log keeps query text: a salted hash (the salt beside the "
        "log) or the text",
    )
    audit_key_file: Path | None = Field(
        None,
        description="the HMAC key of the audit chain, made on first start if missing: keep it "
        "off the log's disk, readable by the service only; unset: LOG.key beside the log "
        "(weaker: whoever can write the log can usually read it; docs/audit.md)",
    )
    audit_anchor: Path | None = Field(
        None,
        description="a file on another disk or host that holds the audit log's last seq and "
        "hash, rewritten with each entry; `convirt audit verify` finds an emptied or cut log "
        "against it; unset: none",
    )
    audit_min_free_mb: float = Field(
        64,
        ge=0,
        description="free space (MB) the audit log's disk must keep: below it audited "
        "requests get 503 audit_unavailable before the disk fills (0: no reserve)",
    )
    audit_rotate_mb: float = Field(
        0,
        ge=0,
        description="start a new audit file past this size (MB), chained to the old one "
        "(LOG.<last seq>); 0: only `convirt audit rotate`",
    )
    audit_max_result_ids: int = Field(
        100,
        ge=1,
        description="result ids an audit line keeps of a large answer (past 16: packed, with "
        "the count and a SHA-256 of them all)",
    )
    viewer_url: str | None = Field(
        None,
        description="PACS viewer link of a result, with {study}, {series} and {instance} for "
        "its DICOM UIDs, e.g. http://pacs:8042/ohif/viewer?StudyInstanceUIDs={study}",
    )
    # -- images a PACS holds, fetched when viewed (service/search/pacs.py) -------------------------
    pacs_threads: int = Field(
        4, ge=1, description="threads fetching PACS images for viewing (their own pool)"
    )
    pacs_queue: int = Field(
        8,
        ge=0,
        description="PACS fetches that may wait for a thread; past it a view gets 503 pacs_busy",
    )
    pacs_deadline_s: float = Field(
        15.0, gt=0, description="seconds a PACS has to give an image; then 504 pacs_timeout"
    )
    pacs_retry_s: float = Field(
        5.0,
        ge=0,
        description="after a PACS fails (timeout, no connection, 5xx), seconds its images get "
        "503 pacs_unavailable at once instead of each waiting out the deadline",
    )
    # -- uploads kept for a region, a refinement, a heat-map, the viewer (service/search/kept.py) -
    upload_ttl_s: float = Field(
        3600.0,
        gt=0,
        description="seconds an upload is kept after its last use (its upload_id then answers "
        "404 unknown_upload)",
    )
    upload_keep: int = Field(
        200,
        ge=1,
        description="uploads kept at most, all users together (the least recently used go)",
    )
    upload_keep_bytes: int = Field(
        512 * MiB,
        ge=1,
        description="bytes of uploads kept at most, all users together (the least recently "
        "used go)",
    )
    fault_route: bool = Field(
        False,
        description="tests only, never in production: GET /_fault raises an unexpected error "
        "(a 500), to check how the service answers and logs one",
    )

    @field_validator("viewer_url")
    @classmethod
    def viewer_template(cls, template: str | None) -> str | None:
        if template is None or not template.strip():
            return None
        if not template.startswith(("http://", "https://")):
            raise ValueError("the viewer URL must start with http:// or https://")
        try:
            fields = {
                name for _, name, _, _ in string.Formatter().parse(template) if name is not None
            }
        except ValueError as err:
            raise ValueError(f"not a URL template: {err}") from None
        unknown = fields - VIEWER_FIELDS
        if unknown:
            raise ValueError(
                f"unknown placeholders {sorted(unknown)}: use {{study}}, {{series}}, {{instance}}"
            )
        return template


VIEWER_FIELDS = {"study", "series", "instance"}


def env_name(field: str) -> str:
    """The environment variable of a setting: model -> CONVIRT_MODEL."""
    return f"{ENV_PREFIX}{field.upper()}"
