"""What `convirt serve` checks of its access settings before it starts: the settings it refuses
(open off loopback, proxy mode without the proxy's address, an unreadable key database or audit
log) and the ones it warns about."""

from __future__ import annotations

from service.settings import Settings

from .access import effective_mode
from .keys import KeyRegistry, KeyRegistryError
from .peers import AddressList, is_loopback


def startup_problem(settings: Settings) -> str | None:
    """Why `convirt serve` must not start with these settings, or None."""
    mode = effective_mode(settings)
    if mode == "open" and not is_loopback(settings.host) and not settings.insecure_no_auth:
        return (
            f"refusing to serve on {settings.host} without authentication: anyone who reaches "
            "the port could read every image and report. Create API keys (set CONVIRT_AUTH_DB="
            "/path/keys.sqlite, then `convirt keys add --name NAME --role reader`), or put an "
            "authenticating proxy in front (CONVIRT_AUTH=proxy, CONVIRT_FORWARDED_ALLOW_IPS=its "
            "address), or bind to 127.0.0.1; --insecure-no-auth serves it open anyway"
        )
    if mode == "proxy" and AddressList(settings.forwarded_allow_ips).empty:
        return (
            "CONVIRT_AUTH=proxy needs the proxy's address: set CONVIRT_FORWARDED_ALLOW_IPS to it "
            "(e.g. 127.0.0.1 for a proxy on this machine); the user header is believed from there only"
        )
    if mode == "keys" and settings.auth_db is None and settings.api_key is None:
        return "CONVIRT_AUTH=keys needs keys: set CONVIRT_AUTH_DB (`convirt keys add`) or CONVIRT_API_KEY"
    if settings.auth_db is not None:
        try:
            KeyRegistry(settings.auth_db)
        except (KeyRegistryError, OSError) as err:
            return str(err)
    if settings.audit_log is not None:
        from .audit import AuditError, AuditLog

        try:
            AuditLog.from_settings(settings)
        except (AuditError, OSError) as err:
            return f"the audit log {settings.audit_log} cannot be written: {err}"
    return None


def startup_warnings(settings: Settings) -> list[str]:
    """What `convirt serve` should say about its access settings as it starts."""
    mode = effective_mode(settings)
    warnings = []
    if mode == "open" and not is_loopback(settings.host):
        warnings.append(f"serving {settings.host} WITHOUT authentication (--insecure-no-auth)")
    if mode == "proxy" and AddressList(settings.forwarded_allow_ips).any:
        warnings.append(
            "CONVIRT_AUTH=proxy with CONVIRT_FORWARDED_ALLOW_IPS=*: any client can name itself "
            f"in {settings.proxy_user_header}; only safe when nothing but the proxy reaches the port"
        )
    if mode != "open" and settings.audit_log is None:
        warnings.append(
            "no audit log: set CONVIRT_AUDIT_LOG to record who searched and viewed what"
        )
    return warnings
