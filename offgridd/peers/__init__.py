"""Peers: boxes on one LAN find each other, share models and serve each other's requests (docs/peers.md)."""

from .http import peer_service, setup_routes
from .peer import Peer
from .protocol import PROTOCOL_VERSION, DatagramRejected, PeerAnnouncement, read_announcement
from .routing import route_to_peer
from .service import PeerService


def peer_service_factory(rt) -> PeerService | None:
    """For daemon.service_factories: None when [peers] enabled = false."""
    return PeerService(rt) if rt.settings.peers.enabled else None


__all__ = [
    "PROTOCOL_VERSION", "DatagramRejected", "Peer", "PeerAnnouncement", "PeerService", "peer_service",
    "peer_service_factory", "read_announcement", "route_to_peer", "setup_routes",
]
