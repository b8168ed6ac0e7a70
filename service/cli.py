"""`convirt serve`: open the model bundle and the current index version, then serve HTTP."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pydantic import ValidationError

from convirt.cli_options import add_device_option, add_model_option, command_parser

from .settings import Settings, env_name

log = logging.getLogger("service")

ENV_ONLY = {"api_key"}  # secrets stay out of `ps`: environment only

DESCRIPTION = """Serve text-to-image and image-to-image search over HTTP, with a web page at /.

Every setting is read from its CONVIRT_* environment variable; a flag overrides it. The model
bundle must be the one the index was built with (their fingerprints are compared at startup).
"""

EPILOG = """environment only:
  CONVIRT_API_KEY   an admin key (header X-API-Key): POST /v1/admin/reload, and every search
                    when keys are required; unset: admin API off unless CONVIRT_AUTH_DB has one

access (README "Hospital deployment"):
  keys:  CONVIRT_AUTH_DB=/var/lib/convirt/keys.sqlite, then `convirt keys add --name N --role reader`
  proxy: CONVIRT_AUTH=proxy behind oauth2-proxy at CONVIRT_FORWARDED_ALLOW_IPS
  open:  neither; refused off loopback unless --insecure-no-auth
  audit: CONVIRT_AUDIT_LOG=/var/lib/convirt/audit.jsonl, then `convirt audit`, `convirt audit verify`

endpoints:
  POST /v1/search/text            {"text", "k", "filters"} -> the k best images
  POST /v1/search/image           multipart file (PNG, JPEG, DICOM) + k -> similar cases
  GET  /v1/images/{id}[/thumbnail|/similar?k=]
  GET  /v1/whoami                 the authentication mode and the caller
  POST /v1/admin/reload           switch to the newest index version
  GET  /healthz /readyz /metrics /docs

example:
  CONVIRT_MODEL=runs/cpu/bundle CONVIRT_INDEX_ROOT=/data/index CONVIRT_API_KEY=secret \\
    convirt serve --host 0.0.0.0 --port 8000
"""


def build_parser() -> argparse.ArgumentParser:
    """A flag per setting, none defaulted: what is not given comes from the environment, else
    the setting's default (which the help names)."""
    parser = command_parser("convirt serve", DESCRIPTION, EPILOG)
    for name, field in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        help_text = f"{field.description} [{env_name(name)}; default: {field.default}]"
        flag = "--" + name.replace("_", "-")
        if name == "model":  # --model and --device: declared as every `convirt` command does
            add_model_option(parser, required=False, help=help_text)
        elif name == "device":
            add_device_option(parser, default=None, help=help_text)
        elif field.annotation is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            parser.add_argument(flag, dest=name, metavar=name.upper(), help=help_text)
    return parser


def read_settings(argv: list[str]) -> Settings:
    """Environment first, then flags on top; raises ValidationError for a bad value."""
    given: dict[str, Any] = {k: v for k, v in vars(build_parser().parse_args(argv)).items()}
    return Settings(**{k: v for k, v in given.items() if v is not None})


def describe_invalid(err: ValidationError) -> str:
    problems = [
        f"{env_name(str(e['loc'][0])) if e['loc'] else 'setting'}: {e['msg']}" for e in err.errors()
    ]
    return "invalid settings: " + "; ".join(problems)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = read_settings(argv)
    except ValidationError as err:
        print(f"convirt serve: {describe_invalid(err)}", file=sys.stderr)
        return 2
    from service.guard.startup import startup_problem, startup_warnings

    problem = startup_problem(settings)  # before the model loads: a refusal costs nothing
    if problem:
        print(f"convirt serve: {problem}", file=sys.stderr)
        return 2
    for warning in startup_warnings(settings):
        log.warning("%s", warning)
    return serve(settings)


def serve(settings: Settings) -> int:
    import uvicorn

    from service.api.app import create_app
    from service.guard.audit import AuditError
    from service.guard.limits import guarded_protocol
    from service.guard.peers import with_peer_and_proxy_headers
    from service.model.loading import StartupError, load_resources

    from .logs import log_config

    try:
        resources = load_resources(settings)
    except StartupError as err:
        print(f"convirt serve: {err}", file=sys.stderr)
        return 2
    try:
        app = create_app(settings, resources)
    except (AuditError, OSError) as err:
        print(f"convirt serve: the audit log cannot be written: {err}", file=sys.stderr)
        return 2
    log.info("listening on http://%s:%d", settings.host, settings.port)
    uvicorn.run(
        with_peer_and_proxy_headers(app, settings.forwarded_allow_ips),
        proxy_headers=False,  # done inside with_peer_and_proxy_headers, after the peer is kept
        log_config=log_config(),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        http=guarded_protocol(settings.header_timeout, settings.max_header_bytes),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_timeout,
        limit_concurrency=settings.max_concurrency,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )
    return 0
