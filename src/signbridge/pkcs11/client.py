"""A pure-Python PKCS#11 client over p11-kit's RPC protocol.

It talks to signbridge's token server, to ``p11-kit server`` sockets, or to ``p11-kit remote``
over stdio (:meth:`Pkcs11Client.spawn`). One client is one PKCS#11 application: it initializes on
connect, keeps one read-only session per slot, and finalizes on :meth:`close`. Not thread-safe.

    with Pkcs11Client.connect("/run/user/1000/signbridge/pkcs11") as client:
        client.login(b"CONFIG")
        key = client.objects(object_class=CKO.PRIVATE_KEY, label="release")[0]
        signature = client.sign(key, CKM.RSA_PKCS, digest_info)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..crypto.hashes import HashAlgorithm
from .calls import HANDSHAKE, PROTOCOL_VERSION_MAX, Call
from .constants import CKA, CKF, CKM, CKO, CKR, CKU, name
from .errors import ConnectionLostError, Pkcs11Error, ProtocolError
from .objects import AttributeView
from .signing import MechanismInfo, pss_params
from .wire import (
    FRAME_HEADER,
    PSS_MECHANISMS,
    AttributeRequest,
    AttributeValue,
    Kind,
    Mechanism,
    MechanismLayout,
    MechanismParameter,
    Reader,
    WireAttribute,
    Writer,
    attribute_kind,
    encode_frame,
)

DEFAULT_ATTRIBUTES = (CKA.CLASS, CKA.ID, CKA.LABEL, CKA.KEY_TYPE, CKA.CERTIFICATE_TYPE)
MAX_RESPONSE = 64 * 1024 * 1024
SIGNATURE_CAPACITY = 8192  # bytes: RSA-65536 or any ECDSA signature fits

_PSS_HASH_BY_MECHANISM = {
    CKM.SHA1_RSA_PKCS_PSS: HashAlgorithm.SHA1,
    CKM.SHA224_RSA_PKCS_PSS: HashAlgorithm.SHA224,
    CKM.SHA256_RSA_PKCS_PSS: HashAlgorithm.SHA256,
    CKM.SHA384_RSA_PKCS_PSS: HashAlgorithm.SHA384,
    CKM.SHA512_RSA_PKCS_PSS: HashAlgorithm.SHA512,
}
_SESSIONS_GONE = {CKR.SESSION_HANDLE_INVALID, CKR.SESSION_CLOSED, CKR.TOKEN_NOT_PRESENT, CKR.DEVICE_REMOVED}
_HASH_BY_SIZE = {
    algorithm.digest_size: algorithm for algorithm in HashAlgorithm if algorithm is not HashAlgorithm.MD5
}


@dataclass(frozen=True)
class LibraryInfo:
    cryptoki_version: tuple[int, int]
    manufacturer: str
    flags: int
    description: str
    library_version: tuple[int, int]


@dataclass(frozen=True)
class TokenInfo:
    label: str
    manufacturer: str
    model: str
    serial: str
    flags: int
    max_session_count: int
    session_count: int
    max_rw_session_count: int
    rw_session_count: int
    max_pin_length: int
    min_pin_length: int
    hardware_version: tuple[int, int]
    firmware_version: tuple[int, int]

    @property
    def login_required(self) -> bool:
        return bool(self.flags & CKF.LOGIN_REQUIRED)

    @property
    def write_protected(self) -> bool:
        return bool(self.flags & CKF.WRITE_PROTECTED)


@dataclass(frozen=True)
class Pkcs11Object(AttributeView):
    """An object found on a token, with the attributes read so far (absent ones are left out)."""

    slot: int
    handle: int
    attributes: Mapping[int, AttributeValue] = field(default_factory=dict)

    @property
    def object_class(self) -> int | None:
        return self.attributes.get(CKA.CLASS)  # type: ignore[return-value]

    @property
    def key_type(self) -> int | None:
        return self.attributes.get(CKA.KEY_TYPE)  # type: ignore[return-value]


class _Stream:
    """Bytes in both directions: a Unix socket, or a child's stdin/stdout."""

    def __init__(self, sock: socket.socket | None = None, process: subprocess.Popen | None = None) -> None:
        self.sock = sock
        self.process = process

    def send(self, data: bytes) -> None:
        if self.sock is not None:
            self.sock.sendall(data)
        else:
            assert self.process is not None and self.process.stdin is not None
            self.process.stdin.write(data)
            self.process.stdin.flush()

    def recv_exact(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            if self.sock is not None:
                chunk = self.sock.recv(min(size - len(chunks), 1 << 20))
            else:
                assert self.process is not None and self.process.stdout is not None
                chunk = self.process.stdout.read1(size - len(chunks))
            if not chunk:
                raise EOFError("the token closed the connection")
            chunks += chunk
        return bytes(chunks)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.process is not None:
            for pipe in (self.process.stdin, self.process.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Pkcs11Client:
    """One PKCS#11 application talking to one p11-kit RPC server."""

    def __init__(self, stream: _Stream, version: int) -> None:
        self._stream = stream
        self.version = version
        self.layout = MechanismLayout.for_version(version)
        self._codes = itertools.count(0x10)
        self._sessions: dict[int, int] = {}
        self._initialize()

    # --- connecting -------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        version: int = PROTOCOL_VERSION_MAX,
        timeout: float | None = 120.0,
    ) -> Pkcs11Client:
        """Connect to a server socket. Servers that only speak version 0 get a second try with 0."""

        def opener() -> _Stream:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(os.fspath(path))
            except OSError as exc:
                sock.close()
                raise Pkcs11Error(
                    CKR.DEVICE_REMOVED, f"no token is listening on {os.fspath(path)}: {exc.strerror}"
                ) from None
            return _Stream(sock=sock)

        return cls._negotiate(opener, version)

    @classmethod
    def spawn(
        cls, argv: Sequence[str], *, version: int = PROTOCOL_VERSION_MAX, env: Mapping[str, str] | None = None
    ) -> Pkcs11Client:
        """Run a server that speaks on stdin/stdout, e.g. ``p11-kit remote <module>``."""

        def opener() -> _Stream:
            environment = None if env is None else dict(env)
            pipe = subprocess.PIPE
            process = subprocess.Popen(list(argv), stdin=pipe, stdout=pipe, env=environment)
            return _Stream(process=process)

        return cls._negotiate(opener, version)

    @classmethod
    def _negotiate(cls, opener, version: int) -> Pkcs11Client:
        for offer in dict.fromkeys((version, 0)):
            stream = opener()
            try:
                stream.send(bytes([offer]))
                answer = stream.recv_exact(1)[0]
            except (EOFError, OSError):
                stream.close()
                continue
            if answer > offer:
                stream.close()
                raise ProtocolError(f"the server answered protocol version {answer} to an offer of {offer}")
            return cls(stream, answer)
        raise Pkcs11Error(CKR.DEVICE_ERROR, "the token server closed the connection during the handshake")

    def close(self) -> None:
        """C_Finalize and disconnect."""
        with contextlib.suppress(Pkcs11Error, EOFError, OSError):
            self._call(Writer(Call.C_Finalize, response=False)).done()
        self._stream.close()

    def __enter__(self) -> Pkcs11Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the RPC ----------------------------------------------------------------------------

    def _request(self, call: Call) -> Writer:
        return Writer(call, response=False)

    def _call(self, request: Writer) -> Reader:
        call = request.call
        code = next(self._codes)
        try:
            self._stream.send(encode_frame(code, request.getvalue(), b"client"))
            header = self._stream.recv_exact(FRAME_HEADER.size)
            answer_code, options_length, body_length = FRAME_HEADER.unpack(header)
            if answer_code != code:
                raise ProtocolError(f"{call.name}: the answer is for request {answer_code}, not {code}")
            if options_length > 4096 or body_length > MAX_RESPONSE:
                raise ProtocolError(f"{call.name}: the answer is too large")
            self._stream.recv_exact(options_length)
            body = self._stream.recv_exact(body_length)
        except (EOFError, OSError) as exc:
            raise ConnectionLostError(f"{call.name}: lost the token connection ({exc})") from None
        try:
            return Reader.response(body, call)
        except ProtocolError:
            raise
        except Pkcs11Error as exc:
            if exc.ckr in _SESSIONS_GONE:
                self._sessions.clear()  # the next call opens a fresh session
            raise Pkcs11Error(exc.ckr, f"{call.name} failed: {exc.ckr_name}") from None

    def _initialize(self) -> None:
        request = self._request(Call.C_Initialize).byte_array(HANDSHAKE).byte(0).byte_array(None, 0)
        self._call(request).done()

    # --- library, slots, tokens, mechanisms -------------------------------------------------

    def info(self) -> LibraryInfo:
        r = self._call(self._request(Call.C_GetInfo))
        info = LibraryInfo(
            r.version(), _text(r.space_string(32)), r.ulong(), _text(r.space_string(32)), r.version()
        )
        r.done()
        return info

    def slots(self, token_present: bool = True) -> list[int]:
        request = self._request(Call.C_GetSlotList).byte(token_present)
        count = self._count(self._call(request.ulong_buffer(0)))
        if count == 0:
            return []
        r = self._call(self._request(Call.C_GetSlotList).byte(token_present).ulong_buffer(count))
        values, _ = r.ulong_array()
        r.done()
        return values or []


    def token_info(self, slot: int) -> TokenInfo:
        r = self._call(self._request(Call.C_GetTokenInfo).ulong(slot))
        texts = [_text(r.space_string(width)) for width in (32, 32, 16, 16)]
        numbers = [r.ulong() for _ in range(7)]
        for _ in range(4):
            r.ulong()  # memory sizes
        hardware, firmware = r.version(), r.version()
        r.space_string(16)
        r.done()
        return TokenInfo(*texts, *numbers, hardware, firmware)

    def mechanisms(self, slot: int) -> list[int]:
        count = self._count(self._call(self._request(Call.C_GetMechanismList).ulong(slot).ulong_buffer(0)))
        if count == 0:
            return []
        r = self._call(self._request(Call.C_GetMechanismList).ulong(slot).ulong_buffer(count))
        values, _ = r.ulong_array()
        r.done()
        return values or []

    def mechanism_info(self, slot: int, mechanism: int) -> MechanismInfo:
        r = self._call(self._request(Call.C_GetMechanismInfo).ulong(slot).ulong(mechanism))
        info = MechanismInfo(r.ulong(), r.ulong(), r.ulong())
        r.done()
        return info

    @staticmethod
    def _count(r: Reader) -> int:
        _, count = r.ulong_array()
        r.done()
        return count

    # --- sessions and login -----------------------------------------------------------------

    def _slot(self, slot: int | None) -> int:
        if slot is not None:
            return slot
        slots = self.slots()
        if len(slots) != 1:
            raise Pkcs11Error(CKR.SLOT_ID_INVALID, f"there are {len(slots)} tokens; say which slot to use")
        return slots[0]

    def session(self, slot: int | None = None) -> int:
        """The client's read-only session on ``slot``, opened on first use."""
        slot = self._slot(slot)
        if slot not in self._sessions:
            r = self._call(self._request(Call.C_OpenSession).ulong(slot).ulong(CKF.SERIAL_SESSION))
            self._sessions[slot] = r.ulong()
            r.done()
        return self._sessions[slot]

    def login(self, pin: bytes | str, slot: int | None = None) -> None:
        """C_Login as the user; an already logged-in session is fine."""
        secret = pin.encode("utf-8") if isinstance(pin, str) else bytes(pin)
        request = self._request(Call.C_Login).ulong(self.session(slot)).ulong(CKU.USER).byte_array(secret)
        try:
            self._call(request).done()
        except Pkcs11Error as exc:
            if exc.ckr == CKR.USER_ALREADY_LOGGED_IN:
                return
            if exc.ckr == CKR.PIN_INCORRECT:
                raise Pkcs11Error(exc.ckr, "the token did not accept the PIN (CKR_PIN_INCORRECT)") from None
            raise

    def logout(self, slot: int | None = None) -> None:
        self._call(self._request(Call.C_Logout).ulong(self.session(slot))).done()

    # --- objects ----------------------------------------------------------------------------

    def objects(
        self,
        slot: int | None = None,
        *,
        attributes: Iterable[int] = DEFAULT_ATTRIBUTES,
        template: Mapping[int, AttributeValue] | None = None,
        object_class: int | None = None,
        label: str | None = None,
        id: bytes | None = None,
        key_type: int | None = None,
    ) -> list[Pkcs11Object]:
        """Objects matching the filters, each with ``attributes`` read."""
        slot = self._slot(slot)
        wanted = dict(template or {})
        for attribute_type, value in (
            (CKA.CLASS, object_class),
            (CKA.LABEL, None if label is None else label.encode("utf-8")),
            (CKA.ID, id),
            (CKA.KEY_TYPE, key_type),
        ):
            if value is not None:
                wanted[attribute_type] = value
        session = self.session(slot)
        find = self._request(Call.C_FindObjectsInit).ulong(session)
        find.attribute_array(WireAttribute.of(t, _wire_value(t, v)) for t, v in wanted.items())
        self._call(find).done()
        handles: list[int] = []
        try:
            while True:
                r = self._call(self._request(Call.C_FindObjects).ulong(session).ulong_buffer(64))
                batch, _ = r.ulong_array()
                r.done()
                if not batch:
                    break
                handles.extend(batch)
        finally:
            self._call(self._request(Call.C_FindObjectsFinal).ulong(session)).done()
        types = list(attributes)
        return [Pkcs11Object(slot, handle, self.attributes(handle, types, slot=slot)) for handle in handles]

    def attributes(
        self, obj: Pkcs11Object | int, types: Iterable[int], *, slot: int | None = None
    ) -> dict[int, AttributeValue]:
        """The values of ``types`` the object has (sizes first, then values)."""
        handle, slot = (obj.handle, obj.slot) if isinstance(obj, Pkcs11Object) else (obj, slot)
        session = self.session(slot)
        types = list(types)
        if not types:
            return {}
        sizes = self._get_attributes(session, handle, [AttributeRequest(t, 0) for t in types])
        present = [AttributeRequest(a.type, max(a.length or 0, 1)) for a in sizes if a.length is not None]
        if not present:
            return {}
        values = self._get_attributes(session, handle, present)
        return {a.type: _python_value(a) for a in values if a.length is not None}

    def _get_attributes(
        self, session: int, handle: int, requests: list[AttributeRequest]
    ) -> list[WireAttribute]:
        request = self._request(Call.C_GetAttributeValue).ulong(session).ulong(handle)
        r = self._call(request.attribute_buffer(requests))
        answers = r.attribute_array()
        rv = r.ulong()
        r.done()
        if [a.type for a in answers] != [q.type for q in requests]:
            raise ProtocolError("C_GetAttributeValue answered other attributes than were asked")
        if rv not in (CKR.OK, CKR.ATTRIBUTE_TYPE_INVALID, CKR.ATTRIBUTE_SENSITIVE):
            raise Pkcs11Error(rv, f"C_GetAttributeValue failed: {name('CKR', rv)}")
        return answers

    # --- signing ----------------------------------------------------------------------------

    def sign(
        self,
        key: Pkcs11Object | int,
        mechanism: int | Mechanism,
        data: bytes,
        params: MechanismParameter = None,
        *,
        slot: int | None = None,
    ) -> bytes:
        """C_SignInit + C_Sign. PSS parameters default to MGF1 of the hash and a hash-sized salt
        (the hash comes from the mechanism, or for CKM_RSA_PKCS_PSS from the digest's length)."""
        session = self._sign_init(key, mechanism, params, slot, len(data))
        return self._signature(Call.C_Sign, session, data)

    def sign_parts(
        self,
        key: Pkcs11Object | int,
        mechanism: int | Mechanism,
        parts: Iterable[bytes],
        params: MechanismParameter = None,
        *,
        slot: int | None = None,
    ) -> bytes:
        """C_SignInit + C_SignUpdate per part + C_SignFinal."""
        parts = list(parts)
        session = self._sign_init(key, mechanism, params, slot, sum(len(part) for part in parts))
        for part in parts:
            self._call(self._request(Call.C_SignUpdate).ulong(session).byte_array(part)).done()
        return self._signature(Call.C_SignFinal, session, None)

    def _sign_init(
        self,
        key: Pkcs11Object | int,
        mechanism: int | Mechanism,
        params: MechanismParameter,
        slot: int | None,
        data_length: int | None,
    ) -> int:
        handle, slot = (key.handle, key.slot) if isinstance(key, Pkcs11Object) else (key, slot)
        if not isinstance(mechanism, Mechanism):
            mechanism = Mechanism(int(mechanism), params)
        if mechanism.type in PSS_MECHANISMS and mechanism.parameter is None:
            algorithm = _PSS_HASH_BY_MECHANISM.get(mechanism.type) or _HASH_BY_SIZE.get(data_length or 0)
            if algorithm is None:
                raise Pkcs11Error(CKR.MECHANISM_PARAM_INVALID, "say which hash the PSS parameters are for")
            mechanism = Mechanism(mechanism.type, pss_params(algorithm))
        session = self.session(slot)
        request = self._request(Call.C_SignInit).ulong(session).mechanism(mechanism, self.layout)
        self._call(request.ulong(handle)).done()
        return session

    def _signature(self, call: Call, session: int, data: bytes | None) -> bytes:
        capacity = SIGNATURE_CAPACITY
        while True:
            request = self._request(call).ulong(session)
            if call is Call.C_Sign:
                request.byte_array(data)
            r = self._call(request.byte_buffer(capacity))
            signature, length = r.byte_array()
            r.done()
            if signature is not None:
                return signature
            if length <= capacity:
                raise ProtocolError(f"{call.name}: the token asked for {length} bytes but had {capacity}")
            capacity = length

    # --- conveniences -----------------------------------------------------------------------

    def certificates(self, slot: int | None = None) -> list[Pkcs11Object]:
        """X.509 certificate objects with their DER in ``attributes[CKA.VALUE]``."""
        return self.objects(
            slot,
            object_class=CKO.CERTIFICATE,
            attributes=(*DEFAULT_ATTRIBUTES, CKA.VALUE, CKA.CERTIFICATE_CATEGORY),
        )


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip(" \0")


def _wire_value(attribute_type: int, value: AttributeValue) -> AttributeValue:
    if attribute_kind(attribute_type) is Kind.BYTE:
        return bool(value)
    return value


def _python_value(attribute: WireAttribute) -> AttributeValue:
    kind = attribute_kind(attribute.type)
    if kind is Kind.BYTE:
        return bool(attribute.value)
    if kind in (Kind.BYTE_ARRAY, Kind.DATE):
        return bytes(attribute.value or b"")  # type: ignore[arg-type]
    return attribute.value  # type: ignore[return-value]
