"""Reading a Prometheus text exposition in tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0.0: none)."""
    return sum(sample.value
               for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v
                                              for k, v in labels.items()))


def label_values(text: str, name: str, label: str) -> set[str]:
    return {sample.labels[label] for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name and label in sample.labels}
