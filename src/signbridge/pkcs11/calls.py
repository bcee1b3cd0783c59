"""p11-kit RPC call ids and their request/response signatures (p11-kit rpc-message.h).

Ids 1-65 exist in every protocol version; 66-87 (PKCS#11 3.0) since version 1 (p11-kit 0.25.0);
88 C_InitToken2 since version 1 and 89 C_DeriveKey2 since version 2. Signature letters: ``y`` byte,
``u`` ulong (u64), ``v`` version, ``s`` space-padded string, ``z`` string, ``a`` array of, ``f``
buffer for (capacity only), ``A`` attribute, ``M`` mechanism, ``P`` updated mechanism parameter.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Call(enum.IntEnum):
    ERROR = 0
    C_Initialize = 1
    C_Finalize = 2
    C_GetInfo = 3
    C_GetSlotList = 4
    C_GetSlotInfo = 5
    C_GetTokenInfo = 6
    C_GetMechanismList = 7
    C_GetMechanismInfo = 8
    C_InitToken = 9
    C_OpenSession = 10
    C_CloseSession = 11
    C_CloseAllSessions = 12
    C_GetSessionInfo = 13
    C_InitPIN = 14
    C_SetPIN = 15
    C_GetOperationState = 16
    C_SetOperationState = 17
    C_Login = 18
    C_Logout = 19
    C_CreateObject = 20
    C_CopyObject = 21
    C_DestroyObject = 22
    C_GetObjectSize = 23
    C_GetAttributeValue = 24
    C_SetAttributeValue = 25
    C_FindObjectsInit = 26
    C_FindObjects = 27
    C_FindObjectsFinal = 28
    C_EncryptInit = 29
    C_Encrypt = 30
    C_EncryptUpdate = 31
    C_EncryptFinal = 32
    C_DecryptInit = 33
    C_Decrypt = 34
    C_DecryptUpdate = 35
    C_DecryptFinal = 36
    C_DigestInit = 37
    C_Digest = 38
    C_DigestUpdate = 39
    C_DigestKey = 40
    C_DigestFinal = 41
    C_SignInit = 42
    C_Sign = 43
    C_SignUpdate = 44
    C_SignFinal = 45
    C_SignRecoverInit = 46
    C_SignRecover = 47
    C_VerifyInit = 48
    C_Verify = 49
    C_VerifyUpdate = 50
    C_VerifyFinal = 51
    C_VerifyRecoverInit = 52
    C_VerifyRecover = 53
    C_DigestEncryptUpdate = 54
    C_DecryptDigestUpdate = 55
    C_SignEncryptUpdate = 56
    C_DecryptVerifyUpdate = 57
    C_GenerateKey = 58
    C_GenerateKeyPair = 59
    C_WrapKey = 60
    C_UnwrapKey = 61
    C_DeriveKey = 62
    C_SeedRandom = 63
    C_GenerateRandom = 64
    C_WaitForSlotEvent = 65
    C_LoginUser = 66
    C_SessionCancel = 67
    C_MessageEncryptInit = 68
    C_EncryptMessage = 69
    C_EncryptMessageBegin = 70
    C_EncryptMessageNext = 71
    C_MessageEncryptFinal = 72
    C_MessageDecryptInit = 73
    C_DecryptMessage = 74
    C_DecryptMessageBegin = 75
    C_DecryptMessageNext = 76
    C_MessageDecryptFinal = 77
    C_MessageSignInit = 78
    C_SignMessage = 79
    C_SignMessageBegin = 80
    C_SignMessageNext = 81
    C_MessageSignFinal = 82
    C_MessageVerifyInit = 83
    C_VerifyMessage = 84
    C_VerifyMessageBegin = 85
    C_VerifyMessageNext = 86
    C_MessageVerifyFinal = 87
    C_InitToken2 = 88
    C_DeriveKey2 = 89


@dataclass(frozen=True)
class Signature:
    request: str
    response: str


SIGNATURES: dict[Call, Signature] = {
    Call.ERROR: Signature("", "u"),
    Call.C_Initialize: Signature("ayyay", ""),
    Call.C_Finalize: Signature("", ""),
    Call.C_GetInfo: Signature("", "vsusv"),
    Call.C_GetSlotList: Signature("yfu", "au"),
    Call.C_GetSlotInfo: Signature("u", "ssuvv"),
    Call.C_GetTokenInfo: Signature("u", "ssssuuuuuuuuuuuvvs"),
    Call.C_GetMechanismList: Signature("ufu", "au"),
    Call.C_GetMechanismInfo: Signature("uu", "uuu"),
    Call.C_InitToken: Signature("uayz", ""),
    Call.C_OpenSession: Signature("uu", "u"),
    Call.C_CloseSession: Signature("u", ""),
    Call.C_CloseAllSessions: Signature("u", ""),
    Call.C_GetSessionInfo: Signature("u", "uuuu"),
    Call.C_InitPIN: Signature("uay", ""),
    Call.C_SetPIN: Signature("uayay", ""),
    Call.C_GetOperationState: Signature("ufy", "ay"),
    Call.C_SetOperationState: Signature("uayuu", ""),
    Call.C_Login: Signature("uuay", ""),
    Call.C_Logout: Signature("u", ""),
    Call.C_CreateObject: Signature("uaA", "u"),
    Call.C_CopyObject: Signature("uuaA", "u"),
    Call.C_DestroyObject: Signature("uu", ""),
    Call.C_GetObjectSize: Signature("uu", "u"),
    Call.C_GetAttributeValue: Signature("uufA", "aAu"),
    Call.C_SetAttributeValue: Signature("uuaA", ""),
    Call.C_FindObjectsInit: Signature("uaA", ""),
    Call.C_FindObjects: Signature("ufu", "au"),
    Call.C_FindObjectsFinal: Signature("u", ""),
    Call.C_EncryptInit: Signature("uMu", ""),
    Call.C_Encrypt: Signature("uayfy", "ay"),
    Call.C_EncryptUpdate: Signature("uayfy", "ay"),
    Call.C_EncryptFinal: Signature("ufy", "ay"),
    Call.C_DecryptInit: Signature("uMu", ""),
    Call.C_Decrypt: Signature("uayfy", "ay"),
    Call.C_DecryptUpdate: Signature("uayfy", "ay"),
    Call.C_DecryptFinal: Signature("ufy", "ay"),
    Call.C_DigestInit: Signature("uM", ""),
    Call.C_Digest: Signature("uayfy", "ay"),
    Call.C_DigestUpdate: Signature("uay", ""),
    Call.C_DigestKey: Signature("uu", ""),
    Call.C_DigestFinal: Signature("ufy", "ay"),
    Call.C_SignInit: Signature("uMu", ""),
    Call.C_Sign: Signature("uayfy", "ay"),
    Call.C_SignUpdate: Signature("uay", ""),
    Call.C_SignFinal: Signature("ufy", "ay"),
    Call.C_SignRecoverInit: Signature("uMu", ""),
    Call.C_SignRecover: Signature("uayfy", "ay"),
    Call.C_VerifyInit: Signature("uMu", ""),
    Call.C_Verify: Signature("uayay", ""),
    Call.C_VerifyUpdate: Signature("uay", ""),
    Call.C_VerifyFinal: Signature("uay", ""),
    Call.C_VerifyRecoverInit: Signature("uMu", ""),
    Call.C_VerifyRecover: Signature("uayfy", "ay"),
    Call.C_DigestEncryptUpdate: Signature("uayfy", "ay"),
    Call.C_DecryptDigestUpdate: Signature("uayfy", "ay"),
    Call.C_SignEncryptUpdate: Signature("uayfy", "ay"),
    Call.C_DecryptVerifyUpdate: Signature("uayfy", "ay"),
    Call.C_GenerateKey: Signature("uMaA", "u"),
    Call.C_GenerateKeyPair: Signature("uMaAaA", "uu"),
    Call.C_WrapKey: Signature("uMuufy", "ay"),
    Call.C_UnwrapKey: Signature("uMuayaA", "u"),
    Call.C_DeriveKey: Signature("uMuaA", "u"),
    Call.C_SeedRandom: Signature("uay", ""),
    Call.C_GenerateRandom: Signature("ufy", "ay"),
    Call.C_WaitForSlotEvent: Signature("u", "u"),
    Call.C_LoginUser: Signature("uuayay", ""),
    Call.C_SessionCancel: Signature("uu", ""),
    Call.C_MessageEncryptInit: Signature("uMu", ""),
    Call.C_EncryptMessage: Signature("uayayayfy", "ay"),
    Call.C_EncryptMessageBegin: Signature("uayay", ""),
    Call.C_EncryptMessageNext: Signature("uayayfyu", "ay"),
    Call.C_MessageEncryptFinal: Signature("u", ""),
    Call.C_MessageDecryptInit: Signature("uMu", ""),
    Call.C_DecryptMessage: Signature("uayayayfy", "ay"),
    Call.C_DecryptMessageBegin: Signature("uayay", ""),
    Call.C_DecryptMessageNext: Signature("uayayfyu", "ay"),
    Call.C_MessageDecryptFinal: Signature("u", ""),
    Call.C_MessageSignInit: Signature("uMu", ""),
    Call.C_SignMessage: Signature("uayayfy", "ay"),
    Call.C_SignMessageBegin: Signature("uay", ""),
    Call.C_SignMessageNext: Signature("uayayyfy", "ay"),
    Call.C_MessageSignFinal: Signature("u", ""),
    Call.C_MessageVerifyInit: Signature("uMu", ""),
    Call.C_VerifyMessage: Signature("uayayay", ""),
    Call.C_VerifyMessageBegin: Signature("uay", ""),
    Call.C_VerifyMessageNext: Signature("uayayay", ""),
    Call.C_MessageVerifyFinal: Signature("u", ""),
    Call.C_InitToken2: Signature("uays", ""),
    Call.C_DeriveKey2: Signature("uMuaA", "uPu"),
}

HANDSHAKE = b"PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"
PROTOCOL_VERSION_MAX = 2
