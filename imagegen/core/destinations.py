"""Where a webhook may go: a URL taken apart, an operator's allow-list, and the rule that keeps
deliveries off loopback, private, link-local and other non-public addresses.

A destination is checked twice: at submit (the gateway, so that a bad URL is a 422 naming
`webhook.url`) and again at every delivery, after resolving its name then, against the
addresses actually connected to (a name can be pointed at 169.254.169.254 after submit).
Nothing here reads settings: the settings validate the allow-list with it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_URL_CHARS = 2000
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refused(ValueError):
    """A destination webhooks may not reach; the message says why."""


@dataclass(frozen=True)
class Allowed:
    """One allow-list entry: a host name or a network, and the one port it allows (None: any)."""

    host: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def admits_port(self, port: int) -> bool:
        return self.port is None or self.port == port


@dataclass(frozen=True)
class AllowList:
    """IMAGEGEN_WEBHOOK_ALLOWED_HOSTS: host names, and addresses or networks (CIDR), each
    optionally with one port (`hooks.internal:8443`, `10.0.0.0/8:443`, `[fd00::/8]:443`)."""

    entries: tuple[Allowed, ...] = ()

    @classmethod
    def parse(cls, entries: list[str]) -> AllowList:
        """The list's entries (IMAGEGEN_WEBHOOK_ALLOWED_HOSTS, read into a list); a ValueError
        names a bad one."""
        return cls(tuple(_entry(entry.strip()) for entry in entries if entry.strip()))

    def names(self, host: str, port: int) -> bool:
        """Whether `host` (a URL's host: a name or an address) and `port` are on the list."""
        address = _address(host)
        if address is None:
            name = normal_host(host)
            return any(e.host == name and e.admits_port(port) for e in self.entries)
        return self.holds(address, port)

    def holds(self, address: IPAddress, port: int) -> bool:
        return any(
            e.network is not None and address in e.network and e.admits_port(port)
            for e in self.entries
        )


def _entry(item: str) -> Allowed:
    """`host`, `host:port`, `address[/prefix]`, `v4address[/prefix]:port`, `[v6[/prefix]]:port`
    or a bare IPv6 address or network (no port: its colons are the address's)."""
    port: int | None = None
    if item.startswith("["):
        inner, _, rest = item[1:].partition("]")
        item = inner
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif item.count(":") == 1:
        item, _, given = item.partition(":")
        if not given.isdigit() or not 0 < int(given) < 65536:
            raise ValueError(f"allow-list entry {item}:{given}: the port must be 1..65535")
        port = int(given)
    try:
        return Allowed(network=ipaddress.ip_network(item, strict=False), port=port)
    except ValueError:
        return Allowed(host=normal_host(item), port=port)


def normal_host(host: str) -> str:
    """A host as compared: lower case, brackets and one trailing dot taken off (`127.0.0.1.`
    and `example.com.` are `127.0.0.1` and `example.com` to a resolver)."""
    return host.strip("[]").lower().removesuffix(".")


def _address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(normal_host(host))
    except ValueError:
        return None


# IPv6 forms that carry an IPv4 address, which is what a connection to them reaches: NAT64's
# well-known and local-use prefixes (RFC 6052, 8215), 6to4 (RFC 3056), Teredo (RFC 4380),
# IPv4-compatible (RFC 4291, deprecated) and IPv4-mapped addresses.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv6 one, for the forms that route to it; else None."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address (Teredo stores it inverted)
    # :: and ::1 are in ::/96 but are the unspecified and loopback addresses, not IPv4 ones.
    compatible = address in _IPV4_COMPATIBLE and int(address) > 1
    if compatible or any(address in network for network in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def why_blocked(address: IPAddress) -> str | None:
    """Why webhooks must not reach `address` (None: a public address). An IPv6 address that
    carries an IPv4 one is judged by the IPv4 inside, and must itself be a public form."""
    if isinstance(address, ipaddress.IPv6Address):
        inside = embedded_ipv4(address)
        if inside is not None:
            reason = why_blocked(inside)
            if reason is not None:
                return f"{reason} inside an IPv6 address ({inside})"
            if address.ipv4_mapped is None and (
                address in _IPV4_COMPATIBLE or address in _NAT64[1]
            ):
                return "not a public address (an IPv4-compatible or local-use NAT64 form)"
            return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (where cloud metadata services answer)"
    if address.is_private:
        return "a private address"
    if address.is_multicast or address.is_unspecified or not address.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class Destination:
    """A webhook URL taken apart."""

    scheme: str
    host: str
    port: int


def parse_url(url: str) -> Destination:
    """The URL's scheme, host and port, or `Refused` naming what is wrong with its form."""
    if len(url) > MAX_URL_CHARS:
        raise Refused(f"must be at most {MAX_URL_CHARS} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise Refused("must not contain white space or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Refused("is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise Refused("must be an https:// URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise Refused("must not carry credentials (user:password@); put a token in the path")
    if not parts.hostname or not normal_host(parts.hostname):
        raise Refused("needs a host")
    default = 443 if parts.scheme == "https" else 80
    return Destination(parts.scheme, normal_host(parts.hostname), port or default)


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to now (an address literal: itself)."""
    literal = _address(host)
    if literal is not None:
        return [literal]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    return found


def check_destination(
    url: str,
    allow: AllowList,
    resolver: Callable[[str, int], list[IPAddress]] = resolve,
) -> tuple[Destination, list[IPAddress]]:
    """The URL's destination and the addresses it may be reached at, or `Refused`.

    https only, and no loopback, private, link-local or otherwise non-public address (every
    address the name resolves to is checked), unless the allow-list names the host (then
    http is allowed too) or holds the address. `OSError` when the name does not resolve."""
    destination = parse_url(url)
    listed = allow.names(destination.host, destination.port)
    if destination.scheme != "https" and not listed:
        raise Refused("must be an https:// URL (http only for IMAGEGEN_WEBHOOK_ALLOWED_HOSTS)")
    literal = _address(destination.host)
    # An address literal is judged as written: nothing is looked up for it.
    addresses = [literal] if literal is not None else resolver(destination.host, destination.port)
    if not addresses:
        raise OSError(f"{destination.host} resolves to no address")
    for address in addresses:
        reason = why_blocked(address)
        if reason is not None and not listed and not allow.holds(address, destination.port):
            shown = destination.host
            named = f"{shown} resolves to {address}, " if _address(shown) is None else ""
            raise Refused(
                f"{named}{reason}: webhooks go to public addresses only (an operator can "
                "allow hosts with IMAGEGEN_WEBHOOK_ALLOWED_HOSTS)"
            )
    return destination, addresses
