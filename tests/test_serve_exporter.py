"""Engine.stats() through prometheus_client: every number appears, new keys without code changes."""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from jaxlm.serve.exporter import EngineCollector


def test_every_stat_is_exported_with_its_kind():
    stats = {
        "kv_cache_pages_used": 3, "kv_cache_pages_total": 23, "preemptions_total": 2,
        "prefix_cache_hits_total": 7, "prefix_cache_hit_ratio": 0.25,  # keys the exporter has never heard of
        "time_to_first_token_seconds_p50": 0.5, "time_to_first_token_seconds_p99": 0.75,
        "time_to_first_token_seconds_sum": 4.0, "time_to_first_token_seconds_count": 6,
        "note": "not a number",
    }
    registry = CollectorRegistry()
    registry.register(EngineCollector(lambda: stats))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    kinds = {name: f.type for name, f in families.items()}
    assert kinds == {
        "jaxlm_kv_cache_pages_used": "gauge", "jaxlm_kv_cache_pages_total": "gauge",  # _HELP says gauge
        "jaxlm_preemptions": "counter", "jaxlm_prefix_cache_hits": "counter", "jaxlm_prefix_cache_hit_ratio": "gauge",
        "jaxlm_time_to_first_token_seconds": "summary",
    }
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples == {
        ("jaxlm_kv_cache_pages_used", ()): 3, ("jaxlm_kv_cache_pages_total", ()): 23,
        ("jaxlm_preemptions_total", ()): 2, ("jaxlm_prefix_cache_hits_total", ()): 7,
        ("jaxlm_prefix_cache_hit_ratio", ()): 0.25,
        ("jaxlm_time_to_first_token_seconds", (("quantile", "0.50"),)): 0.5,
        ("jaxlm_time_to_first_token_seconds", (("quantile", "0.99"),)): 0.75,
        ("jaxlm_time_to_first_token_seconds_sum", ()): 4.0, ("jaxlm_time_to_first_token_seconds_count", ()): 6,
    }
