"""The node's Prometheus metrics (``/metrics`` of the web page), names prefixed ``lumbar_node_``,
in a registry of their own (nothing of the process's default registry is exported).

Counters and histograms are updated where things happen (the storage SCP, the node); the gauges
(studies per state, spool free disk, queued gradings) are read when Prometheus scrapes.

Receiver processes (``dicom.receivers``) keep their own counters and send ``snapshot()`` to the
node's process about once a second; the node adds them to its own when it exports
(``add_source``), so ``/metrics`` counts every process's C-STOREs and associations.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric, Sample
from prometheus_client.registry import Collector

from dicom_node.states import SkipReason, StudyState

# no *_created series: counters and histograms only, as Prometheus users expect
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

PREFIX = "lumbar_node"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# C-STORE handling is milliseconds; grading and end to end are seconds to minutes.
CSTORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
GRADING_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
END_TO_END_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


#: A process's counters and histograms as plain data: {sample name: {sorted label pairs: value}}.
Snapshot = dict[str, dict[tuple[tuple[str, str], ...], float]]


def skip_label(reason: str | None) -> str:
    """The bounded label of a skip reason: the SkipReason's name, or 'other'."""
    for why in SkipReason:
        if reason and reason.startswith(why.value):
            return why.name.lower()
    return "other"


class _Gauges(Collector):
    """Gauges computed at scrape time from the callbacks the node gives."""

    def __init__(self, state_counts: Callable[[], dict[StudyState, int]], spool: Path,
                 queued: Callable[[], int]):
        self.state_counts, self.spool, self.queued = state_counts, spool, queued

    def collect(self) -> Iterable[Metric]:
        studies = GaugeMetricFamily(f"{PREFIX}_studies", "Studies in the ledger per state", labels=["state"])
        for state, n in self.state_counts().items():
            studies.add_metric([str(state)], n)
        yield studies
        try:
            free = float(shutil.disk_usage(self.spool).free)
        except OSError:
            free = float("nan")
        yield GaugeMetricFamily(f"{PREFIX}_spool_free_bytes", "Free disk space where the spool is", value=free)
        yield GaugeMetricFamily(f"{PREFIX}_gradings_queued", "Studies handed to the grading workers and not back yet",
                                value=self.queued())


class NodeMetrics:
    """Every metric of one node, in its own CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.instances_received = Counter(f"{PREFIX}_instances_received", "Instances stored (C-STORE or upload)",
                                          ["source"], registry=r)
        self.received_bytes = Counter(f"{PREFIX}_received_bytes", "Bytes of the instances stored", ["source"],
                                      registry=r)
        self.cstore_status = Counter(f"{PREFIX}_cstore_responses", "C-STORE responses by status code", ["status"],
                                     registry=r)
        self.associations = Counter(f"{PREFIX}_associations", "Associations requested: accepted, or rejected "
                                    "with the reason", ["result", "reason"], registry=r)
        self.released = Counter(f"{PREFIX}_studies_released", "Studies released for grading, by why",
                                ["why"], registry=r)
        self.graded = Counter(f"{PREFIX}_studies_graded", "Gradings that produced a report", registry=r)
        self.skipped = Counter(f"{PREFIX}_studies_skipped", "Gradings that skipped the study, by reason",
                               ["reason"], registry=r)
        self.failed = Counter(f"{PREFIX}_studies_failed", "Gradings that failed", registry=r)
        self.deliveries = Counter(f"{PREFIX}_deliveries", "Results delivered, per destination", ["destination"],
                                  registry=r)
        self.delivery_failures = Counter(f"{PREFIX}_delivery_failed_attempts", "Failed delivery attempts, per "
                                         "destination", ["destination"], registry=r)
        self.cstore_seconds = Histogram(f"{PREFIX}_cstore_seconds", "Time to handle one C-STORE (check, write, "
                                        "record)", buckets=CSTORE_BUCKETS, registry=r)
        self.grading_seconds = Histogram(f"{PREFIX}_grading_seconds", "Time a worker spent grading one study",
                                         buckets=GRADING_BUCKETS, registry=r)
        self.end_to_end_seconds = Histogram(f"{PREFIX}_end_to_end_seconds", "Last instance in -> last result "
                                            "delivered", buckets=END_TO_END_BUCKETS, registry=r)
        self._gauges: _Gauges | None = None
        self._sources: list[Callable[[], list[Snapshot]]] = []

    def watch(self, state_counts: Callable[[], dict[StudyState, int]], spool: Path, queued: Callable[[], int]) -> None:
        """Export the gauges read at scrape time (once per registry)."""
        if self._gauges is None:
            self._gauges = _Gauges(state_counts, spool, queued)
            self.registry.register(self._gauges)

    def add_source(self, snapshots: Callable[[], list[Snapshot]]) -> None:
        """Counters and histograms of other processes (their ``snapshot()``), added to this one's
        when exported."""
        self._sources.append(snapshots)

    def snapshot(self) -> Snapshot:
        """This process's counters and histograms as plain data (for the node's process)."""
        out: Snapshot = defaultdict(dict)
        for family in self.registry.collect():
            if family.type in ("counter", "histogram"):
                for sample in family.samples:
                    out[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
        return dict(out)

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format (with the other processes' counts, if any)."""
        if not self._sources:
            return generate_latest(self.registry)
        extra: Snapshot = defaultdict(lambda: defaultdict(float))
        for source in self._sources:
            for snap in source():
                for name, values in snap.items():
                    for labels, value in values.items():
                        extra[name][labels] += value
        return generate_latest(_Merged(self.registry, extra))


class _Merged(Collector):
    """A registry's families with other processes' counts added to each counter and histogram sample."""

    def __init__(self, registry: CollectorRegistry, extra: Snapshot):
        self.registry, self.extra = registry, extra

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():
            if family.type not in ("counter", "histogram"):
                yield family
                continue
            seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
            samples = []
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                seen.add((sample.name, labels))
                samples.append(sample._replace(value=sample.value + self.extra.get(sample.name, {}).get(labels, 0.0)))
            names = {s.name for s in family.samples} | {family.name + suffix for suffix in
                                                          ("_total", "_bucket", "_count", "_sum")}
            for name in sorted(names & set(self.extra)):  # label sets only other processes have seen
                for labels, value in self.extra[name].items():
                    if (name, labels) not in seen:
                        samples.append(Sample(name, dict(labels), value))
            family.samples = samples
            yield family
