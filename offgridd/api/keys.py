"""The app key the API's handlers reach the running appliance by (subsystems' routes have keys of their own)."""

from aiohttp import web

from ..runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
