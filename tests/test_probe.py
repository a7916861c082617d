"""The probes' pure side: what each answer means, what to read, when to read it."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta

import pytest

from receiver.fade import FAST_SECONDS, MAX_GAP_SECONDS, Fade
from receiver.probe import (
    Costs,
    Kind,
    ListShape,
    Result,
    Seen,
    Where,
    merge,
    node_name_ok,
    read_node_list,
    read_status,
)
from receiver.timeutil import utcnow


def body(data) -> bytes:
    return json.dumps({"data": data}).encode()


MISSING = "Configuration file 'nodes/pve1/lxc/101.conf' does not exist"


@pytest.mark.parametrize(
    "code, reason, payload, result",
    [
        (200, "OK", body({"vmid": 101, "status": "stopped"}), Result.PRESENT),
        (200, "OK", body({"status": "running"}), Result.PRESENT),
        (500, MISSING, b'{"data":null}', Result.GONE),
        (500, "", json.dumps({"data": None, "message": MISSING}).encode(), Result.GONE),  # the message in the body
        (500, "Configuration file 'nodes/pve1/lxc/1010.conf' does not exist", b"", Result.HTTP),  # another guest's
        (500, "hostname lookup 'pve9' failed", b"", Result.HTTP),
        (595, "Errors during connection establishment, proxy handshake", b"", Result.OFFLINE),
        (403, "Permission check failed (/vms/101, VM.Audit)", b"", Result.PRIVILEGE),
        (401, "authentication failure", b"", Result.AUTH),
        (502, "Bad gateway", b"", Result.HTTP),
        (200, "OK", b"not json", Result.MALFORMED),
        (200, "OK", b'{"errors": null}', Result.MALFORMED),
        (200, "OK", body({"vmid": 102, "status": "running"}), Result.MALFORMED),  # another guest's status
        (200, "OK", body({"vmid": 101}), Result.MALFORMED),
        (200, "OK", body([]), Result.MALFORMED),
    ],
)
def test_status_answers(code, reason, payload, result):
    seen = read_status(101, "pve1", "lxc", code, reason, payload)
    assert seen.result == result
    if result == Result.PRESENT:
        assert (seen.node, seen.type) == ("pve1", "lxc") and seen.status in ("stopped", "running")
    elif result != Result.GONE:
        assert seen.detail  # every odd answer says why


def test_node_list_answers():
    listed = body([{"vmid": 101, "status": "stopped"}, {"vmid": "103", "status": "running"}])
    seen, count = read_node_list([101, 103, 105], "pve1", "lxc", 200, "OK", listed)
    assert count == 2
    assert seen[101] == Seen(Result.PRESENT, "stopped", "pve1", "lxc")
    assert seen[103].status == "running"  # a VMID sent as a string
    assert seen[105].result == Result.GONE


@pytest.mark.parametrize(
    "code, payload, result",
    [
        (595, b"", Result.OFFLINE),
        (403, b"", Result.PRIVILEGE),
        (200, body([{"vmid": 101}]), Result.MALFORMED),  # no status: nothing in the answer is trusted
        (200, body([{"vmid": True, "status": "running"}]), Result.MALFORMED),
        (200, body({"vmid": 101}), Result.MALFORMED),
    ],
)
def test_odd_node_list_answers_make_no_candidate(code, payload, result):
    seen, count = read_node_list([101, 105], "pve1", "lxc", code, "odd", payload)
    assert {s.result for s in seen.values()} == {result} and count == 0


def test_merge_present_beats_odd_beats_gone():
    gone, odd, here = Seen(Result.GONE), Seen(Result.OFFLINE), Seen(Result.PRESENT, "running")
    assert merge(None, gone) == gone
    assert merge(gone, here) == here and merge(here, gone) == here
    assert merge(gone, odd) == odd and merge(odd, gone) == odd
    assert merge(gone, gone).result == Result.GONE


@pytest.mark.parametrize(
    "node, ok",
    [("pve1", True), ("node-2.lab", True), ("../access", False), ("pve1/lxc", False), ("", False), ("-x", False)],
)
def test_node_names_from_events(node, ok):
    assert node_name_ok(node) is ok


# --- what to read ----------------------------------------------------------------------------


def shape(guests_per_node: int, nodes: int = 10) -> ListShape:
    per_node = Counter({(f"pve{i}", "lxc"): guests_per_node for i in range(nodes)})
    return ListShape(guests_per_node * nodes, 310 * guests_per_node * nodes, per_node)


def test_no_whole_list_yet_or_an_unknown_node_reads_the_whole_list():
    assert Costs().choose({101: Where("pve1", "lxc")}, None).full
    choice = Costs().choose({101: Where("pve1", "lxc"), 102: None}, shape(1000))
    assert choice.full and "102" in choice.why
    assert not Costs().choose({}, shape(1000)).full


def test_one_stopped_guest_is_asked_about_on_its_node():
    choice = Costs().choose({101: Where("pve1", "lxc")}, shape(1000))
    assert not choice.full
    assert [(a.kind, a.node, a.types, a.vmids) for a in choice.asks] == [(Kind.GUEST, "pve1", ("lxc",), (101,))]
    assert choice.full_bytes is not None and choice.probe_bytes < choice.full_bytes / 100


def test_a_guest_of_unknown_type_is_asked_about_as_its_nodes_commoner_type_first():
    s = ListShape(30, 9300, Counter({("pve1", "qemu"): 20, ("pve1", "lxc"): 10}))
    costs = Costs()
    costs.list_entry_bytes = 1000.0  # lists dear: status requests win
    (ask,) = costs.choose({101: Where("pve1")}, s).asks
    assert ask.kind == Kind.GUEST and ask.types == ("qemu", "lxc")


def test_many_guests_of_one_node_are_read_from_its_list():
    due = {v: Where("pve3", "lxc") for v in range(1000, 1500)}  # a node shutdown: 500 stopped at once
    choice = Costs().choose(due, shape(600))
    assert not choice.full
    assert [(a.kind, a.node, a.types, len(a.vmids)) for a in choice.asks] == [(Kind.NODE, "pve3", ("lxc",), 500)]


def test_a_small_cluster_is_read_whole_when_that_is_cheaper():
    due = {v: Where(f"pve{v % 10}", "lxc") for v in range(100, 600)}  # half of it, on every node
    choice = Costs().choose(due, shape(100))
    assert choice.full and choice.full_bytes is not None and choice.full_bytes <= choice.probe_bytes


def test_measured_sizes_steer_the_choice():
    costs = Costs()
    for _ in range(30):
        costs.measured_status(5000)  # status answers turn out large
    assert costs.status_bytes == pytest.approx(5000)
    due = {v: Where("pve1", "lxc") for v in range(100, 110)}
    assert {a.kind for a in costs.choose(due, shape(100)).asks} == {Kind.NODE}
    costs.measured_list(0, 0)  # an empty list measures nothing
    assert costs.list_entry_bytes is None


# --- when to read ----------------------------------------------------------------------------


def probe_times(fade: Fade, anchor, seconds: int, vmid: int = 101) -> list[int]:
    times = []
    for t in range(seconds + 1):
        now = anchor + timedelta(seconds=t)
        if fade.due(vmid, anchor, now, slack=0.5):
            fade.probed(vmid, anchor, now)
            times.append(t)
    return times


def test_the_fade_probes_every_second_for_a_minute_then_backs_off():
    anchor = utcnow()
    times = probe_times(Fade(), anchor, 600)
    assert times[:60] == list(range(60))
    assert times[60:] == [60, 62, 66, 74, 90, 122, 186, 314, 570]
    assert FAST_SECONDS == 60


def test_the_fade_gap_stops_growing():
    times = probe_times(Fade(), utcnow(), 3000)
    gaps = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
    assert max(gaps) == MAX_GAP_SECONDS and gaps[-1] == MAX_GAP_SECONDS


def test_a_new_hint_brings_the_one_second_probes_back():
    fade, anchor = Fade(), utcnow()
    probe_times(fade, anchor, 200)
    later = anchor + timedelta(seconds=201)
    assert not fade.due(101, anchor, later) and fade.gap(101) == 128
    assert fade.due(101, later, later)  # a new anchor: due at once
    assert probe_times(fade, later, 5) == [0, 1, 2, 3, 4, 5]


def test_a_forgotten_vmid_starts_over():
    fade, anchor = Fade(), utcnow()
    probe_times(fade, anchor, 100)
    fade.keep_only(set())
    assert fade.gap(101) is None and fade.due(101, anchor, anchor + timedelta(seconds=101))
