"""What every HTTP surface shares: errors in OpenAI's JSON shape and JSON bodies (`errors`), keys and scopes
(`auth`), the edge of the LAN (`edge`: names, origins, connections), and places a request may go instead (`relay`).
The routes of `api/` and of each subsystem (`usb.routes`, `peers.http`, ...) are built on it."""

from aiohttp import web

from ..settings import Settings
from .auth import AUDIT, KEY, KEYS, LOOPBACK, authorize, bearer, charge, scope_needed
from .edge import HOSTS, Cors, HostNames, check_host, limit_connections
from .errors import ApiError, as_api_error, error_body, error_middleware, error_response, read_json
from .relay import ELSEWHERE, Elsewhere, relay

SETTINGS = web.AppKey("settings", Settings)

__all__ = [
    "AUDIT", "ELSEWHERE", "HOSTS", "KEY", "KEYS", "LOOPBACK", "SETTINGS", "ApiError", "Cors", "Elsewhere",
    "HostNames", "as_api_error", "authorize", "bearer", "charge", "check_host", "error_body", "error_middleware",
    "error_response", "limit_connections", "read_json", "relay", "scope_needed",
]
