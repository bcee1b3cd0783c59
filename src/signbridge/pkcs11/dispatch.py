"""The server side of one connection: its sessions, login state and answer to every call.

One :class:`Connection` per consumer process (p11-kit-client connects in C_Initialize and
disconnects in C_Finalize). Handles, sessions and the login state live here, so nothing leaks
between processes. Calls are answered in order; :meth:`Connection.handle` takes a request body
and returns the response body, raising :class:`ProtocolError` only when the connection must close.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .. import __version__
from .calls import HANDSHAKE, Call
from .constants import CK_UNAVAILABLE_INFORMATION, CKA, CKF, CKO, CKR, CKS, CKU, name
from .errors import MechanismUnsupported, Pkcs11Error, ProtocolError
from .objects import TokenObject
from .peer import CallerInfo
from .signing import SIGN_MECHANISMS, SignOperation, finish_signature
from .token import Token
from .wire import (
    AttributeRequest,
    Kind,
    Mechanism,
    MechanismLayout,
    Reader,
    UnknownCall,
    WireAttribute,
    Writer,
    attribute_kind,
    error_body,
    raw_bytes,
    value_length,
)

log = logging.getLogger("signbridge.pkcs11")

SlotTable = Callable[[], Mapping[int, Token]]

_VERSION = tuple(int(part) for part in __version__.split(".")[:2])
_SIGN_TYPES = frozenset(SIGN_MECHANISMS)
_SECRET_ATTRIBUTES = frozenset({
    CKA.VALUE, CKA.PRIVATE_EXPONENT, CKA.PRIME_1, CKA.PRIME_2, CKA.EXPONENT_1, CKA.EXPONENT_2,
    CKA.COEFFICIENT,
})  # fmt: skip
# Calls that would change the token; every session is read-only.
_WRITE_CALLS = frozenset({
    Call.C_InitPIN, Call.C_SetPIN, Call.C_CreateObject, Call.C_CopyObject, Call.C_DestroyObject,
    Call.C_SetAttributeValue, Call.C_GenerateKey, Call.C_GenerateKeyPair, Call.C_UnwrapKey,
    Call.C_DeriveKey, Call.C_DeriveKey2,
})  # fmt: skip


@dataclass(eq=False)
class Session:
    handle: int
    slot: int
    token: Token
    flags: int
    found: list[int] | None = None  # handles still to return from an active C_FindObjects
    sign: SignOperation | None = None


class Connection:
    """PKCS#11 state of one client connection. Not thread-safe: one thread drives it."""

    def __init__(self, slots: SlotTable, caller: CallerInfo, version: int) -> None:
        self.slots = slots
        self.caller = caller
        self.version = version
        self.layout = MechanismLayout.for_version(version)
        self.sessions: dict[int, Session] = {}
        self.logged_in: dict[int, Token] = {}
        self._session_ids = itertools.count(1)
        self._object_ids = itertools.count(1)
        self._objects: dict[int, tuple[Token, TokenObject]] = {}
        self._handles: dict[int, int] = {}  # id(TokenObject) -> handle; _objects keeps them alive
        self._handlers: dict[Call, Callable[[Reader], Writer]] = {
            Call.C_Initialize: self._initialize,
            Call.C_Finalize: self._finalize,
            Call.C_GetInfo: self._get_info,
            Call.C_GetSlotList: self._get_slot_list,
            Call.C_GetSlotInfo: self._get_slot_info,
            Call.C_GetTokenInfo: self._get_token_info,
            Call.C_GetMechanismList: self._get_mechanism_list,
            Call.C_GetMechanismInfo: self._get_mechanism_info,
            Call.C_InitToken: self._init_token,
            Call.C_InitToken2: self._init_token,
            Call.C_OpenSession: self._open_session,
            Call.C_CloseSession: self._close_session,
            Call.C_CloseAllSessions: self._close_all_sessions,
            Call.C_GetSessionInfo: self._get_session_info,
            Call.C_Login: self._login,
            Call.C_LoginUser: self._login,
            Call.C_Logout: self._logout,
            Call.C_GetObjectSize: self._get_object_size,
            Call.C_GetAttributeValue: self._get_attribute_value,
            Call.C_FindObjectsInit: self._find_objects_init,
            Call.C_FindObjects: self._find_objects,
            Call.C_FindObjectsFinal: self._find_objects_final,
            Call.C_SignInit: self._sign_init,
            Call.C_Sign: self._sign,
            Call.C_SignUpdate: self._sign_update,
            Call.C_SignFinal: self._sign_final,
            Call.C_SessionCancel: self._session_cancel,
        }
        for call in _WRITE_CALLS:
            self._handlers[call] = self._read_only

    # --- entry point ------------------------------------------------------------------------

    def handle(self, body: bytes) -> bytes:
        try:
            reader = Reader.request(body)
        except UnknownCall as exc:
            log.debug("call id %d is unknown; answering CKR_FUNCTION_NOT_SUPPORTED", exc.call_id)
            return error_body(CKR.FUNCTION_NOT_SUPPORTED)
        handler = self._handlers.get(reader.call, self._not_supported)
        try:
            response = handler(reader).getvalue()
        except Pkcs11Error as exc:
            ckr = exc.ckr
            if ckr & 0xFFFF_FFFF in (CKR.OK, CKR.BUFFER_TOO_SMALL):  # not errors; never in an ERROR frame
                ckr = CKR.GENERAL_ERROR
            log.debug("%s -> %s (%s)", reader.call.name, name("CKR", ckr), exc)
            return error_body(ckr)
        log.debug("%s -> CKR_OK", reader.call.name)
        return response

    def close(self) -> None:
        self.sessions.clear()
        self.logged_in.clear()

    # --- helpers ----------------------------------------------------------------------------

    def _token(self, slot: int) -> Token:
        token = self.slots().get(slot)
        if token is None:
            raise Pkcs11Error(CKR.SLOT_ID_INVALID, f"there is no slot {slot}")
        return token

    def _session(self, handle: int) -> Session:
        session = self.sessions.get(handle)
        if session is None:
            raise Pkcs11Error(CKR.SESSION_HANDLE_INVALID, f"there is no session {handle}")
        if self.slots().get(session.slot) is not session.token:
            self._drop_sessions(session.slot)
            raise Pkcs11Error(CKR.SESSION_HANDLE_INVALID, "the token was replaced; open a new session")
        return session

    def _is_logged_in(self, session: Session) -> bool:
        return self.logged_in.get(session.slot) is session.token

    def _visible(self, session: Session, obj: TokenObject) -> bool:
        return not obj.private or self._is_logged_in(session)

    def _handle_of(self, token: Token, obj: TokenObject) -> int:
        handle = self._handles.get(id(obj))
        if handle is None:
            handle = next(self._object_ids)
            self._handles[id(obj)] = handle
            self._objects[handle] = (token, obj)
        return handle

    def _object(self, session: Session, handle: int, ckr: int = CKR.OBJECT_HANDLE_INVALID) -> TokenObject:
        token, obj = self._objects.get(handle, (None, None))
        if token is not session.token or obj is None or not self._visible(session, obj):
            raise Pkcs11Error(ckr, f"there is no object {handle} in this session")
        return obj

    def _drop_sessions(self, slot: int) -> None:
        for handle in [h for h, s in self.sessions.items() if s.slot == slot]:
            del self.sessions[handle]
        self.logged_in.pop(slot, None)

    @staticmethod
    def _response(call: Call) -> Writer:
        return Writer(call, response=True)

    @staticmethod
    def _ulongs(call: Call, values: list[int], capacity: int) -> Writer:
        """An ``au`` answer: the count alone for a size query or a too-small buffer."""
        if capacity == 0 or capacity < len(values):
            return Writer(call, response=True).ulong_array(None, len(values))
        return Writer(call, response=True).ulong_array(values)

    @staticmethod
    def _bytes_answer(call: Call, capacity: int | None, size: int) -> Writer | None:
        """The ``ay`` answer to a size query or a too-small buffer, or None to go ahead."""
        if capacity is None or capacity < size:
            return Writer(call, response=True).byte_array(None, size)
        return None

    # --- general ----------------------------------------------------------------------------

    def _initialize(self, r: Reader) -> Writer:
        handshake, _ = r.byte_array()
        r.byte()
        r.byte_array()
        r.done()
        if handshake != HANDSHAKE:
            raise Pkcs11Error(CKR.GENERAL_ERROR, "the client sent an unknown handshake")
        log.info("client connected: %s (protocol %d)", self.caller.describe(), self.version)
        return self._response(Call.C_Initialize)

    def _finalize(self, r: Reader) -> Writer:
        r.done()
        self.close()
        return self._response(Call.C_Finalize)

    def _get_info(self, r: Reader) -> Writer:
        r.done()
        return (
            self._response(Call.C_GetInfo)
            .version(2, 40)
            .space_string("signbridge", 32)
            .ulong(0)
            .space_string("signbridge crypto provider", 32)
            .version(*_VERSION)
        )

    def _get_slot_list(self, r: Reader) -> Writer:
        r.byte()
        capacity = r.ulong_buffer()
        r.done()
        return self._ulongs(Call.C_GetSlotList, sorted(self.slots()), capacity)

    def _get_slot_info(self, r: Reader) -> Writer:
        slot = r.ulong()
        r.done()
        token = self._token(slot)
        return (
            self._response(Call.C_GetSlotInfo)
            .space_string(token.slot_description, 64)
            .space_string(token.manufacturer, 32)
            .ulong(CKF.TOKEN_PRESENT)
            .version(*_VERSION)
            .version(*_VERSION)
        )

    def _get_token_info(self, r: Reader) -> Writer:
        slot = r.ulong()
        r.done()
        token = self._token(slot)
        flags = CKF.WRITE_PROTECTED | CKF.USER_PIN_INITIALIZED | CKF.TOKEN_INITIALIZED
        if token.require_login:
            flags |= CKF.LOGIN_REQUIRED
        sessions = sum(1 for s in self.sessions.values() if s.slot == slot)
        unknown = CK_UNAVAILABLE_INFORMATION
        return (
            self._response(Call.C_GetTokenInfo)
            .space_string(token.label, 32)
            .space_string(token.manufacturer, 32)
            .space_string(token.model, 16)
            .space_string(token.serial, 16)
            .ulong(flags)
            .ulong(0)  # max sessions: CK_EFFECTIVELY_INFINITE
            .ulong(sessions)
            .ulong(0)  # max read/write sessions
            .ulong(0)  # read/write sessions
            .ulong(1024)  # max PIN length: an "$OrganizationId:$ApiToken" PIN is long
            .ulong(1)
            .ulong(unknown)
            .ulong(unknown)
            .ulong(unknown)
            .ulong(unknown)
            .version(*_VERSION)
            .version(*_VERSION)
            .space_string("", 16)
        )

    def _get_mechanism_list(self, r: Reader) -> Writer:
        slot = r.ulong()
        capacity = r.ulong_buffer()
        r.done()
        return self._ulongs(Call.C_GetMechanismList, sorted(self._token(slot).mechanisms), capacity)

    def _get_mechanism_info(self, r: Reader) -> Writer:
        slot = r.ulong()
        mechanism = r.ulong()
        r.done()
        info = self._token(slot).mechanisms.get(mechanism)
        if info is None:
            raise Pkcs11Error(CKR.MECHANISM_INVALID, f"{name('CKM', mechanism)} is not offered")
        return (
            self._response(Call.C_GetMechanismInfo)
            .ulong(info.min_key_size)
            .ulong(info.max_key_size)
            .ulong(info.flags)
        )

    def _init_token(self, r: Reader) -> Writer:
        self._token(r.ulong())
        raise Pkcs11Error(CKR.TOKEN_WRITE_PROTECTED, "the token is read-only")

    def _read_only(self, r: Reader) -> Writer:
        self._session(r.ulong())
        raise Pkcs11Error(CKR.SESSION_READ_ONLY, f"{r.call.name}: the token is read-only")

    def _not_supported(self, r: Reader) -> Writer:
        raise Pkcs11Error(CKR.FUNCTION_NOT_SUPPORTED, f"{r.call.name} is not supported")

    # --- sessions and login -----------------------------------------------------------------

    def _open_session(self, r: Reader) -> Writer:
        slot = r.ulong()
        flags = r.ulong()
        r.done()
        token = self._token(slot)
        if not flags & CKF.SERIAL_SESSION:
            raise Pkcs11Error(CKR.SESSION_PARALLEL_NOT_SUPPORTED, "sessions must be serial")
        if flags & CKF.RW_SESSION:
            raise Pkcs11Error(CKR.TOKEN_WRITE_PROTECTED, "the token is read-only; open a read-only session")
        handle = next(self._session_ids)
        self.sessions[handle] = Session(handle, slot, token, CKF.SERIAL_SESSION)
        return self._response(Call.C_OpenSession).ulong(handle)

    def _close_session(self, r: Reader) -> Writer:
        session = self._session(r.ulong())
        r.done()
        del self.sessions[session.handle]
        if not any(s.slot == session.slot for s in self.sessions.values()):
            self.logged_in.pop(session.slot, None)
        return self._response(Call.C_CloseSession)

    def _close_all_sessions(self, r: Reader) -> Writer:
        slot = r.ulong()
        r.done()
        self._token(slot)
        self._drop_sessions(slot)
        return self._response(Call.C_CloseAllSessions)

    def _get_session_info(self, r: Reader) -> Writer:
        session = self._session(r.ulong())
        r.done()
        state = CKS.RO_USER_FUNCTIONS if self._is_logged_in(session) else CKS.RO_PUBLIC_SESSION
        response = self._response(Call.C_GetSessionInfo).ulong(session.slot).ulong(state)
        return response.ulong(session.flags).ulong(0)

    def _login(self, r: Reader) -> Writer:
        session = self._session(r.ulong())
        user_type = r.ulong()
        pin, _ = r.byte_array()
        if r.call is Call.C_LoginUser:
            r.byte_array()  # the user name: this token has one user
        r.done()
        if user_type == CKU.SO:
            raise Pkcs11Error(CKR.SESSION_READ_ONLY_EXISTS, "the token has no security officer")
        if user_type == CKU.CONTEXT_SPECIFIC:
            if session.sign is None:
                raise Pkcs11Error(CKR.OPERATION_NOT_INITIALIZED, "no operation waits for a context login")
        elif user_type != CKU.USER:
            raise Pkcs11Error(CKR.USER_TYPE_INVALID, f"unknown user type {user_type}")
        elif self._is_logged_in(session):
            raise Pkcs11Error(CKR.USER_ALREADY_LOGGED_IN, "already logged in")
        if pin is None:
            raise Pkcs11Error(CKR.ARGUMENTS_BAD, "C_Login needs a PIN")
        if not self._check_pin(session.token, pin):
            log.info("wrong PIN for token %r from %s", session.token.label, self.caller.describe())
            raise Pkcs11Error(CKR.PIN_INCORRECT, "the PIN is incorrect")
        if user_type == CKU.USER:
            self.logged_in[session.slot] = session.token
        return self._response(r.call)

    @staticmethod
    def _check_pin(token: Token, pin: bytes) -> bool:
        try:
            return bool(token.check_pin(pin))
        except Pkcs11Error:
            raise
        except Exception:
            log.exception("checking the PIN of token %r failed", token.label)
            raise Pkcs11Error(CKR.GENERAL_ERROR, "the PIN could not be checked") from None

    def _logout(self, r: Reader) -> Writer:
        session = self._session(r.ulong())
        r.done()
        if not self._is_logged_in(session):
            raise Pkcs11Error(CKR.USER_NOT_LOGGED_IN, "not logged in")
        del self.logged_in[session.slot]
        for other in self.sessions.values():
            if other.slot == session.slot:
                other.sign = None
        return self._response(Call.C_Logout)

    def _session_cancel(self, r: Reader) -> Writer:
        session = self._session(r.ulong())
        flags = r.ulong()
        r.done()
        if flags & CKF.SIGN:
            session.sign = None
        if flags & CKF.FIND_OBJECTS:
            session.found = None
        return self._response(Call.C_SessionCancel)

    # --- objects ----------------------------------------------------------------------------

    def _get_object_size(self, r: Reader) -> Writer:
        session = self._session(r.ulong())
        obj = self._object(session, r.ulong())
        r.done()
        size = sum(value_length(t, v) for t, v in obj.attributes.items())
        return self._response(Call.C_GetObjectSize).ulong(size)

    def _get_attribute_value(self, r: Reader) -> Writer:
        session = self._session(r.ulong())
        handle = r.ulong()
        requests = r.attribute_buffer()
        r.done()
        obj = self._object(session, handle)
        answers, rv = [], CKR.OK
        for request in requests:
            answer, problem = self._attribute(obj, request)
            answers.append(answer)
            if problem is not None and (rv == CKR.OK or _PRECEDENCE[problem] < _PRECEDENCE[rv]):
                rv = problem
        return self._response(Call.C_GetAttributeValue).attribute_array(answers).ulong(rv)

    @staticmethod
    def _attribute(obj: TokenObject, request: AttributeRequest) -> tuple[WireAttribute, CKR | None]:
        if obj.object_class == CKO.PRIVATE_KEY and request.type in _SECRET_ATTRIBUTES:
            return WireAttribute(request.type), CKR.ATTRIBUTE_SENSITIVE
        value = obj.get(request.type)
        if value is None:
            return WireAttribute(request.type), CKR.ATTRIBUTE_TYPE_INVALID
        length = value_length(request.type, value)
        if request.capacity == 0:
            return WireAttribute(request.type, None, length), None
        if request.capacity < length:
            return WireAttribute(request.type), CKR.BUFFER_TOO_SMALL
        return WireAttribute(request.type, value, length), None

    def _find_objects_init(self, r: Reader) -> Writer:
        session = self._session(r.ulong())
        template = r.attribute_array()
        r.done()
        if session.found is not None:
            raise Pkcs11Error(CKR.OPERATION_ACTIVE, "a search is already active")
        session.found = [
            self._handle_of(session.token, obj)
            for obj in session.token.objects
            if self._visible(session, obj) and all(_matches(obj, wanted) for wanted in template)
        ]
        return self._response(Call.C_FindObjectsInit)

    def _find_objects(self, r: Reader) -> Writer:
        session = self._session(r.ulong())
        capacity = r.ulong_buffer()
        r.done()
        if session.found is None:
            raise Pkcs11Error(CKR.OPERATION_NOT_INITIALIZED, "C_FindObjectsInit was not called")
        batch, session.found = session.found[:capacity], session.found[capacity:]
        return self._response(Call.C_FindObjects).ulong_array(batch)

    def _find_objects_final(self, r: Reader) -> Writer:
        session = self._session(r.ulong())
        r.done()
        if session.found is None:
            raise Pkcs11Error(CKR.OPERATION_NOT_INITIALIZED, "C_FindObjectsInit was not called")
        session.found = None
        return self._response(Call.C_FindObjectsFinal)

    # --- signing ----------------------------------------------------------------------------

    def _sign_init(self, r: Reader) -> Writer:
        session_handle, mechanism, key_handle = self._with_mechanism(r, self._read_sign_init)
        session = self._session(session_handle)
        if mechanism is None:
            session.sign = None
            return self._response(Call.C_SignInit)
        if session.sign is not None:
            raise Pkcs11Error(CKR.OPERATION_ACTIVE, "a signature is already in progress")
        if mechanism.type not in session.token.mechanisms:
            raise Pkcs11Error(CKR.MECHANISM_INVALID, f"{name('CKM', mechanism.type)} is not offered")
        key = self._object(session, key_handle, CKR.KEY_HANDLE_INVALID)
        if key.object_class not in (CKO.PRIVATE_KEY, CKO.PUBLIC_KEY, CKO.SECRET_KEY):
            raise Pkcs11Error(CKR.KEY_HANDLE_INVALID, f"object {key_handle} is not a key")
        if not key.get(CKA.SIGN, False):
            raise Pkcs11Error(CKR.KEY_FUNCTION_NOT_PERMITTED, f"key {key.label!r} cannot sign")
        if session.token.require_login and not self._is_logged_in(session):
            raise Pkcs11Error(CKR.USER_NOT_LOGGED_IN, "log in before signing")
        operation = SignOperation(key, mechanism)
        allowed = key.get(CKA.ALLOWED_MECHANISMS)
        if allowed is not None and mechanism.type not in allowed:  # type: ignore[operator]
            raise Pkcs11Error(CKR.MECHANISM_INVALID, f"key {key.label!r} does not allow this mechanism")
        session.sign = operation
        return self._response(Call.C_SignInit)

    def _read_sign_init(self, r: Reader, layout: MechanismLayout) -> tuple[int, Mechanism | None, int]:
        session = r.ulong()
        mechanism = r.mechanism(layout, _SIGN_TYPES)
        key = r.ulong()
        r.done()
        return session, mechanism, key

    def _with_mechanism(self, r: Reader, read: Callable[[Reader, MechanismLayout], tuple]) -> tuple:
        """Read a request holding ``M`` with the negotiated layout, then with the other one.

        p11-kit >= 0.25.6 clients send the protocol-2 layout even when version 0 was negotiated
        (p11-kit PR #744); the two layouts never parse the same bytes to the same length.
        """
        try:
            return read(r, self.layout)
        except MechanismUnsupported:
            raise
        except ProtocolError:
            r.rewind()
            return read(r, self.layout.other())

    def _sign(self, r: Reader) -> Writer:
        session = self._session(r.ulong())
        data, length = r.byte_array()
        capacity = r.byte_buffer()
        r.done()
        operation = self._operation(session)
        if operation.multipart:
            raise Pkcs11Error(CKR.OPERATION_ACTIVE, "finish a multi-part signature with C_SignFinal")
        answer = self._bytes_answer(Call.C_Sign, capacity, operation.signature_length)
        if answer is not None:
            return answer
        session.sign = None
        if data is None and length:
            raise Pkcs11Error(CKR.ARGUMENTS_BAD, "C_Sign got no data")
        signature = self._call_signer(session, operation, data or b"")
        return self._response(Call.C_Sign).byte_array(signature)

    def _sign_update(self, r: Reader) -> Writer:
        session = self._session(r.ulong())
        data, length = r.byte_array()
        r.done()
        operation = self._operation(session)
        try:
            if data is None and length:
                raise Pkcs11Error(CKR.ARGUMENTS_BAD, "C_SignUpdate got no data")
            operation.update(data or b"")
        except Pkcs11Error:
            session.sign = None
            raise
        return self._response(Call.C_SignUpdate)

    def _sign_final(self, r: Reader) -> Writer:
        session = self._session(r.ulong())
        capacity = r.byte_buffer()
        r.done()
        operation = self._operation(session)
        answer = self._bytes_answer(Call.C_SignFinal, capacity, operation.signature_length)
        if answer is not None:
            return answer
        session.sign = None
        signature = self._call_signer(session, operation, None)
        return self._response(Call.C_SignFinal).byte_array(signature)

    @staticmethod
    def _operation(session: Session) -> SignOperation:
        if session.sign is None:
            raise Pkcs11Error(CKR.OPERATION_NOT_INITIALIZED, "C_SignInit was not called")
        return session.sign

    def _call_signer(self, session: Session, operation: SignOperation, data: bytes | None) -> bytes:
        request = operation.request(data)
        key = operation.key
        log.info(
            "signing %s %s digest with %r (%s) for %s",
            request.hash_algorithm.title,
            request.scheme.value,
            key.label,
            operation.spec.type.name,
            self.caller.describe(),
        )
        try:
            raw = session.token.signer(key, request, self.caller)
        except Pkcs11Error as exc:
            log.warning("signing with %r failed: %s (%s)", key.label, exc, exc.ckr_name)
            raise
        except Exception:
            log.exception("the signer failed for key %r", key.label)
            raise Pkcs11Error(CKR.GENERAL_ERROR, "the signer failed") from None
        return finish_signature(key, request, raw)


_PRECEDENCE = {CKR.ATTRIBUTE_SENSITIVE: 0, CKR.ATTRIBUTE_TYPE_INVALID: 1, CKR.BUFFER_TOO_SMALL: 2, CKR.OK: 3}


def _matches(obj: TokenObject, wanted: WireAttribute) -> bool:
    value = obj.get(wanted.type)
    if value is None or wanted.length is None:
        return False
    kind = attribute_kind(wanted.type)
    if kind is Kind.ATTRIBUTE_ARRAY:
        return False
    if kind is Kind.BYTE:
        return bool(value) == bool(wanted.value)
    if wanted.value is None:
        return raw_bytes(value) == b""  # type: ignore[arg-type]
    return raw_bytes(value) == raw_bytes(wanted.value)  # type: ignore[arg-type]
