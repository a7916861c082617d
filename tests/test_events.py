"""receiver.events: the signature check and the body's validation, without HTTP."""

from __future__ import annotations

import hashlib
import hmac
import importlib.machinery
import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.events import EventRejected, parse_event, signature, verify_signature
from receiver.model import PHASES, Event

SECRET = "hook-secret-0123456789"
NOW = 1_718_000_000.0
BODY = b'{"event_id":"e-1","vmid":101,"phase":"post-stop","node":"pve1","ts":1718000000.5}'
HOOK = Path(__file__).resolve().parent.parent / "hookscript" / "pve-janitor-hook"


def signed(body: bytes = BODY, ts: int = int(NOW), secret: str = SECRET) -> tuple[str, str]:
    return str(ts), signature(secret, ts, body)


def rejected(call, *args, **kwargs) -> EventRejected:
    with pytest.raises(EventRejected) as info:
        call(*args, **kwargs)
    return info.value


# --- verify_signature ----------------------------------------------------------------


def test_signature_is_hmac_sha256_of_timestamp_dot_body():
    expected = hmac.new(SECRET.encode(), b"1718000000." + BODY, hashlib.sha256).hexdigest()
    assert signature(SECRET, 1718000000, BODY) == "sha256=" + expected
    verify_signature(SECRET, "1718000000", "sha256=" + expected, BODY, NOW)  # raises EventRejected when wrong


def test_uppercase_hex_is_accepted():
    ts, sig = signed()
    verify_signature(SECRET, ts, "sha256=" + sig[7:].upper(), BODY, NOW)


@pytest.mark.parametrize("skew", [-300, 0, 300])
def test_timestamps_within_300_seconds_verify(skew):
    ts, sig = signed(ts=int(NOW) + skew)
    verify_signature(SECRET, ts, sig, BODY, NOW)


@pytest.mark.parametrize("skew", [-301, 301, -86400, 10**6])
def test_stale_or_future_timestamp_is_401(skew):
    ts, sig = signed(ts=int(NOW) + skew)
    exc = rejected(verify_signature, SECRET, ts, sig, BODY, NOW)
    assert (exc.status, exc.message) == (401, "stale or future timestamp")


def test_nan_clock_rejects():
    ts, sig = signed()
    assert rejected(verify_signature, SECRET, ts, sig, BODY, float("nan")).status == 401


GOOD_TS, GOOD_SIG = signed()


@pytest.mark.parametrize(
    "ts, sig, fragment",
    [
        (None, GOOD_SIG, "missing X-Janitor-Timestamp"),
        ("", GOOD_SIG, "missing X-Janitor-Timestamp"),
        (GOOD_TS, None, "missing X-Janitor-Signature"),
        (GOOD_TS, "", "missing X-Janitor-Signature"),
        ("1718000000.5", GOOD_SIG, "X-Janitor-Timestamp must be unix seconds"),
        ("-1718000000", GOOD_SIG, "X-Janitor-Timestamp must be unix seconds"),
        (" 1718000000", GOOD_SIG, "X-Janitor-Timestamp must be unix seconds"),
        ("1718000000\n", GOOD_SIG, "X-Janitor-Timestamp must be unix seconds"),
        ("١٧١٨٠٠٠٠٠٠", GOOD_SIG, "X-Janitor-Timestamp must be unix seconds"),  # Arabic-Indic digits
        ("1" * 40, GOOD_SIG, "X-Janitor-Timestamp must be unix seconds"),
        (GOOD_TS, GOOD_SIG[7:], "X-Janitor-Signature must be sha256="),
        (GOOD_TS, "sha1=" + GOOD_SIG[7:], "X-Janitor-Signature must be sha256="),
        (GOOD_TS, GOOD_SIG[:-1], "X-Janitor-Signature must be sha256="),
        (GOOD_TS, GOOD_SIG + "0", "X-Janitor-Signature must be sha256="),
        (GOOD_TS, "sha256=" + "g" * 64, "X-Janitor-Signature must be sha256="),
        (GOOD_TS, signature("another secret", GOOD_TS, BODY), "bad signature"),
        (GOOD_TS, signature(SECRET, int(GOOD_TS) + 1, BODY), "bad signature"),
        (GOOD_TS, signature(SECRET, GOOD_TS, BODY + b" "), "bad signature"),
    ],
)
def test_missing_garbled_or_wrong_signature_is_401(ts, sig, fragment):
    exc = rejected(verify_signature, SECRET, ts, sig, BODY, NOW)
    assert exc.status == 401
    assert fragment in exc.message
    assert SECRET not in exc.message and GOOD_SIG[7:] not in exc.message.lower()


def test_no_secret_configured_never_verifies():
    assert rejected(verify_signature, "", GOOD_TS, signature("", GOOD_TS, BODY), BODY, NOW).status == 503


# --- rotation: the current secret and the previous one --------------------------------

PREVIOUS = "hook-secret-previous-9876543210"


@pytest.mark.parametrize("signed_with", [SECRET, PREVIOUS])
def test_during_a_rotation_either_secret_verifies(signed_with):
    ts, sig = signed(secret=signed_with)
    verify_signature((SECRET, PREVIOUS), ts, sig, BODY, NOW)  # raises EventRejected when wrong


def test_during_a_rotation_a_third_secret_is_401_and_the_window_still_holds():
    ts, sig = signed(secret="neither-of-the-two-secrets")
    exc = rejected(verify_signature, (SECRET, PREVIOUS), ts, sig, BODY, NOW)
    assert (exc.status, exc.message) == (401, "bad signature")
    assert PREVIOUS not in exc.message and SECRET not in exc.message
    ts, sig = signed(secret=PREVIOUS, ts=int(NOW) - 301)
    assert rejected(verify_signature, (SECRET, PREVIOUS), ts, sig, BODY, NOW).message == "stale or future timestamp"


def test_no_previous_secret_accepts_only_the_current_one():
    ts, sig = signed(secret=PREVIOUS)
    assert rejected(verify_signature, (SECRET, ""), ts, sig, BODY, NOW).status == 401
    verify_signature((SECRET, ""), *signed(), BODY, NOW)


def test_a_previous_secret_without_a_current_one_is_not_configured():
    ts, sig = signed(secret=PREVIOUS)
    assert rejected(verify_signature, ("", PREVIOUS), ts, sig, BODY, NOW).status == 503


def test_both_secrets_are_compared_whichever_matches(monkeypatch):
    """Constant time for the pair: the second is compared even when the first matched."""
    import receiver.events as events

    compared = []
    real = hmac.compare_digest

    def counting(a, b):
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(events.hmac, "compare_digest", counting)
    verify_signature((SECRET, PREVIOUS), *signed(secret=SECRET), BODY, NOW)
    assert compared == [signature(SECRET, int(NOW), BODY), signature(PREVIOUS, int(NOW), BODY)]


def test_the_hookscript_signs_what_the_receiver_verifies():
    """The two sides of the contract, each written without the other's code."""
    loader = importlib.machinery.SourceFileLoader("pve_janitor_hook_for_events", str(HOOK))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    hook = importlib.util.module_from_spec(spec)
    loader.exec_module(hook)
    for secret in (SECRET, "ü-secret", "k" * 100):  # non-ASCII, longer than the HMAC block
        body = hook.event_body(hook.new_event_id(), 101, "post-stop", "pve1", NOW)
        verify_signature(secret, str(int(NOW)), "sha256=" + hook.sign(secret, int(NOW), body), body, NOW)
        assert parse_event(body, NOW).vmid == 101


# --- parse_event ---------------------------------------------------------------------


def event_json(**changes) -> bytes:
    data = {"event_id": "e-1", "vmid": 101, "phase": "post-stop", "node": "pve1", "ts": 1718000000.5}
    for key, value in changes.items():
        if value is DROP:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data).encode()


DROP = object()


def test_parse_a_full_event():
    assert parse_event(BODY, NOW) == Event("e-1", 101, "post-stop", "pve1", 1718000000.5)


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_every_phase_is_accepted(phase):
    assert parse_event(event_json(phase=phase), NOW).phase == phase


@pytest.mark.parametrize("ts", [DROP, None])
def test_missing_or_null_ts_means_now(ts):
    assert parse_event(event_json(ts=ts), NOW).ts == NOW


def test_integer_ts_and_unknown_keys():
    event = parse_event(event_json(ts=1718000000, extra={"a": [1]}, version=2), NOW)
    assert event.ts == 1718000000.0 and isinstance(event.ts, float)


@pytest.mark.parametrize("value", [100, 999_999_999])
def test_vmid_bounds_are_inclusive(value):
    assert parse_event(event_json(vmid=value), NOW).vmid == value


def test_longest_allowed_fields():
    event = parse_event(event_json(event_id="x" * 128, node="n" * 64), NOW)
    assert (len(event.event_id), len(event.node)) == (128, 64)


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"{'event_id': 'x'}", "not valid JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"[" * 100_000, "not valid JSON"),
        (b"[]", "JSON object"),
        (b"[1, 2]", "JSON object"),
        (b'"event"', "JSON object"),
        (b"42", "JSON object"),
        (b"null", "JSON object"),
        (b'{"event_id":"e","vmid":101,"phase":"post-stop","node":"pve1","ts":NaN}', "not valid JSON"),
        (b'{"event_id":"e","vmid":101,"phase":"post-stop","node":"pve1","ts":Infinity}', "not valid JSON"),
        (event_json(event_id=DROP), "event_id is missing"),
        (event_json(event_id=""), "event_id must be a non-empty string"),
        (event_json(event_id=7), "event_id must be a non-empty string"),
        (event_json(event_id=None), "event_id must be a non-empty string"),
        (event_json(event_id="x" * 129), "event_id must be at most 128"),
        (event_json(event_id="caf\u00e9"), "event_id must be printable ASCII"),
        (event_json(event_id="a\nb"), "event_id must be printable ASCII"),
        (event_json(event_id="a\x00b"), "event_id must be printable ASCII"),
        (event_json(vmid=DROP), "vmid is missing"),
        (event_json(vmid="101"), "vmid must be an integer"),
        (event_json(vmid=101.0), "vmid must be an integer"),
        (event_json(vmid=True), "vmid must be an integer"),
        (event_json(vmid=None), "vmid must be an integer"),
        (event_json(vmid=99), "vmid must be between 100 and 999999999"),
        (event_json(vmid=1_000_000_000), "vmid must be between"),
        (event_json(vmid=-101), "vmid must be between"),
        (event_json(vmid=10**30), "vmid must be between"),
        (event_json(phase=DROP), "phase is missing"),
        (event_json(phase="destroy"), "phase must be one of"),
        (event_json(phase="POST-STOP"), "phase must be one of"),
        (event_json(phase=["post-stop"]), "phase must be one of"),
        (event_json(phase={"a": 1}), "phase must be one of"),
        (event_json(node=DROP), "node is missing"),
        (event_json(node=""), "node must be a non-empty string"),
        (event_json(node=["pve1"]), "node must be a non-empty string"),
        (event_json(node="n" * 65), "node must be at most 64"),
        (event_json(node="pve 1"), "node must be printable ASCII without spaces"),
        (event_json(ts="now"), "ts must be a number"),
        (event_json(ts=True), "ts must be a number"),
        (event_json(ts=[1]), "ts must be a number"),
        (event_json(ts=-1), "ts must be unix seconds"),
        (event_json(ts=1e12), "ts must be unix seconds"),
        (event_json(ts=10**400), "ts must be unix seconds"),
    ],
)
def test_invalid_bodies_are_400_naming_the_field(body, fragment):
    exc = rejected(parse_event, body, NOW)
    assert exc.status == 400
    assert fragment in exc.message


# --- properties ----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
event_keys = st.sampled_from(["event_id", "vmid", "phase", "node", "ts", "other"])
field_values = (
    json_values
    | st.sampled_from(sorted(PHASES))
    | st.integers(0, 2 * 10**9)
    | st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=140)
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(event_keys, field_values, max_size=6))
def test_parse_event_on_any_object_returns_an_event_or_rejects_with_400(data):
    try:
        event = parse_event(json.dumps(data).encode(), NOW)
    except EventRejected as exc:
        assert exc.status == 400 and exc.message
        return
    assert 100 <= event.vmid <= 999_999_999 and event.phase in PHASES
    assert 0 < len(event.event_id) <= 128 and 0 < len(event.node) <= 64


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_parse_event_on_any_bytes_only_rejects_with_400(body):
    try:
        parse_event(body, NOW)
    except EventRejected as exc:
        assert exc.status == 400


header_text = st.none() | st.text(max_size=80) | st.from_regex(r"sha256=[0-9a-fA-F]{64}", fullmatch=True)
clock = st.floats(allow_nan=True, allow_infinity=True) | st.integers(0, 4 * 10**9).map(float)


@settings(max_examples=300, deadline=None)
@given(header_text | st.integers(0, 10**13).map(str), header_text, st.binary(max_size=200), clock)
def test_verify_signature_on_any_input_only_rejects_with_401(ts, sig, body, now):
    try:
        verify_signature(SECRET, ts, sig, body, now)
    except EventRejected as exc:
        assert exc.status == 401
        assert SECRET not in exc.message
    else:  # only a real signature can get here, and hypothesis cannot forge one
        assert sig == signature(SECRET, ts, body)


secrets_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=100)


@settings(max_examples=300, deadline=None)
@given(secrets_text, st.binary(max_size=2000), st.integers(0, 4 * 10**9), st.integers(-300, 300))
def test_a_valid_signature_always_verifies(secret, body, ts, skew):
    verify_signature(secret, str(ts), signature(secret, ts, body), body, float(ts + skew))
