"""The mail backend (``mail``): the node delivers e-mail through its configured SMTP server.

How this works: an agent opens a ``mail`` channel to the node itself (``target`` = the
node's agent name) and sends one request per frame, ``{"to", "subject", "body", "from"?,
"ref"?}``. ``on_frame`` validates it: a bad one is answered ``{"status":"rejected"}`` at
once. A good one is put in the node agent's own mailbox, which is the outbox: the core
stores it durably (``mail_put``) before the sender's ``frame_ack``, and it leaves the outbox
(``Mux.ack``) only once its outcome is final, so mail accepted by the node is never silently
lost, also across a restart (the restored outbox is picked up again when the node starts).

Each queued message is a task in the mux nursery (not the channel's: closing the channel
does not cancel mail already accepted). It sends with the stdlib :mod:`smtplib` in a worker
thread (``trio.to_thread``) and reports to the opener, on the channel, with frames of its
own (sender = the node; each carries the request's ``seq`` and ``ref``):

- ``{"status":"sent","message_id":ID,"attempts":N}`` (``refused`` lists recipients the server
  refused when it accepted others);
- ``{"status":"retrying","attempts":N,"next_in_s":S,"code":C,"error":E}`` after a temporary
  failure (SMTP 4xx, connection refused/reset, timeout): retried with exponential backoff
  ``backoff_s * 2**(N-1)`` capped at ``max_backoff_s``;
- ``{"status":"failed","reason":"permanent","code":C,"error":E,"attempts":N}`` on a
  permanent failure (SMTP 5xx, STARTTLS not offered, TLS certificate refused): not retried;
- ``{"status":"failed","reason":"gave_up","code":C,"error":E,"attempts":N}`` once
  ``max_attempts`` temporary failures have happened.

Options (``[backends.mail]``): ``host`` (required: without it mail channels are refused with
``mail_not_configured``), ``port`` (25), ``starttls`` (false), ``username``/``password``
(login when set), ``from`` (default sender), ``timeout_s`` (30), ``max_attempts`` (5),
``backoff_s`` (5), ``max_backoff_s`` (300), ``helo`` ("localhost"), ``ca_file``,
``max_bytes`` (262144: subject + body, UTF-8), ``max_recipients`` (50), ``queue_max``
(1000 messages in flight per node; more is refused before chaining with the retryable
``mail_queue_full``).
"""

from __future__ import annotations

import functools
import logging
import re
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

import attrs
import trio

from mux.errors import BadRequest, ChannelClosed, ChannelError, ChannelFull, MuxError

from .base import Disposition

if TYPE_CHECKING:
    from mux.channel import ChannelContext
    from mux.frames import Frame

__all__ = ["MailBackend", "MailConfig", "MailRequest", "check_address"]

log = logging.getLogger(__name__)

_ADDR_RE = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_REQUEST_FIELDS = frozenset({"to", "from", "subject", "body", "ref"})
_REPORT_WAIT_S = 5.0


def check_address(value: Any) -> str:
    """Return ``value`` if it is a plain ASCII mail address (``local@domain``), else raise
    BadRequest. Display names, comments and line breaks are refused (no header injection)."""
    if not isinstance(value, str) or len(value) > 254 or not _ADDR_RE.match(value):
        raise BadRequest(f"not a mail address: {value!r:.80}", code="bad_address")
    if len(value.partition("@")[0]) > 64:
        raise BadRequest(f"local part over 64 characters: {value!r:.80}", code="bad_address")
    return value


def _opt_type(name: str, value: Any, kind: type | tuple[type, ...], *, positive: bool = False) -> None:
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ChannelError(f"mail backend option {name} has the wrong type", code="mail_misconfigured")
    if positive and isinstance(value, (int, float)) and value <= 0:
        raise ChannelError(f"mail backend option {name} must be positive", code="mail_misconfigured")


@attrs.frozen
class MailConfig:
    """The node's SMTP settings (the backend's options), checked."""

    host: str
    port: int = 25
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    sender: str | None = None
    """Default envelope sender and ``From`` (option ``from``)."""
    timeout_s: float = 30.0
    max_attempts: int = 5
    backoff_s: float = 5.0
    max_backoff_s: float = 300.0
    helo: str = "localhost"
    ca_file: str | None = None
    max_bytes: int = 256 << 10
    max_recipients: int = 50
    queue_max: int = 1000

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> MailConfig:
        """Build from ``[backends.mail]`` options; raise ChannelError ``mail_not_configured``
        (no ``host``) or ``mail_misconfigured`` (a wrong type or value)."""
        if not opts.get("host"):
            raise ChannelError(
                "the node has no SMTP server configured (backends.mail.host)", code="mail_not_configured"
            )
        known = {a.name for a in attrs.fields(cls)} - {"sender"} | {"from"}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ChannelError(f"unknown mail backend option(s): {', '.join(unknown)}", code="mail_misconfigured")
        kw = {("sender" if k == "from" else k): v for k, v in opts.items()}
        spec: dict[str, tuple[type | tuple[type, ...], bool]] = {
            "host": (str, False),
            "port": (int, True),
            "starttls": (bool, False),
            "username": (str, False),
            "password": (str, False),
            "sender": (str, False),
            "timeout_s": ((int, float), True),
            "max_attempts": (int, True),
            "backoff_s": ((int, float), False),
            "max_backoff_s": ((int, float), False),
            "helo": (str, False),
            "ca_file": (str, False),
            "max_bytes": (int, True),
            "max_recipients": (int, True),
            "queue_max": (int, True),
        }
        for name, value in kw.items():
            if value is None and name in ("username", "password", "sender", "ca_file"):
                continue
            kind, positive = spec[name]
            _opt_type(name, value, kind, positive=positive)
        if kw.get("sender") is not None:
            try:
                check_address(kw["sender"])
            except BadRequest as exc:
                raise ChannelError(f"mail backend option from: {exc.detail}", code="mail_misconfigured") from exc
        if kw.get("backoff_s", 0) < 0 or kw.get("max_backoff_s", 0) < 0:
            raise ChannelError("mail backend backoff options must not be negative", code="mail_misconfigured")
        return cls(**kw)


@attrs.frozen
class MailRequest:
    """One validated mail request."""

    to: tuple[str, ...]
    sender: str
    subject: str
    body: str

    @classmethod
    def parse(cls, payload: Any, config: MailConfig) -> MailRequest:
        """Validate a request frame's payload; raise BadRequest saying what is wrong."""
        if not isinstance(payload, dict):
            raise BadRequest("a mail request is a JSON object {to, subject, body, from?}")
        unknown = sorted(set(payload) - _REQUEST_FIELDS)
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(map(str, unknown))}")
        to = payload.get("to")
        rcpts = [to] if isinstance(to, str) else to
        if not isinstance(rcpts, list) or not rcpts:
            raise BadRequest("'to' must be an address or a non-empty list of addresses", code="bad_address")
        if len(rcpts) > config.max_recipients:
            raise BadRequest(f"at most {config.max_recipients} recipients", code="too_many_recipients")
        for rcpt in rcpts:
            check_address(rcpt)
        sender = payload.get("from", config.sender)
        if sender is None:
            raise BadRequest("no sender: give 'from' or configure backends.mail.from", code="bad_address")
        check_address(sender)
        subject, body = payload.get("subject"), payload.get("body")
        if not isinstance(subject, str) or not isinstance(body, str):
            raise BadRequest("'subject' and 'body' must be strings")
        if "\r" in subject or "\n" in subject or len(subject) > 900:
            raise BadRequest("'subject' must be one line of at most 900 characters")
        size = len(subject.encode()) + len(body.encode())
        if size > config.max_bytes:
            raise BadRequest(f"subject + body are {size} bytes, over {config.max_bytes}", code="too_large")
        return cls(tuple(rcpts), sender, subject, body)

    def message(self, frame: Frame, agent: str) -> EmailMessage:
        """The RFC 5322 message for request ``frame`` sent by ``agent``: From, To, Subject,
        Date, Message-ID (derived from the frame's ``tbz_hash``, so a message sent again after
        a restart keeps its id), ``X-Mux-Agent``, ``X-Mux-Frame`` (the hash), then the body."""
        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.to)
        msg["Subject"] = self.subject
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = f"<{frame.tbz_hash[:32]}.mux@{self.sender.rpartition('@')[2]}>"
        msg["X-Mux-Agent"] = agent
        msg["X-Mux-Frame"] = frame.tbz_hash
        msg.set_content(self.body)
        return msg


def _ref_of(payload: Any) -> str | int | None:
    """The request's ``ref`` (echoed in its answers), if it is a string or an integer."""
    ref = payload.get("ref") if isinstance(payload, dict) else None
    return ref if isinstance(ref, (str, int)) and not isinstance(ref, bool) else None


class _Verdict(Exception):
    """How a send attempt failed: ``permanent`` or not, the SMTP ``code`` (if any), text."""

    def __init__(self, permanent: bool, code: int | None, error: str) -> None:
        super().__init__(error)
        self.permanent = permanent
        self.code = code
        self.error = error


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _classify(exc: BaseException) -> _Verdict:
    """Permanent (5xx, configuration) or temporary (4xx, network) failure."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        items = list(exc.recipients.items())
        codes = [code for _, (code, _msg) in items]
        error = "; ".join(f"{rcpt}: {code} {_text(msg)}" for rcpt, (code, msg) in items)
        permanent = bool(codes) and all(code >= 500 for code in codes)
        code = next((c for c in codes if (c >= 500) == permanent), codes[0] if codes else None)
        return _Verdict(permanent, code, error)
    if isinstance(exc, smtplib.SMTPResponseException):
        code = int(exc.smtp_code)
        return _Verdict(code >= 500, code, _text(exc.smtp_error))
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return _Verdict(True, None, f"not supported by the server: {exc}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _Verdict(True, None, f"TLS certificate refused: {exc.verify_message}")
    if isinstance(exc, (smtplib.SMTPException, OSError)):
        return _Verdict(False, None, f"{type(exc).__name__}: {exc}")
    return _Verdict(True, None, f"{type(exc).__name__}: {exc}")


def _smtp_send(config: MailConfig, msg: EmailMessage, sender: str, to: tuple[str, ...]) -> dict[str, Any]:
    """Blocking: one SMTP session that sends ``msg``; returns the recipients refused (if any)."""
    with smtplib.SMTP(config.host, config.port, timeout=config.timeout_s, local_hostname=config.helo) as smtp:
        if config.starttls:
            smtp.starttls(context=ssl.create_default_context(cafile=config.ca_file))
        if config.username:
            smtp.login(config.username, config.password or "")
        refused = smtp.send_message(msg, from_addr=sender, to_addrs=list(to))
    return {rcpt: [code, _text(text)] for rcpt, (code, text) in refused.items()}


@attrs.define(eq=False)
class _Job:
    ctx: ChannelContext
    seq: int
    ref: str | int | None
    request: MailRequest
    message: EmailMessage
    config: MailConfig
    attempts: int = 0


class MailBackend:
    """Sends mail requests through SMTP, durably queued in the node's own mailbox."""

    name = "mail"
    durable = True

    def __init__(self, mux: Any) -> None:
        self.mux = mux
        self.stats: dict[str, int] = {"queued": 0, "sent": 0, "failed": 0, "gave_up": 0, "rejected": 0, "retries": 0}
        """Node-wide counts since start."""
        self._jobs: dict[tuple[str, int], _Job] = {}
        self._done: dict[str, set[int]] = {}
        self._room = trio.lowlevel.ParkingLot()
        if hasattr(mux, "start_task"):  # mail restored from the store waits in the outbox: resume it
            mux.start_task(self._recover, name="mux-mail-recover")

    # ---- the Backend protocol -------------------------------------------------------------

    def check_open(self, ctx: ChannelContext) -> None:
        """Only channels to the node itself, and only when SMTP is configured."""
        if ctx.target != ctx.mux.agent:
            raise BadRequest(
                f"mail channels are served by the node: open them with target {ctx.mux.agent!r}", code="bad_target"
            )
        MailConfig.from_options(ctx.options())
        ctx.state.extra.update({"queued": 0, "sent": 0, "failed": 0, "rejected": 0})

    async def run(self, ctx: ChannelContext) -> None:
        """Nothing per channel: each accepted message has its own task in the mux nursery."""

    def admit(self, ctx: ChannelContext, sender: str, size: int) -> None:
        """Refuse (retryably) while the node's queue or outbox, or the opener's inbox, is full."""
        if sender != ctx.agent:
            return
        ctx.require_room(ctx.agent)  # room for the answer: an opener that reads nothing is slowed down
        limit = ctx.options().get("queue_max", MailConfig.queue_max)
        if isinstance(limit, int) and len(self._jobs) >= limit:
            raise ChannelFull(
                f"the node's mail queue is full ({len(self._jobs)} messages in flight)",
                code="mail_queue_full",
                channel_id=ctx.channel_id,
                wait_room=self._room.park,
            )
        ctx.mux.mail_check(ctx.mux.agent, size, ctx.channel_id)

    def on_frame(self, ctx: ChannelContext, frame: Frame) -> Disposition:
        """Validate a request: answer ``rejected`` or store it in the outbox and queue it."""
        if frame.sender != ctx.agent:
            return Disposition.DROPPED
        payload = frame.payload
        ref = _ref_of(payload)
        try:
            config = MailConfig.from_options(ctx.options())
            request = MailRequest.parse(payload, config)
            message = request.message(frame, ctx.agent)
        except (MuxError, ValueError) as exc:
            detail = exc.detail if isinstance(exc, MuxError) else str(exc)
            code = exc.code if isinstance(exc, MuxError) else "bad_request"
            answer: dict[str, Any] = {"status": "rejected", "code": code, "error": detail, "seq": frame.seq}
            if ref is not None:
                answer["ref"] = ref
            self._count(ctx, "rejected")
            ctx.emit(answer, to=ctx.agent)
            return Disposition.CONSUMED
        ctx.mux.mail_put(ctx.state, frame)  # durable in the outbox until its outcome is final
        self._queue(_Job(ctx, frame.seq, ref, request, message, config))
        return Disposition.STORED

    def on_close(self, ctx: ChannelContext, reason: str) -> None:
        """Accepted mail is still delivered after the channel closes (its outcome is logged)."""

    # ---- delivery ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Messages accepted and not yet finally sent or failed."""
        return len(self._jobs)

    def _count(self, ctx: ChannelContext, name: str) -> None:
        self.stats[name] = self.stats.get(name, 0) + 1
        if name in ctx.state.extra:
            ctx.state.extra[name] += 1

    def _queue(self, job: _Job) -> None:
        self._jobs[job.ctx.channel_id, job.seq] = job
        self._count(job.ctx, "queued")
        self.mux.start_task(self._deliver, job, name=f"mux-mail-{job.ctx.channel_id}-{job.seq}")

    async def _deliver(self, job: _Job) -> None:
        """A message's task in the node's nursery; never raises: a bug here must not stop the
        node (the message then stays in the outbox, logged, and is tried again at restart)."""
        try:
            await self._attempts(job)
        except Exception:
            log.exception("mail %s seq %d: delivery failed; kept in the outbox", job.ctx.channel_id, job.seq)
        finally:  # also when cancelled (node shutdown): the message stays in the outbox for the next start
            self._jobs.pop((job.ctx.channel_id, job.seq), None)
            self._room.unpark_all()

    async def _attempts(self, job: _Job) -> None:
        """Try until sent, permanently failed or out of attempts; report each step."""
        cfg = job.config
        send = functools.partial(_smtp_send, cfg, job.message, job.request.sender, job.request.to)
        while True:
            job.attempts += 1
            try:
                refused = await trio.to_thread.run_sync(send, abandon_on_cancel=True)
            except Exception as exc:
                verdict = _classify(exc)
            else:
                report: dict[str, Any] = {
                    "status": "sent",
                    "message_id": job.message["Message-ID"],
                    "attempts": job.attempts,
                }
                if refused:
                    report["refused"] = refused
                await self._finish(job, "sent", report)
                return
            failure = {"code": verdict.code, "error": verdict.error, "attempts": job.attempts}
            if verdict.permanent:
                await self._finish(job, "failed", {"status": "failed", "reason": "permanent", **failure})
                return
            if job.attempts >= cfg.max_attempts:
                await self._finish(job, "gave_up", {"status": "failed", "reason": "gave_up", **failure})
                return
            delay = min(cfg.backoff_s * 2 ** (job.attempts - 1), cfg.max_backoff_s)
            self.stats["retries"] += 1
            log.info("mail %s seq %d: attempt %d failed (%s), retry in %.3gs",
                     job.ctx.channel_id, job.seq, job.attempts, verdict.error, delay)  # fmt: skip
            await self._report(job, {"status": "retrying", "next_in_s": delay, **failure})
            await trio.sleep(delay)

    async def _finish(self, job: _Job, outcome: str, report: dict[str, Any]) -> None:
        """Record the final outcome: take the message out of the outbox, tell the opener."""
        self._count(job.ctx, "failed" if outcome == "gave_up" else outcome)
        if outcome == "gave_up":
            self.stats["gave_up"] += 1
        level = logging.INFO if outcome == "sent" else logging.WARNING
        log.log(level, "mail %s seq %d to %s: %s", job.ctx.channel_id, job.seq, ",".join(job.request.to), report)
        self._ack(job)
        await self._report(job, report)

    def _ack(self, job: _Job) -> None:
        """Acknowledge the longest prefix of the channel's outbox whose outcome is final
        (acks are cumulative: a message still retrying holds back the ones after it)."""
        cid = job.ctx.channel_id
        done = self._done.setdefault(cid, set())
        done.add(job.seq)
        box = self.mux.mailboxes.get(self.mux.agent)
        mail = box.channels.get(cid) if box is not None else None
        upto: int | None = None
        for frame in mail.frames if mail is not None else ():
            if frame.seq not in done:
                break
            upto = frame.seq
        if upto is not None:
            self.mux.ack(self.mux.agent, cid, upto)
            done.difference_update([s for s in done if s <= upto])
        if not done or mail is None:
            self._done.pop(cid, None)

    async def _report(self, job: _Job, report: dict[str, Any]) -> None:
        """Send ``report`` to the opener on the channel (waiting a little for inbox room)."""
        ctx = job.ctx
        report = {**report, "seq": job.seq, **({"ref": job.ref} if job.ref is not None else {})}
        if not ctx.state.is_open:
            log.info("mail %s seq %d: channel closed, outcome not reported on it", ctx.channel_id, job.seq)
            return
        try:
            with trio.move_on_after(_REPORT_WAIT_S):
                await ctx.send(report, to=ctx.agent)
                return
            ctx.emit(report, to=ctx.agent)  # the opener does not read: the ledger keeps it
        except ChannelClosed:
            log.info("mail %s seq %d: channel closed before the outcome was reported", ctx.channel_id, job.seq)

    async def _recover(self) -> None:
        """Queue again the messages a previous run accepted and did not finish (never raises)."""
        await trio.lowlevel.checkpoint()
        try:
            self._requeue_outbox()
        except Exception:
            log.exception("could not resume the mail outbox; it stays stored for the next start")

    def _requeue_outbox(self) -> None:
        """Queue every outbox message of this backend's channels that has no task yet."""
        box = self.mux.mailboxes.get(self.mux.agent)
        for cid, mail in list(box.channels.items()) if box is not None else ():
            state = mail.state
            if state.backend is not self or state.ctx is None:
                continue
            ctx = state.ctx
            for frame in list(mail.frames):
                if (cid, frame.seq) in self._jobs:
                    continue
                try:
                    config = MailConfig.from_options(ctx.options())
                    request = MailRequest.parse(frame.payload, config)
                    message = request.message(frame, ctx.agent)
                except (MuxError, ValueError) as exc:  # e.g. the options changed: wait for a fixed config
                    log.error("mail %s seq %d restored from the store cannot be sent: %s (it and the rest of "
                              "its channel stay in the outbox)", cid, frame.seq, exc)  # fmt: skip
                    break
                log.info("mail %s seq %d: resumed after restart", cid, frame.seq)
                self._queue(_Job(ctx, frame.seq, _ref_of(frame.payload), request, message, config))
