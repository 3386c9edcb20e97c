"""The node's Prometheus metrics: names, labels, gauges read at scrape time, the text format."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from dicom_node.observability.metrics import NodeMetrics, skip_label
from dicom_node.states import SkipReason, StudyState


def _samples(metrics: NodeMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_metric_is_prefixed_and_counters_move(tmp_path: Path) -> None:
    metrics = NodeMetrics()
    queued = [3]
    metrics.watch(lambda: {**dict.fromkeys(StudyState, 0), StudyState.DONE: 4}, tmp_path, lambda: queued[0])
    metrics.instances_received.labels("dicom").inc(5)
    metrics.cstore_status.labels("0x0000").inc(5)
    metrics.associations.labels("rejected", "unknown peer").inc()
    metrics.skipped.labels(skip_label("not a lumbar spine study (BodyPartExamined HEAD)")).inc()
    metrics.grading_seconds.observe(2.5)
    samples = _samples(metrics)
    assert all(name.startswith("lumbar_node_") for name, _ in samples)
    assert not any(name.endswith("_created") for name, _ in samples)
    assert samples[("lumbar_node_instances_received_total", (("source", "dicom"),))] == 5
    assert samples[("lumbar_node_cstore_responses_total", (("status", "0x0000"),))] == 5
    assert samples[("lumbar_node_associations_total", (("reason", "unknown peer"), ("result", "rejected")))] == 1
    assert samples[("lumbar_node_studies_skipped_total", (("reason", "not_lumbar"),))] == 1
    assert samples[("lumbar_node_grading_seconds_count", ())] == 1
    assert samples[("lumbar_node_grading_seconds_bucket", (("le", "5.0"),))] == 1
    assert samples[("lumbar_node_studies", (("state", "done"),))] == 4
    assert samples[("lumbar_node_studies", (("state", "failed"),))] == 0
    assert samples[("lumbar_node_gradings_queued", ())] == 3
    assert samples[("lumbar_node_spool_free_bytes", ())] > 0
    queued[0] = 0
    assert _samples(metrics)[("lumbar_node_gradings_queued", ())] == 0  # read at each scrape


def test_two_nodes_have_their_own_registries() -> None:
    a, b = NodeMetrics(), NodeMetrics()
    a.graded.inc()
    assert _samples(a)[("lumbar_node_studies_graded_total", ())] == 1
    assert _samples(b)[("lumbar_node_studies_graded_total", ())] == 0


def test_skip_reasons_are_a_bounded_label() -> None:
    assert skip_label(SkipReason.NO_SERIES.value) == "no_series"
    assert skip_label("not an MR study (modality CT)") == "not_mr"
    assert skip_label("anything else") == "other" and skip_label(None) == "other"
