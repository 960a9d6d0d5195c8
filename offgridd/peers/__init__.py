"""Peers: boxes on one LAN find each other, share models and serve each other's requests (docs/peers.md).

`routes.setup_routes` adds their HTTP surfaces to the app."""

from .peer import Peer
from .protocol import PROTOCOL_VERSION, DatagramRejected, PeerAnnouncement, read_announcement
from .service import PeerService

__all__ = ["PROTOCOL_VERSION", "DatagramRejected", "Peer", "PeerAnnouncement", "PeerService", "read_announcement"]
