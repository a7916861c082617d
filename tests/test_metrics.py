"""Prometheus metrics on a registry of the app's own (receiver/metrics.py)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from receiver.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def test_each_metrics_object_has_a_registry_of_its_own():
    a, b = Metrics(), Metrics()  # a second one would fail on a shared registry (duplicate names)
    a.sweep("done")
    assert samples(a)[("pve_janitor_sweeps_total", (("outcome", "done"),))] == 1
    assert ("pve_janitor_sweeps_total", (("outcome", "done"),)) not in samples(b)


def test_removals_add_up_by_reason_and_source_and_zero_adds_no_series():
    m = Metrics()
    m.removal("ghost", "sweep", 3)
    m.removal("ghost", "sweep")
    m.removal("old_error", "watcher", 0)
    found = samples(m)
    assert found[("pve_janitor_rows_removed_total", (("reason", "ghost"), ("source", "sweep")))] == 4
    assert not any(
        name == "pve_janitor_rows_removed_total" and ("reason", "old_error") in labels for name, labels in found
    )


def test_refusals_events_and_inventory_reads_are_labelled():
    m = Metrics()
    m.refusal("guard", "sweep")
    m.refusal("guard", "sweep")
    m.event("post-stop", "stored")
    m.inventory_read(0.2, "ok")
    m.inventory_read(7.0, "ok")
    found = samples(m)
    assert found[("pve_janitor_refusals_total", (("reason", "guard"), ("source", "sweep")))] == 2
    assert found[("pve_janitor_events_total", (("outcome", "stored"), ("phase", "post-stop")))] == 1
    assert found[("pve_janitor_inventory_read_seconds_count", (("outcome", "ok"),))] == 2
    assert found[("pve_janitor_inventory_read_seconds_bucket", (("le", "0.25"), ("outcome", "ok")))] == 1
    assert found[("pve_janitor_inventory_read_seconds_sum", (("outcome", "ok"),))] == 7.2


def test_gauges_render_as_set():
    m = Metrics()
    m.leader.set(1)
    m.inbox_backlog.set(12)
    m.hidden_guests.labels(source="watcher").set(2)
    found = samples(m)
    assert found[("pve_janitor_leader", ())] == 1
    assert found[("pve_janitor_inbox_backlog", ())] == 12
    assert found[("pve_janitor_hidden_guests", (("source", "watcher"),))] == 2
    assert found[("pve_janitor_watched_vmids", ())] == 0
