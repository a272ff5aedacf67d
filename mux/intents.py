"""Intents: what a channel is for, which backend serves it, and its bandwidth policy.

How this works: the built-in facts live in one table (``_BUILTINS``), one row per intent.
``resolve_intent`` looks a name up by exact match, then by the longest ``:``-prefix
(``call:voice:opus`` -> ``call:voice``), then falls back to the generic stream intent.
An :class:`IntentRegistry` holds a Mux's own view (built-ins plus ``register_intent``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import attrs

from .checks import flag, whole
from .errors import BadRequest

__all__ = [
    "BANDWIDTH_POLICIES",
    "DEFAULT_POLICY",
    "GENERIC_BACKEND",
    "INTENT_ROUTES",
    "BandwidthPolicy",
    "Intent",
    "IntentRegistry",
    "Route",
    "resolve_intent",
]

GENERIC_BACKEND = "stream"
_INTENT_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*(:[a-z0-9_.\-*]+)*$")


@attrs.frozen
class BandwidthPolicy:
    """Bandwidth policy of an intent.

    ``priority``: 0 is most urgent. ``rate``: sustained bytes/s, 0 = unlimited.
    ``burst``: bucket depth in bytes. ``preemptible``: over budget, a preemptible channel's
    frame is refused (``throttled``); a non-preemptible one passes and is counted. Each is
    checked (``mux.checks``): a wrong type or a negative number raises ``BadSetting``.
    """

    priority: int = attrs.field(validator=whole(0))
    rate: int = attrs.field(validator=whole(0))
    burst: int = attrs.field(validator=whole(0))
    preemptible: bool = attrs.field(validator=flag)

    def to_dict(self) -> dict[str, object]:
        """The policy as the seed's JSON shape."""
        return dict(shared_policy(self))


@functools.lru_cache(maxsize=512)
def shared_policy(policy: BandwidthPolicy) -> dict[str, object]:
    """``policy`` as the seed's JSON shape, one shared dict per distinct policy (never mutate
    it: open frames of many channels carry it; ``BandwidthPolicy.to_dict`` hands out copies)."""
    return {"priority": policy.priority, "rate": policy.rate, "burst": policy.burst, "preemptible": policy.preemptible}


@attrs.frozen
class Route:
    """Where an intent goes: a backend name and a human description."""

    backend: str
    description: str

    def to_dict(self) -> dict[str, str]:
        """The route as the seed's JSON shape ``{backend, description}``."""
        return {"backend": self.backend, "description": self.description}


@attrs.frozen
class Intent:
    """A resolved intent: the name asked for, the table entry it matched, route and policy.

    ``delivery`` is ``"durable"`` (store-and-forward), ``"live"`` (relay, nothing stored) or
    ``"realtime"`` (live, and late frames are dropped rather than queued).
    """

    name: str
    matched: str
    route: Route
    policy: BandwidthPolicy
    delivery: str = "live"

    @property
    def backend(self) -> str:
        """The backend name this intent routes to."""
        return self.route.backend

    @property
    def realtime(self) -> bool:
        """True when late frames are dropped instead of queued (voice, video)."""
        return self.delivery == "realtime"

    def to_dict(self) -> dict[str, object]:
        """JSON form used by ``GET /intents`` and ``Mux.intents()``."""
        return {
            "intent": self.name,
            "matched": self.matched,
            **self.route.to_dict(),
            "delivery": self.delivery,
            "policy": self.policy.to_dict(),
        }


# name: (backend, description, priority, rate B/s, burst B, preemptible, delivery)
_BUILTINS: tuple[tuple[str, str, str, int, int, int, bool, str], ...] = (
    ("call:voice", "voice", "Voice call (SIP/Voice Pipeline)", 0, 128_000, 32_000, False, "realtime"),
    ("call:video", "webrtc", "Video call", 1, 2_000_000, 500_000, False, "realtime"),
    ("tibet:ping", "tping", "Identity-based ping", 2, 10_000, 5_000, False, "live"),
    ("chat", "ipoll", "Text messaging", 3, 50_000, 20_000, False, "durable"),
    ("push", "ipoll", "Push notification", 3, 50_000, 20_000, False, "durable"),
    ("task", "ipoll", "Task assignment", 4, 100_000, 50_000, True, "durable"),
    ("sync", "ipoll", "State synchronization", 4, 200_000, 100_000, True, "durable"),
    ("session", "phantom", "Phantom session resume/fork", 5, 500_000, 200_000, True, "live"),
    ("tibet:token", "tibet", "TIBET token operations", 5, 50_000, 20_000, True, "live"),
    ("mail", "mail", "Email delivery", 6, 500_000, 200_000, True, "durable"),
    ("file:sync", "sync", "File synchronization", 7, 1_000_000, 500_000, True, "live"),
    ("vpn:tunnel", "overlay", "VPN via tibet-overlay", 8, 0, 0, True, "live"),
    ("stream", "stream", "Generic data stream", 8, 0, 0, True, "live"),
)

INTENT_ROUTES: Mapping[str, Route] = {row[0]: Route(row[1], row[2]) for row in _BUILTINS}
"""Built-in intent -> route (backend, description), as in tibet-mux 1.0.0."""

BANDWIDTH_POLICIES: Mapping[str, BandwidthPolicy] = {
    row[0]: BandwidthPolicy(row[3], row[4], row[5], row[6]) for row in _BUILTINS
}
"""Built-in intent -> bandwidth policy, as in tibet-mux 1.0.0."""

_DELIVERY: Mapping[str, str] = {row[0]: row[7] for row in _BUILTINS}

DEFAULT_POLICY = BandwidthPolicy(priority=5, rate=200_000, burst=100_000, preemptible=True)
"""Policy of an unknown intent (routed to the generic stream backend)."""

_GENERIC_ROUTE = Route(GENERIC_BACKEND, "Generic data stream (unknown intent)")


def check_intent_name(name: str) -> str:
    """Return ``name`` lower-cased if it is a well-formed intent, else raise BadRequest."""
    if not isinstance(name, str):
        raise BadRequest("intent must be a string", code="bad_intent")
    norm = name.strip().lower()
    if not norm or len(norm) > 128 or not _INTENT_RE.match(norm):
        raise BadRequest(f"malformed intent {name!r}", code="bad_intent")
    return norm


@attrs.define
class IntentRegistry:
    """A mutable intent table: the built-ins plus custom registrations."""

    routes: dict[str, Route] = attrs.field(factory=lambda: dict(INTENT_ROUTES))
    policies: dict[str, BandwidthPolicy] = attrs.field(factory=lambda: dict(BANDWIDTH_POLICIES))
    delivery: dict[str, str] = attrs.field(factory=lambda: dict(_DELIVERY))
    _resolved: dict[str, Intent] = attrs.field(factory=dict, init=False, repr=False)
    """Resolved intents by name (shared by channels: an Intent is immutable); bounded."""

    def register(
        self,
        name: str,
        *,
        backend: str = GENERIC_BACKEND,
        description: str = "",
        policy: BandwidthPolicy | None = None,
        delivery: str = "live",
    ) -> Intent:
        """Add or replace a custom intent; returns it resolved."""
        norm = check_intent_name(name)
        if delivery not in ("live", "realtime", "durable"):
            raise BadRequest(f"unknown delivery {delivery!r}")
        self.routes[norm] = Route(backend, description or f"Custom intent {norm}")
        self.policies[norm] = policy or DEFAULT_POLICY
        self.delivery[norm] = delivery
        self._resolved.clear()
        return self.resolve(norm)

    def resolve(self, name: str) -> Intent:
        """Exact match, then longest ``:``-prefix, then the generic stream intent."""
        known = self._resolved.get(name)
        if known is not None:
            return known
        intent = self._resolve(check_intent_name(name))
        if len(self._resolved) >= 1024:  # clients name intents: keep the cache bounded
            self._resolved.clear()
        self._resolved[name] = intent
        return intent

    def _resolve(self, norm: str) -> Intent:
        probe = norm
        while True:
            route = self.routes.get(probe)
            if route is not None:
                return Intent(norm, probe, route, self.policies[probe], self.delivery.get(probe, "live"))
            cut = probe.rfind(":")
            if cut < 0:
                return Intent(norm, "*", _GENERIC_ROUTE, DEFAULT_POLICY, "live")
            probe = probe[:cut]

    def table(self) -> list[Intent]:
        """Every registered intent, resolved, in table order."""
        return [self.resolve(name) for name in self.routes]


_DEFAULT_REGISTRY = IntentRegistry()


def resolve_intent(name: str, registry: IntentRegistry | None = None) -> Intent:
    """Resolve ``name`` against ``registry`` (default: the built-in table)."""
    return (registry or _DEFAULT_REGISTRY).resolve(name)
