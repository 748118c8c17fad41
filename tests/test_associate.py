"""The native engine's A-ASSOCIATE fast path against pynetdicom's, on real requests.

Every request a real peer sends that :func:`parse_associate_rq` takes must give the
A-ASSOCIATE-AC pynetdicom's PDU classes and ``negotiate_as_acceptor`` give, byte for byte,
with the same accepted contexts; whatever it does not take goes to pynetdicom, live.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markers import needs_dcmtk
from nodeproc import DCMTK, DCMTK_ENV, running_node
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    Verification,
)

from triage_node.scp import supported_contexts
from triage_node.ulserver import (
    Acceptor,
    associate_rj,
    decode_associate_rq,
    parse_associate_rq,
    pynetdicom_accept,
)

pytestmark = needs_dcmtk

MAX_PDU = 262144
CONTEXTS = supported_contexts()


def _first_pdu(start: Callable[[int], object]) -> bytes:
    """The first PDU a requestor sends: a bare listener reads it and hangs up."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(20)
        peer = start(srv.getsockname()[1])
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(20)
            data = b""
            while len(data) < 6 or len(data) < 6 + struct.unpack(">L", data[2:6])[0]:
                chunk = conn.recv(65536)
                assert chunk, "the requestor hung up first"
                data += chunk
    if isinstance(peer, subprocess.Popen):
        peer.wait(20)
    elif isinstance(peer, threading.Thread):
        peer.join(20)
    return data


def _dcmtk(tool: str, *args: str, files: Sequence[str] = ()) -> Callable[[int], object]:
    def start(port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([str(DCMTK / tool), *args, "127.0.0.1", str(port), *files],
                                env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return start


def _pynetdicom(*, ext_neg: Sequence[object] = (), max_pdu: int = 16382,
                contexts: Sequence[str] = (CTImageStorage, Verification)
                ) -> Callable[[int], object]:
    def start(port: int) -> threading.Thread:
        ae = AE(ae_title="PYSCU")
        ae.acse_timeout = 5
        ae.maximum_pdu_size = max_pdu
        for uid in contexts:
            ae.add_requested_context(uid)
        thread = threading.Thread(target=ae.associate, args=("127.0.0.1", port),
                                  kwargs={"ae_title": "ICHTRIAGE", "ext_neg": list(ext_neg)},
                                  daemon=True)
        thread.start()
        return thread
    return start


def _async_window() -> AsynchronousOperationsWindowNegotiation:
    item = AsynchronousOperationsWindowNegotiation()
    item.maximum_number_operations_invoked = 4
    item.maximum_number_operations_performed = 4
    return item


def _role() -> SCP_SCU_RoleSelectionNegotiation:
    item = SCP_SCU_RoleSelectionNegotiation()
    item.sop_class_uid = CTImageStorage
    item.scu_role = True
    item.scp_role = True
    return item


def _identity() -> UserIdentityNegotiation:
    item = UserIdentityNegotiation()
    item.user_identity_type = 1
    item.primary_field = b"radiographer"
    return item


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    from dicomfiles import make_ct_series

    return str(make_ct_series(tmp_path_factory.mktemp("ct"), 1, rows=16, cols=16)[0])


REQUESTORS: dict[str, Callable[[str], Callable[[int], object]]] = {
    "echoscu": lambda f: _dcmtk("echoscu", "-aet", "SCANNER01"),
    "storescu": lambda f: _dcmtk("storescu", "-aec", "ICHTRIAGE", files=[f]),
    "storescu explicit big endian first": lambda f: _dcmtk("storescu", "-xb", files=[f]),
    "storescu JPEG baseline": lambda f: _dcmtk("storescu", "-xy", files=[f]),
    "storescu deflated": lambda f: _dcmtk("storescu", "-xd", files=[f]),
    "storescu required contexts only": lambda f: _dcmtk("storescu", "-R", files=[f]),
    "storescu small PDU": lambda f: _dcmtk("storescu", "--max-pdu", "4096", files=[f]),
    "pynetdicom": lambda f: _pynetdicom(),
    "pynetdicom unlimited PDU, MR only": lambda f: _pynetdicom(max_pdu=0,
                                                               contexts=[MRImageStorage]),
    "pynetdicom asynchronous window": lambda f: _pynetdicom(ext_neg=[_async_window()]),
}


@pytest.mark.parametrize("name", list(REQUESTORS))
def test_fast_path_answers_real_requests_as_pynetdicom_does(name: str, ct_file: str) -> None:
    pdu = _first_pdu(REQUESTORS[name](ct_file))
    assert pdu[0] == 0x01
    fast = parse_associate_rq(pdu[6:])
    assert fast is not None, "a common request left to pynetdicom"
    ac, accepted, max_length = Acceptor(CONTEXTS, MAX_PDU).negotiate(fast)
    expected_ac, expected_accepted, expected_max_length = pynetdicom_accept(
        decode_associate_rq(pdu), CONTEXTS, MAX_PDU)
    assert accepted == expected_accepted
    assert accepted, "nothing accepted: the comparison would prove little"
    assert max_length == expected_max_length
    assert ac == expected_ac


@pytest.mark.parametrize("ext_neg", [[_role()], [_identity()], [_async_window(), _role()]],
                         ids=["role selection", "user identity", "async window + role"])
def test_requests_with_other_negotiation_go_to_pynetdicom(ext_neg: list[object]) -> None:
    pdu = _first_pdu(_pynetdicom(ext_neg=ext_neg))
    assert parse_associate_rq(pdu[6:]) is None
    decode_associate_rq(pdu)  # and pynetdicom takes it


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(value)) + value


def _rq(contexts: Sequence[tuple[int, bytes, Sequence[bytes]]], *,
        user: bytes = _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.3"),
        application: bytes = b"1.2.840.10008.3.1.1.1") -> bytes:
    """An A-ASSOCIATE-RQ body (after the PDU header) built by hand."""
    items = [_item(0x10, application)]
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract) + b"".join(_item(0x40, ts) for ts in syntaxes)
        items.append(_item(0x20, bytes((cid, 0, 0, 0)) + sub))
    items.append(_item(0x50, user))
    return (b"\x00\x01\x00\x00" + b"ICHTRIAGE".ljust(16) + b"SCANNER".ljust(16)
            + b"\x00" * 32 + b"".join(items))


CT = CTImageStorage.encode()
IMPLICIT = b"1.2.840.10008.1.2"


def test_hand_built_request_is_read() -> None:
    rq = parse_associate_rq(_rq([(1, CT, [IMPLICIT]), (3, b"1.2.3.4", [IMPLICIT])]))
    assert rq is not None
    assert rq.calling_ae == "SCANNER" and rq.called_ae == "ICHTRIAGE"
    assert rq.contexts == ((1, CTImageStorage, (IMPLICIT.decode(),)),
                           (3, "1.2.3.4", (IMPLICIT.decode(),)))
    assert rq.max_length == 16384 and not rq.async_window
    _, accepted, _ = Acceptor(CONTEXTS, MAX_PDU).negotiate(rq)
    assert accepted == {1: (CTImageStorage, IMPLICIT.decode())}


@pytest.mark.parametrize("body", [
    _rq([(1, CT + b"\x00", [IMPLICIT])]),  # a padded UID
    _rq([(1, CT, [IMPLICIT + b" "])]),
    _rq([(1, b"1.02.3", [IMPLICIT])]),  # a leading zero
    _rq([(1, CT, [IMPLICIT]), (1, CT, [IMPLICIT])]),  # a context ID twice
    _rq([(2, CT, [IMPLICIT])]),  # an even context ID
    _rq([(1, CT, [])]),  # no transfer syntax
    _rq([(1, CT, [IMPLICIT])], user=_item(0x52, b"1.2.3")),  # no maximum length
    _rq([(1, CT, [IMPLICIT])], user=_item(0x51, b"\x00\x00\x40\x00")
        + _item(0x54, b"\x00\x04" + b"1.2\x00" + b"\x01\x01")),  # role selection
    _rq([(1, CT, [IMPLICIT])])[:-3],  # truncated
    _rq([(1, CT, [IMPLICIT])]).replace(b"SCANNER", b"SCANN\xc9R"),  # not ASCII
    _rq([(1, CT, [IMPLICIT])]).replace(b"SCANNER", b"SCAN\\ER"),
    _rq([(1, CT, [IMPLICIT])]).replace(b"SCANNER", b"       "),
], ids=["padded abstract syntax", "padded transfer syntax", "leading zero",
        "context ID twice", "even context ID", "no transfer syntax", "no maximum length",
        "role selection", "truncated", "non-ASCII AE title", "backslash in AE title",
        "blank AE title"])
def test_unusual_requests_go_to_pynetdicom(body: bytes) -> None:
    assert parse_associate_rq(body) is None


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_damaged_requests_never_break_the_fast_path(data: st.DataObject) -> None:
    """Byte flips and cuts of a real-sized request: the fast path declines or negotiates,
    it never raises."""
    body = bytearray(_rq([(1, CT, [IMPLICIT, b"1.2.840.10008.1.2.1"]),
                          (3, b"1.2.840.10008.1.1", [IMPLICIT])],
                         user=_item(0x51, b"\x00\x00\x40\x00") + _item(0x52, b"1.2.3")
                         + _item(0x53, b"\x00\x01\x00\x01") + _item(0x55, b"X")))
    for _ in range(data.draw(st.integers(1, 4))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    body = body[:data.draw(st.integers(0, len(body)))]
    rq = parse_associate_rq(bytes(body))
    if rq is not None:
        ac, accepted, _ = Acceptor(CONTEXTS, MAX_PDU).negotiate(rq)
        assert ac[0] == 0x02 and struct.unpack(">L", ac[2:6])[0] == len(ac) - 6
        assert set(accepted) <= {cid for cid, _, _ in rq.contexts}


@pytest.mark.parametrize("rsd", [(1, 1, 3), (1, 1, 7), (2, 3, 2), (1, 1, 2)])
def test_associate_rj_is_pynetdicoms(rsd: tuple[int, int, int]) -> None:
    prim = A_ASSOCIATE()
    prim.result, prim.result_source, prim.diagnostic = rsd
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(prim)
    assert associate_rj(*rsd) == pdu.encode()


def test_role_selection_is_negotiated_live_by_pynetdicom(tmp_path) -> None:
    """A requestor proposing SCP/SCU roles takes pynetdicom's path on the native engine and
    is served: association, C-ECHO, release."""
    with running_node(tmp_path, extra='engine = "native"') as node:
        ae = AE(ae_title="ROLES")
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(Verification)
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = CTImageStorage
        role.scu_role = True
        role.scp_role = False
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHTRIAGE", ext_neg=[role])
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
