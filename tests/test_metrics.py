"""Prometheus metrics on a registry of the app's own (receiver/metrics.py)."""

from __future__ import annotations

import datetime as dt

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


def test_build_info_names_the_version():
    from receiver import __version__

    assert samples(Metrics())[("pve_janitor_build_info", (("version", __version__),))] == 1
    assert samples(Metrics(version="9.9.9"))[("pve_janitor_build_info", (("version", "9.9.9"),))] == 1


def test_no_created_series_in_the_rendering():
    m = Metrics()
    m.sweep("done", 0.4)
    m.rejected("signature")
    m.removal("ghost", "sweep")
    m.inventory_read(0.1, "ok")
    text = m.render().decode()
    assert "pve_janitor_sweeps_total" in text and "pve_janitor_sweep_duration_seconds_count" in text
    assert "_created" not in text
    # the registry itself still has them: only this rendering leaves them out, nothing global changed
    assert any(s.name.endswith("_created") for family in m.registry.collect() for s in family.samples)


def test_sweep_duration_and_rejected_events_by_reason():
    m = Metrics()
    m.sweep("done", 0.3)
    m.sweep("refused", 40.0)
    m.sweep("disabled")  # no duration: nothing observed
    m.rejected("signature")
    m.rejected("signature")
    m.rejected("timestamp")
    found = samples(m)
    assert found[("pve_janitor_sweep_duration_seconds_count", ())] == 2
    assert found[("pve_janitor_sweep_duration_seconds_sum", ())] == 40.3
    assert found[("pve_janitor_sweep_duration_seconds_bucket", (("le", "0.5"),))] == 1
    assert found[("pve_janitor_sweep_duration_seconds_bucket", (("le", "60.0"),))] == 2
    assert found[("pve_janitor_sweeps_total", (("outcome", "disabled"),))] == 1
    assert found[("pve_janitor_events_rejected_total", (("reason", "signature"),))] == 2
    assert found[("pve_janitor_events_rejected_total", (("reason", "timestamp"),))] == 1


def test_the_watcher_state_is_read_when_scraped():
    m = Metrics()
    alive: list[bool] = [True]
    last_tick: list[dt.datetime | None] = [None]
    m.follow_watcher(lambda: alive[0], lambda: last_tick[0])
    assert samples(m)[("pve_janitor_watcher_up", ())] == 1
    assert samples(m)[("pve_janitor_watcher_last_tick_timestamp_seconds", ())] == 0
    alive[0], last_tick[0] = False, dt.datetime(2024, 6, 10, 6, 13, 20, tzinfo=dt.timezone.utc)
    found = samples(m)
    assert found[("pve_janitor_watcher_up", ())] == 0
    assert found[("pve_janitor_watcher_last_tick_timestamp_seconds", ())] == 1718000000
