"""Who may ask, how much, and the record of what they asked.

access.py      Access: the caller from an API key or a sign-in proxy's headers, its role,
               its rate (rate_limit.py); IdentifyBeforeBody refuses an unknown caller before
               its body is read
peers.py       the TCP peer kept before proxy headers replace it; which proxies are believed
startup.py     the access settings `convirt serve` refuses or warns about
keys.py        the API key table (SQLite, hashed keys); keys_cli.py: `convirt keys`
audit/         the keyed, hash-chained audit log (docs/audit.md); audit_cli.py: `convirt audit`
limits.py      request body size and read time (ASGI), request head size and time (uvicorn)
"""
