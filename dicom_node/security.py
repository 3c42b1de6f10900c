"""Who may talk to the SCP: the calling-AE + address allow-list, and the DICOM TLS context (PS3.15 B.1)."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from omnict_node.config import PeerSettings, TlsSettings


@dataclass(frozen=True)
class PeerDecision:
    allowed: bool
    reason: str  # stable short text for the audit row and the log line


class PeerAllowList:
    """Calling AE title + source address allow-list. Empty list: any peer (the SCP warns about it at start).

    AE titles compare after stripping padding spaces (PS3.8 9.3.2: trailing spaces are not significant);
    ``host`` is an IP address (IPv4-mapped IPv6 addresses match their IPv4 form) or ``*`` for any address.
    """

    def __init__(self, peers: Sequence[PeerSettings]) -> None:
        self._peers = [(p.ae_title.strip(), p.host.strip()) for p in peers]

    @property
    def open_to_all(self) -> bool:
        return not self._peers

    def check(self, calling_ae_title: str, address: str) -> PeerDecision:
        if not self._peers:
            return PeerDecision(True, "no allow-list configured")
        title = calling_ae_title.strip()
        titles_known = False
        for allowed_title, allowed_host in self._peers:
            if allowed_title != title:
                continue
            titles_known = True
            if allowed_host == "*" or _same_address(allowed_host, address):
                return PeerDecision(True, "allow-listed")
        if titles_known:
            return PeerDecision(False, "calling AE title not allowed from this address")
        return PeerDecision(False, "calling AE title not recognised")


def _same_address(allowed: str, actual: str) -> bool:
    try:
        a, b = ipaddress.ip_address(allowed), ipaddress.ip_address(actual)
    except ValueError:
        return allowed == actual
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
        a = a.ipv4_mapped
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped:
        b = b.ipv4_mapped
    return a == b


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The server-side TLS context from ``settings.dicom.tls``; ``None`` when TLS is off.

    TLS 1.2 minimum (BCP 195). With ``require_peer_certificate`` (the default) a peer without a certificate
    that chains to ``ca_certificates`` fails the handshake, i.e. never reaches association negotiation.
    """
    if not tls.enabled:
        return None
    if tls.certificate is None or tls.private_key is None:
        raise ValueError("dicom.tls.enabled needs dicom.tls.certificate and dicom.tls.private_key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key))
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificates))
    if tls.require_peer_certificate:
        if tls.ca_certificates is None:
            raise ValueError("dicom.tls.require_peer_certificate needs dicom.tls.ca_certificates")
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_OPTIONAL if tls.ca_certificates is not None else ssl.CERT_NONE
    return context


def client_ssl_context(tls: TlsSettings, server_hostname_check: bool = False) -> ssl.SSLContext | None:
    """A client-side context for the same settings (used by senders and tests)."""
    if not tls.enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = server_hostname_check
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificates))
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key))
    return context
