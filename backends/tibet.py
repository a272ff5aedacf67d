"""The tibet backend (``tibet:token``): the node issues and verifies signed provenance tokens.

How this works: an agent opens a ``tibet:token`` channel to the node itself (``target`` =
the node's agent name) and sends requests; the backend answers each one on the same
channel, to the opener, with a frame of its own (sender = the node):

- ``{"op":"issue","claim":ANY,"refs":[tbz_hash…],"ttl_s":N,"intent"?:S}`` ->
  ``{"op":"issued","token":{…}}``: a token (:mod:`mux.tokens`) whose ``iss`` is the node,
  whose ``sub`` is the opener (never chosen by the caller), signed by the node key;
- ``{"op":"verify","token":{…}}`` -> ``{"op":"verified","ok":true,"claims":{…}}`` or
  ``{"op":"verified","ok":false,"reason":R,"detail":D}`` (checked with the node's key);
- anything else -> ``{"op":"error","code":C,"detail":D}``; the channel stays open.

A request's ``ref`` (string or integer) is echoed in its answer, and every answer carries
``seq``, the request frame's seq. Work is CPU only (one Ed25519 signature), so it is done in
``on_frame``; ``admit`` refuses a request (retryably, ``receiver_full``) while the opener's
inbox has no room for the answer, so answers are never dropped for an attached opener (a
REST opener reads them from the ledger with ``GET /channel/{id}/frames``).

Options (``[backends.tibet]``): ``max_ttl_s`` (default 30 days), ``default_ttl_s`` (3600),
``max_claim_bytes`` (16384), ``max_refs`` (64).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from mux.errors import BadRequest, VerificationError
from mux.frames import canonical_json
from mux.intents import check_intent_name
from mux.tokens import DEFAULT_TTL_S, issue_token, verify_token

from .base import Disposition

if TYPE_CHECKING:
    from mux.channel import ChannelContext
    from mux.frames import Frame

__all__ = ["TibetBackend"]

_DEFAULTS: dict[str, Any] = {
    "max_ttl_s": 30 * 24 * 3600.0,
    "default_ttl_s": DEFAULT_TTL_S,
    "max_claim_bytes": 16 << 10,
    "max_refs": 64,
}


_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


class _Refused(Exception):
    """A request this backend answers with ``{"op":"error"}``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _number(opts: dict[str, Any], name: str) -> float:
    value = opts.get(name, _DEFAULTS[name])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise BadRequest(f"tibet backend option {name} must be a positive number", code="tibet_misconfigured")
    return float(value)


class TibetBackend:
    """Issues and verifies TIBET tokens signed by the node key, over ``tibet:token`` channels."""

    name = "tibet"
    background = False
    """``run`` does nothing: no task per channel."""

    def __init__(self, mux: Any) -> None:
        self.mux = mux

    def check_open(self, ctx: ChannelContext) -> None:
        """Only channels to the node itself are served (the node is the token issuer)."""
        if ctx.target != ctx.mux.agent:
            raise BadRequest(
                f"tibet:token channels are served by the node: open them with target {ctx.mux.agent!r}",
                code="bad_target",
            )
        for name in _DEFAULTS:
            _number(ctx.options(), name)  # refuse the channel now if the node is misconfigured
        ctx.state.extra.update({"issued": 0, "verified": 0, "refused": 0, "errors": 0})

    async def run(self, ctx: ChannelContext) -> None:
        """Nothing in the background: every request is answered in ``on_frame``."""

    def admit(self, ctx: ChannelContext, sender: str, size: int) -> None:
        """Refuse (retryably) a request while the opener's inbox has no room for the answer."""
        ctx.require_room(ctx.agent)

    def on_frame(self, ctx: ChannelContext, frame: Frame) -> Disposition:
        """Answer one request to the opener; the request itself is consumed."""
        if frame.sender != ctx.agent:  # only the opener asks; nobody else may speak for the node
            return Disposition.DROPPED
        request = frame.payload
        answer: dict[str, Any]
        try:
            answer = self._answer(ctx, request)
        except _Refused as exc:
            answer = {"op": "error", "code": exc.code, "detail": exc.detail}
            self._count(ctx, "errors")
        answer["seq"] = frame.seq
        if isinstance(request, dict):
            ref = request.get("ref")
            if isinstance(ref, (str, int)) and not isinstance(ref, bool):
                answer["ref"] = ref
        ctx.emit(answer, to=ctx.agent)
        return Disposition.CONSUMED

    def on_close(self, ctx: ChannelContext, reason: str) -> None:
        """Nothing held."""

    # ---- requests ----------------------------------------------------------------------------

    @staticmethod
    def _count(ctx: ChannelContext, name: str) -> None:
        ctx.state.extra[name] = int(ctx.state.extra.get(name, 0)) + 1

    def _answer(self, ctx: ChannelContext, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            raise _Refused("bad_request", "a request is a JSON object with an 'op'")
        op = request.get("op")
        if op == "issue":
            return self._issue(ctx, request)
        if op == "verify":
            return self._verify(ctx, request)
        raise _Refused("unknown_op", f"op must be 'issue' or 'verify', not {op!r:.40}")

    def _issue(self, ctx: ChannelContext, request: dict[str, Any]) -> dict[str, Any]:
        opts = ctx.options()
        unknown = sorted(set(request) - {"op", "claim", "refs", "ttl_s", "intent", "ref"})
        if unknown:
            raise _Refused("bad_request", f"unknown field(s): {', '.join(map(str, unknown))}")
        claim = request.get("claim")
        try:
            claim_size = len(canonical_json(claim))
        except BadRequest as exc:  # pragma: no cover - a frame payload is always JSON
            raise _Refused("bad_claim", exc.detail) from exc
        if claim_size > _number(opts, "max_claim_bytes"):
            raise _Refused("bad_claim", f"claim is {claim_size} bytes, over {int(_number(opts, 'max_claim_bytes'))}")
        refs = request.get("refs", [])
        if not isinstance(refs, list) or not all(isinstance(r, str) and _HASH_RE.match(r) for r in refs):
            raise _Refused("bad_refs", "refs must be a list of frame tbz_hash values (64 lowercase hex digits)")
        if len(refs) > _number(opts, "max_refs"):
            raise _Refused("bad_refs", f"at most {int(_number(opts, 'max_refs'))} refs")
        ttl = request.get("ttl_s", _number(opts, "default_ttl_s"))
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= _number(opts, "max_ttl_s"):
            raise _Refused("bad_ttl", f"ttl_s must be a number of seconds in (0, {_number(opts, 'max_ttl_s'):g}]")
        intent = request.get("intent", ctx.intent.name)
        try:
            intent = check_intent_name(intent)
            token = issue_token(
                ctx.mux.key, issuer=ctx.mux.agent, subject=ctx.agent, claim=claim, intent=intent, refs=refs, ttl_s=ttl
            )
        except BadRequest as exc:
            raise _Refused("bad_request", exc.detail) from exc
        self._count(ctx, "issued")
        return {"op": "issued", "token": token}

    def _verify(self, ctx: ChannelContext, request: dict[str, Any]) -> dict[str, Any]:
        if "token" not in request:
            raise _Refused("bad_request", "verify needs a 'token'")
        try:
            claims = verify_token(request["token"], ctx.mux.public_key)
        except VerificationError as exc:
            self._count(ctx, "refused")
            return {"op": "verified", "ok": False, "reason": exc.reason, "detail": exc.detail}
        self._count(ctx, "verified")
        return {"op": "verified", "ok": True, "claims": claims}
