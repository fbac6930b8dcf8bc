"""How Meerkat's wire messages ride in Flower `Message`s, and what those messages weigh.

The protocol's bytes are produced and checked by `federated.protocol.codec` only; this module just puts
them into Flower records and takes them out again. Every Flower record is a separate object
on the wire with its own ~140-byte header and reference, so each message uses one
`ConfigRecord` (``"meerkat"``) where it can:

* downlink (server -> client, message type ``train``): ``{"round", "downlink": <codec bytes>}``,
  plus ``"client-state"`` once the server has heard from the client: its data pointer as the
  client last reported it (see `CLIENT_STATE_FIELDS`). A Flower `Context` lives as long as one
  run on one SuperNode, so a resumed run (after a SuperLink restart) or a restarted SuperNode
  starts with an empty one; such a client continues from this copy, exactly as a resumed
  in-process run continues from the client states in its checkpoint.
  A downlink larger than `INLINE_LIMIT` (a dense k-vector of a large mask) instead travels as
  a uint8 `Array` in the `ArrayRecord` ``"meerkat.downlink"``, which Flower splits into 5 MiB
  chunks, so it never meets a gRPC message-size limit.
* uplink (client -> server, the reply): ``{"status": "ok", "uplink": <codec bytes>}`` (52 + 4*T*q
  bytes; the first-order baseline's dense delta, when larger than `INLINE_LIMIT`, rides in the
  `ArrayRecord` ``"meerkat.uplink"`` instead) plus two diagnostics the protocol does not need: ``"loss"`` (mean local train loss)
  and ``"digest"`` (8-byte digest of the client's own final state, compared with the server's
  replay), and ``"client-state"``, the client's new data pointer (the server keeps it for the
  downlinks above and its checkpoints). ``{"status": "need-dense", "reason"}`` when the client could not rebuild the
  round's state from a records downlink (the server then sends the dense state).
* hello (message type ``query``): the client's Meerkat id, example count and mask checksum, so
  the server can map Flower node ids to the client ids that step seeds are derived from.

`message_nbytes` measures a message the way Flower ships it: the serialized bytes of the
message object and every nested object (record dict, records, arrays, array chunks), i.e.
the payloads Flower pushes/pulls, without the gRPC/HTTP framing around them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from ..protocol.client import ClientState

META = "meerkat"
DOWNLINK = "meerkat.downlink"
UPLINK = "meerkat.uplink"

STATUS_OK = "ok"
STATUS_NEED_DENSE = "need-dense"
STATUS_HELLO = "hello"


def message_nbytes(message: Message) -> int:
    """Serialized size of a Flower message: the message object plus all nested objects."""
    # flwr's internal API (not its public one): imported only where the bytes are counted
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def records_nbytes(content: RecordDict) -> int:
    """Flower's own payload count (`record.count_bytes()`, as `message_size_mod` logs it)."""
    return sum(record.count_bytes() for record in content.values())


# -- the client's data pointer ------------------------------------------------------------------
# `ClientState` without `synced_round` (which global state a client holds is its own business: it
# follows from its cache). Travels as a list of ints in this order.
CLIENT_STATE_FIELDS = tuple(f.name for f in dataclasses.fields(ClientState) if f.name != "synced_round")


def client_state_values(state: ClientState | dict) -> list[int]:
    d = state.to_dict() if isinstance(state, ClientState) else state
    return [int(d[name]) for name in CLIENT_STATE_FIELDS]


def read_client_state(meta) -> dict[str, int] | None:
    """The ``"client-state"`` of a downlink or reply, or None if absent or malformed (never trusted blindly)."""
    values = meta.get("client-state") if meta is not None else None
    if (not isinstance(values, list) or len(values) != len(CLIENT_STATE_FIELDS)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)):
        return None
    return dict(zip(CLIENT_STATE_FIELDS, values))


# -- downlink ----------------------------------------------------------------------------------
INLINE_LIMIT = 1 << 20  # bytes; larger downlinks go into a chunked ArrayRecord


def downlink_content(data: bytes, round_id: int, client_state: dict[str, int] | None = None) -> RecordDict:
    meta: dict = {"round": int(round_id)}
    if client_state is not None:
        meta["client-state"] = client_state_values(client_state)
    if len(data) <= INLINE_LIMIT:
        return RecordDict({META: ConfigRecord({**meta, "downlink": bytes(data)})})
    return RecordDict({
        META: ConfigRecord(meta),
        DOWNLINK: ArrayRecord({"bytes": Array(np.frombuffer(data, dtype=np.uint8))}),
    })


def read_downlink(content: RecordDict) -> tuple[bytes, int]:
    """(codec bytes, round) of a downlink; `KeyError`/`TypeError` if it is not one."""
    meta = content[META]
    if "downlink" in meta:
        data = meta["downlink"]
        if not isinstance(data, bytes):
            raise TypeError(f"downlink is {type(data).__name__}, not bytes")
    else:
        data = np.asarray(content[DOWNLINK]["bytes"].numpy(), dtype=np.uint8).tobytes()
    return data, int(meta["round"])


# -- uplink (the train reply) ------------------------------------------------------------------
def uplink_content(uplinks: list[bytes], *, mean_loss: float | None = None, final_digest: bytes = b"",
                   client_state: ClientState | None = None) -> RecordDict:
    """A train reply. Normally one uplink (``"uplink"``); fault-injection hooks may turn it into
    none or several (``"uplinks"``), which the server then validates one by one."""
    meta: dict = {"status": STATUS_OK}
    arrays = None
    if len(uplinks) == 1 and len(uplinks[0]) > INLINE_LIMIT:  # a first-order baseline's dense delta
        arrays = ArrayRecord({"bytes": Array(np.frombuffer(bytes(uplinks[0]), dtype=np.uint8))})
    elif len(uplinks) == 1:
        meta["uplink"] = bytes(uplinks[0])
    elif uplinks:
        meta["uplinks"] = [bytes(u) for u in uplinks]
    if mean_loss is not None and np.isfinite(mean_loss):
        meta["loss"] = float(mean_loss)
    if final_digest:
        meta["digest"] = bytes(final_digest)
    if client_state is not None:
        meta["client-state"] = client_state_values(client_state)
    content = RecordDict({META: ConfigRecord(meta)})
    if arrays is not None:
        content[UPLINK] = arrays
    return content


def need_dense_content(reason: str, detail: str = "") -> RecordDict:
    return RecordDict({META: ConfigRecord({"status": STATUS_NEED_DENSE, "reason": reason, "detail": detail})})


@dataclass
class Reply:
    """A train reply, taken apart without trusting it (the codec validates the uplinks themselves)."""

    status: str
    uplinks: list = field(default_factory=list)
    reason: str = ""
    detail: str = ""
    mean_loss: float = float("nan")
    final_digest: bytes = b""
    client_state: dict[str, int] | None = None  # the client's new data pointer (None: not reported)


def read_reply(content: RecordDict) -> Reply:
    """Never raises: a reply without the expected record becomes status ``malformed``."""
    try:
        meta = content[META]
        status = str(meta["status"])
    except (KeyError, TypeError) as err:
        return Reply("malformed", reason="malformed-reply", detail=f"no {META!r} ConfigRecord with a status ({err})")
    if status == STATUS_NEED_DENSE:
        return Reply(status, reason=str(meta.get("reason", "")), detail=str(meta.get("detail", "")))
    if status != STATUS_OK:
        return Reply("malformed", reason="malformed-reply", detail=f"unknown status {status!r}")
    uplinks = [meta["uplink"]] if "uplink" in meta else list(meta.get("uplinks", []))
    if not uplinks and UPLINK in content.array_records:
        try:
            uplinks = [np.asarray(content.array_records[UPLINK]["bytes"].numpy(), dtype=np.uint8).tobytes()]
        except (KeyError, TypeError, ValueError) as err:
            return Reply("malformed", reason="malformed-reply", detail=f"unreadable {UPLINK!r} ArrayRecord ({err})")
    bad = [type(u).__name__ for u in uplinks if not isinstance(u, bytes)]
    if bad:
        return Reply("malformed", reason="malformed-reply", detail=f"uplink is {bad[0]}, not bytes")
    loss = meta.get("loss", float("nan"))
    digest = meta.get("digest", b"")
    return Reply(status, uplinks=uplinks, mean_loss=float(loss) if isinstance(loss, (int, float)) else float("nan"),
                 final_digest=digest if isinstance(digest, bytes) else b"", client_state=read_client_state(meta))


# -- hello (query) -----------------------------------------------------------------------------
def hello_content(client_id: int, num_examples: int, mask_checksum: str) -> RecordDict:
    return RecordDict({META: ConfigRecord({"status": STATUS_HELLO, "client-id": int(client_id),
                                           "num-examples": int(num_examples), "mask-checksum": str(mask_checksum)})})


def read_hello(content: RecordDict) -> tuple[int, int, str]:
    meta = content[META]
    if meta.get("status") != STATUS_HELLO:
        raise ValueError(f"not a hello reply (status {meta.get('status')!r})")
    return int(meta["client-id"]), int(meta["num-examples"]), str(meta["mask-checksum"])
