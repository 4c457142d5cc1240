"""A minimal TensorBoard event-file writer (and reader) for scalar summaries, with no dependencies.

TensorBoard reads `events.out.tfevents.*` files: a sequence of TFRecords, each holding one
serialized `tensorflow.Event` protocol buffer. We write only scalars, so we need three messages:

    Event        { double wall_time = 1; int64 step = 2; string file_version = 3;
                   Summary summary = 5; }
    Summary      { repeated Value value = 1; }
    Summary.Value{ string tag = 1; float simple_value = 2; }

encoded by hand below (protobuf wire format: a key byte (field << 3 | wire type), then a varint,
a little-endian fixed64/fixed32, or a length-prefixed byte string). The first event of a file
carries `file_version = "brain.Event:2"`.

TFRecord framing of each record:

    uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

with CRC-32C (Castagnoli) masked as ((crc >> 15 | crc << 17) + 0xa282ead8) mod 2³².

Rejected alternatives: tensorboard / tensorflow / tensorboardX (heavy or absent on the GPU
machine, and ours needs 1% of them) and the `protobuf` package (not a dependency; three messages
of scalars are a few lines of encoding). `read_events` decodes files back — CRCs checked — for the
tests and for anyone who wants the scalars without TensorBoard.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecords use. crc32c(b"123456789") == 0xE3069283."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields encode negatives as their two's complement
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def encode_event(
    wall_time: float,
    step: int = 0,
    scalars: dict[str, float] | None = None,
    file_version: str | None = None,
) -> bytes:
    """One serialized Event with scalar summary values."""
    out = bytearray(_varint(1 << 3 | 1) + struct.pack("<d", wall_time))
    out += _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(
            _field_bytes(
                1,
                _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value),
            )
            for tag, value in scalars.items()
        )
        out += _field_bytes(5, values)
    return bytes(out)


def frame_record(data: bytes) -> bytes:
    """TFRecord framing: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


class EventWriter:
    """Appends scalar events to a new `events.out.tfevents.*` file in `logdir`."""

    def __init__(self, logdir: str | os.PathLike):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = logdir / name
        self._file = self.path.open("ab")
        self._file.write(frame_record(encode_event(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._file.write(frame_record(encode_event(time.time(), step, values)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


# Reading -------------------------------------------------------------------------------------------


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message; value is int, float or bytes."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = struct.unpack("<d", buf[i : i + 8])[0], i + 8
        elif wire == 5:
            value, i = struct.unpack("<f", buf[i : i + 4])[0], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def decode_event(data: bytes) -> dict:
    """{"wall_time", "step", "file_version"?, "scalars": {tag: value}} of one serialized Event."""
    event: dict = {"step": 0, "scalars": {}}
    for field, _, value in _fields(data):
        if field == 1:
            event["wall_time"] = value
        elif field == 2:
            event["step"] = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 3:
            event["file_version"] = value.decode()
        elif field == 5:
            for f, _, v in _fields(value):
                if f == 1:
                    parts = {ff: vv for ff, _, vv in _fields(v)}
                    event["scalars"][parts[1].decode()] = parts[2]
    return event


def read_records(path: str | os.PathLike) -> list[bytes]:
    """The records of a TFRecord file, every CRC checked (ValueError naming the offset)."""
    raw = Path(path).read_bytes()
    out, i = [], 0
    while i < len(raw):
        header = raw[i : i + 8]
        if len(header) < 8:
            raise ValueError(f"{path}: truncated record header at byte {i}")
        (n,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", raw[i + 8 : i + 12])
        if crc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        data = raw[i + 12 : i + 12 + n]
        (dcrc,) = struct.unpack("<I", raw[i + 12 + n : i + 16 + n])
        if len(data) < n or dcrc != masked_crc32c(data):
            raise ValueError(f"{path}: bad data CRC at byte {i}")
        out.append(data)
        i += 16 + n
    return out


def read_events(path: str | os.PathLike) -> list[dict]:
    """All events of an event file, decoded."""
    return [decode_event(r) for r in read_records(path)]
