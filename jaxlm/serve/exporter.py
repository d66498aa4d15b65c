"""``Engine.stats()`` as Prometheus metrics, through prometheus_client's custom-collector interface.

Every numeric value of the snapshot becomes a metric named ``jaxlm_<key>`` when it is scraped, so
a new statistic appears without more code: keys ending in ``_total`` are counters, the
``<name>_p50/_p99/_sum/_count`` groups summaries (quantile labels 0.50 and 0.99), the rest gauges;
:data:`jaxlm.serve.metrics._HELP`, where it names the key, gives its kind and help text.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jaxlm.serve.metrics import _HELP, _SUMMARIES

_QUANTILE = re.compile(r"^(?P<name>.+)_p(?P<q>\d{2})$")


class EngineCollector(Collector):
    """Collects ``stats()`` (a dict of numbers) at each scrape, names prefixed with ``prefix``."""

    def __init__(self, stats: Callable[[], dict[str, float]], prefix: str = "jaxlm_"):
        self._stats = stats
        self._prefix = prefix

    def collect(self) -> Iterator[Metric]:
        values = {k: float(v) for k, v in self._stats().items() if isinstance(v, (int, float))}
        summaries = {k[: -len("_count")] for k in values if k.endswith("_count") and k[: -len("_count")] + "_sum" in values}
        for name in sorted(summaries):
            metric = Metric(self._prefix + name, _SUMMARIES.get(name, name.replace("_", " ")), "summary")
            for key, value in values.items():
                m = _QUANTILE.match(key)
                if m and m["name"] == name:
                    metric.add_sample(self._prefix + name, {"quantile": f"0.{m['q']}"}, value)
            metric.add_sample(self._prefix + name + "_sum", {}, values[name + "_sum"])
            metric.add_sample(self._prefix + name + "_count", {}, values[name + "_count"])
            yield metric
        for key, value in values.items():
            m = _QUANTILE.match(key)
            if (m and m["name"] in summaries) or any(key in (s + "_sum", s + "_count") for s in summaries):
                continue
            kind, help_ = _HELP.get(key, ("counter" if key.endswith("_total") else "gauge", key.replace("_", " ")))
            if kind == "counter" and key.endswith("_total"):
                yield CounterMetricFamily(self._prefix + key[: -len("_total")], help_, value=value)
            else:
                yield GaugeMetricFamily(self._prefix + key, help_, value=value)
