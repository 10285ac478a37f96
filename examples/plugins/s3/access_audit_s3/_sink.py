"""``S3Sink``: one NDJSON object per committed transaction."""

from __future__ import annotations

import gzip as gzip_module
from collections.abc import Sequence
from datetime import timezone
from typing import TYPE_CHECKING, Any, Protocol, cast

from access_audit import hookimpl

if TYPE_CHECKING:
    from access_audit import AuditEventEnvelope

__all__ = ["DEFAULT_PREFIX", "S3Client", "S3Sink", "object_key"]

DEFAULT_PREFIX = "audit"
"""The key prefix used when none is configured."""

CONTENT_TYPE = "application/x-ndjson"


class S3Client(Protocol):
    """The one method of a boto3 S3 client that the sink calls."""

    def put_object(
        self,
        *,
        Bucket: str,
        Key: str,
        Body: bytes,
        ContentType: str = ...,
        ContentEncoding: str = ...,
    ) -> Any:
        """Store *Body* as the object *Key* in *Bucket*."""


def normalize_prefix(prefix: str) -> str:
    """Strip the slashes around *prefix*; ``""`` puts keys at the bucket's root."""
    return prefix.strip("/")


def object_key(
    envelopes: Sequence[AuditEventEnvelope],
    *,
    prefix: str = DEFAULT_PREFIX,
    gzip: bool = False,
) -> str:
    """Return the key a batch is stored under.

    ``{prefix}/YYYY/MM/DD/HH/{transaction_id}.ndjson`` (``.ndjson.gz`` with
    *gzip*), the date and hour being the batch's commit time in UTC (a naive
    timestamp is taken as UTC). Every event of a batch shares its
    ``transaction_id`` and commit time, so a batch always maps to one key.
    A slice of a transaction after its first (the relay delivers one larger
    than its batch in slices) adds its first event's sequence,
    ``{transaction_id}-{sequence}.ndjson``, so that slices never overwrite
    each other, and a slice delivered again overwrites itself.

    :raises ValueError: *envelopes* is empty.
    """
    if not envelopes:
        raise ValueError("object_key: a batch needs at least one envelope")
    first = envelopes[0]
    committed = first.timestamp
    if committed.tzinfo is None:
        committed = committed.replace(tzinfo=timezone.utc)
    committed = committed.astimezone(timezone.utc)
    suffix = ".ndjson.gz" if gzip else ".ndjson"
    slice_ = f"-{first.sequence}" if first.sequence else ""
    name = f"{committed:%Y/%m/%d/%H}/{first.transaction_id}{slice_}{suffix}"
    prefix = normalize_prefix(prefix)
    return f"{prefix}/{name}" if prefix else name


def encode_batch(envelopes: Sequence[AuditEventEnvelope], *, gzip: bool) -> bytes:
    """Return the object's body: one :meth:`to_json` line per event, in order.

    Each line ends with ``\\n`` (JSON escapes newlines inside strings, so a
    line is always one whole event). Gzip output carries no timestamp, so the
    same batch always encodes to the same bytes.
    """
    data = "".join(envelope.to_json() + "\n" for envelope in envelopes).encode()
    return gzip_module.compress(data, mtime=0) if gzip else data


def make_client(endpoint_url: str | None = None) -> S3Client:
    """Create a boto3 S3 client with bounded timeouts and retries.

    Credentials and region come from boto3's usual chain (environment,
    shared config files, instance roles). The sink runs in the thread that
    committed, so a connection is given up after 5 s, a response after 30 s,
    and a request is tried at most 3 times (boto3's "standard" retry mode).
    """
    # boto3 ships no type information (boto3-stubs adds it, if installed).
    import boto3  # type: ignore[import-untyped,unused-ignore]
    from botocore.config import Config  # type: ignore[import-untyped,unused-ignore]

    config = Config(
        connect_timeout=5,
        read_timeout=30,
        retries={"mode": "standard", "max_attempts": 3},
    )
    # A session per client: boto3's default session is not safe to create
    # clients from in several threads at once.
    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, config=config
    )
    return cast("S3Client", client)


class S3Sink:
    """Write each committed transaction's events to one S3 object.

    The object is ``s3://{bucket}/{prefix}/YYYY/MM/DD/HH/{transaction_id}.ndjson``
    (see :func:`object_key`): one line per event, the envelope's
    :meth:`~access_audit.AuditEventEnvelope.to_json`, in staging order, with
    ``Content-Type: application/x-ndjson``. With *gzip* the key ends in
    ``.ndjson.gz`` and the body is gzip-compressed, stored with
    ``Content-Encoding: gzip`` (boto3's ``get_object`` returns the compressed
    bytes as stored; HTTP clients that honour the header may decompress).

    Guarantees:

    - One ``PutObject`` per batch, made in the hook
      (``audit_events_committed``), after the database COMMIT: an object
      exists only for a transaction that committed, and a rolled-back one
      writes nothing.
    - The hook returns only once S3 acknowledged the object. A failure
      (missing bucket, access denied, timeout after the client's retries)
      raises out of the hook: access_audit logs it, reports it through
      ``audit_delivery_failed``, and the commit itself still succeeds.
    - Idempotent: the key is the transaction's id and the body is the same
      bytes for the same batch, so delivering a batch again (an at-least-once
      relay) overwrites the object with identical content instead of adding a
      duplicate. Consumers that merge objects de-duplicate events by ``id``.

    :param bucket: the bucket's name; it must exist.
    :param prefix: the key prefix; surrounding slashes are dropped, ``""``
        writes at the bucket's root.
    :param gzip: compress each object.
    :param client: a boto3 S3 client to use (your own credentials, region,
        retries, or a test server); if None one is made with
        :func:`make_client`.
    :param endpoint_url: for the client the sink makes: an S3-compatible
        endpoint (MinIO, a local test server). Ignored when *client* is given.
    :raises ValueError: *bucket* is empty.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        gzip: bool = False,
        client: S3Client | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("S3Sink: bucket must be a non-empty bucket name")
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        self.gzip = gzip
        self.client = client if client is not None else make_client(endpoint_url)

    def __repr__(self) -> str:
        return (
            f"<S3Sink bucket={self.bucket!r} prefix={self.prefix!r} gzip={self.gzip}>"
        )

    def key_for(self, envelopes: Sequence[AuditEventEnvelope]) -> str:
        """Return the key *envelopes* (one committed batch) are written to."""
        return object_key(envelopes, prefix=self.prefix, gzip=self.gzip)

    @hookimpl
    def audit_events_committed(self, envelopes: Sequence[AuditEventEnvelope]) -> None:
        """Put *envelopes* into one object; raise if S3 does not store it."""
        if not envelopes:
            return
        encoding = {"ContentEncoding": "gzip"} if self.gzip else {}
        self.client.put_object(
            Bucket=self.bucket,
            Key=self.key_for(envelopes),
            Body=encode_batch(envelopes, gzip=self.gzip),
            ContentType=CONTENT_TYPE,
            **encoding,
        )
