"""Host name lookups that give up when their request's time is up, so a hung resolver holds no query past it.

:func:`socket.getaddrinfo` takes no timeout: a resolver that does not answer holds its caller for as long as the
system's settings let it (several seconds per name server and attempt, more when one is unreachable), and httpcore
looks a name up inside :func:`socket.create_connection`, where no timeout applies. :class:`Resolver` runs each lookup
on a thread of its own and waits for it at most the time given, then raises the connect timeout httpcore would.

A lookup given up on cannot be stopped: its thread runs until the resolver answers. So at most ``bound`` lookups
run at once (a further one waits for a free slot, within its own time), and their threads are daemons, which a hung
resolver cannot keep from exiting (the workers of a :class:`concurrent.futures.ThreadPoolExecutor` are joined at
exit, which would hold ``wmark verify`` after its verdict).

Example:
    >>> Resolver(bound=2).addresses("127.0.0.1", 80, timeout=1.0)
    ['127.0.0.1']
"""

from __future__ import annotations

import concurrent.futures as cf
import ipaddress
import socket
import threading
import time
from typing import Any

import httpcore

THREAD_NAME = "wmark-lookup"


class Resolver:
    """Looks host names up on daemon threads, at most ``bound`` at once, each waited for within a timeout.

    Args:
        bound: Most lookups running at once, hung ones included (the threads a hung resolver can hold).
    """

    def __init__(self, bound: int) -> None:
        if bound < 1:
            raise ValueError(f"At least one lookup must be allowed at once, got {bound}.")
        self._slots = threading.BoundedSemaphore(bound)

    def addresses(self, host: str, port: int, timeout: float | None) -> list[str]:
        """The addresses of ``host`` to connect to, in the system resolver's order (an address: itself).

        Args:
            host: A host name or an IP address.
            port: The port to connect to (a resolver may answer differently for different services).
            timeout: Seconds to wait for a free slot and the lookup together (``None``: as long as they take).

        Raises:
            httpcore.ConnectTimeout: When no answer came in time.
            httpcore.ConnectError: When the name has no address (or the lookup failed).
        """
        if _is_address(host):
            return [host]
        started = time.monotonic()
        if not self._slots.acquire(timeout=timeout):
            raise httpcore.ConnectTimeout(f"no lookup of {host} could start within the timeout: earlier ones hang")
        found: cf.Future[list[Any]] = cf.Future()
        try:
            threading.Thread(target=self._look_up, args=(host, port, found), name=THREAD_NAME, daemon=True).start()
        except BaseException:
            self._slots.release()
            raise
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        try:
            infos = found.result(timeout=left)
        except cf.TimeoutError:
            raise httpcore.ConnectTimeout(f"the lookup of {host} did not finish within the timeout") from None
        except OSError as exc:  # what create_connection's lookup raises, mapped as httpcore maps it there
            raise httpcore.ConnectError(str(exc)) from exc
        # A link-local IPv6 address is reachable only through its interface, which sockaddr[3] names.
        found_addresses = (f"{sa[0]}%{sa[3]}" if len(sa) == 4 and sa[3] else str(sa[0]) for *_, sa in infos)
        return list(dict.fromkeys(found_addresses))

    def _look_up(self, host: str, port: int, found: cf.Future[list[Any]]) -> None:
        try:
            found.set_result(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller, who re-raises it
            found.set_exception(exc)
        finally:
            self._slots.release()


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True
