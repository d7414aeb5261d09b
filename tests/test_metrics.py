import math
import threading

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pd.metrics import MetricNameError, Registry, parse_samples
from pd.proxy.config import ProxyConfig
from pd.worker.metrics import RANK_LABELS, WorkerMetrics


def families(text: str) -> dict[str, str]:
    """{family name: TYPE} as prometheus_client's parser reads ``text`` (a counter's family drops ``_total``)."""
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_render_and_parse_round_trip():
    reg = Registry()
    c = reg.counter("pd_requests_total", "Requests.", ["role"])
    g = reg.gauge("pd_kv_pages_used", "Pages in use.", ["role", "instance", "rank"])
    h = reg.histogram("pd_ttft_seconds", "TTFT.", [], buckets=[1.0, 0.1])
    c.inc(role="prefill")
    c.inc(2, role="prefill")
    g.set(5, role="decode", instance='d"0\\\n', rank="0")
    used = [7]
    g.set_function(lambda: used[0], role="prefill", instance="p0", rank="1")
    used[0] = 9
    for v in (0.05, 0.5, 3.0):
        h.observe(v)
    s = parse_samples(reg.render())
    # Labels come back sorted by name, values unescaped.
    assert s[("pd_requests_total", (("role", "prefill"),))] == 3
    assert s[("pd_kv_pages_used", (("instance", 'd"0\\\n'), ("rank", "0"), ("role", "decode")))] == 5
    assert s[("pd_kv_pages_used", (("instance", "p0"), ("rank", "1"), ("role", "prefill")))] == 9
    assert s[("pd_ttft_seconds_bucket", (("le", "0.1"),))] == 1
    assert s[("pd_ttft_seconds_bucket", (("le", "1.0"),))] == 2
    assert s[("pd_ttft_seconds_bucket", (("le", "+Inf"),))] == 3
    assert s[("pd_ttft_seconds_count", ())] == 3
    assert math.isclose(s[("pd_ttft_seconds_sum", ())], 3.55)
    assert c.value(role="prefill") == 3 and c.value(role="decode") == 0
    assert g.value(role="prefill", instance="p0", rank="1") == 9
    assert h.count() == 3
    # Reading a series that was never written does not create it.
    assert ("pd_requests_total", (("role", "decode"),)) not in parse_samples(reg.render())


def test_label_and_counter_misuse_is_an_error():
    reg = Registry()
    c = reg.counter("x_total", "x", ["a"])
    with pytest.raises(ValueError, match="labels"):
        c.inc(b="1")
    with pytest.raises(ValueError, match="labels"):
        c.value()
    with pytest.raises(ValueError, match="decrease"):
        c.inc(-1, a="1")
    with pytest.raises(ValueError, match="twice"):
        reg.counter("x_total", "x")
    with pytest.raises(ValueError):  # the library's own check: x_total's series include x_created
        reg.gauge("x_created", "x")


def test_each_registry_is_its_own():
    a, b = Registry(), Registry()
    a.counter("pd_things_total", "Things.").inc(3)
    b.counter("pd_things_total", "Things.")
    assert parse_samples(b.render())[("pd_things_total", ())] == 0
    assert prometheus_client.REGISTRY.get_sample_value("pd_things_total") is None


def test_no_created_series():
    reg = Registry()
    reg.counter("pd_things_total", "Things.").inc()
    reg.histogram("pd_wait_seconds", "Waits.").observe(1.0)
    text = reg.render()
    assert "_created" not in text
    assert families(text) == {"pd_things": "counter", "pd_wait_seconds": "histogram"}


def test_concurrent_updates_are_not_lost():
    reg = Registry()
    c = reg.counter("pd_things_total", "Things.", ["t"])
    h = reg.histogram("pd_wait_seconds", "Waits.", ["t"])

    def work(i: int) -> None:
        for _ in range(2000):
            c.inc(t=str(i % 2))
            h.observe(0.01, t=str(i % 2))
            reg.render()  # while another thread updates

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value(t="0") == c.value(t="1") == 4000
    assert h.count(t="0") == h.count(t="1") == 4000


def test_worker_metrics_render_parseable_with_types():
    w = WorkerMetrics("decode")
    labels = {"role": "decode", "instance": "d0", "rank": "1"}
    w.pages_used.set_function(lambda: 12, **labels)
    w.pages_capacity.set(100, **labels)
    w.rooms.set_function(lambda: 2, **labels)
    w.transfer_rooms.set(1, **labels)
    w.expert_tokens.set(40, **labels, expert="3")
    w.requests.inc(role="decode", outcome="ok")
    w.aborts.inc(role="decode")
    w.queue.set_function(lambda: 4, role="decode", queue="running")
    w.transfer_failures.inc(role="decode")
    w.checksum_failed(7, "KV checksum mismatch")
    w.transfer_bytes.inc(4096, role="decode")
    w.transfer_seconds.observe(0.02, role="decode")
    w.pages_cached.set_function(lambda: 3, **labels)
    w.prefix_matched(40, 32)
    w.prefix_matched(8, 0)
    w.speculated([2, 2, 0], [3, 1, 1])  # drafts verified, tokens emitted: 2 + 0 accepted
    text = w.render()
    assert families(text) == {
        "pd_kv_pages_used": "gauge",
        "pd_kv_pages_capacity": "gauge",
        "pd_rooms_open": "gauge",
        "pd_transfer_rooms_open": "gauge",
        "pd_expert_tokens": "gauge",
        "pd_requests": "counter",
        "pd_aborts": "counter",
        "pd_queue_length": "gauge",
        "pd_transfer_failures": "counter",
        "pd_kv_checksum_failures": "counter",
        "pd_transfer_bytes": "counter",
        "pd_transfer_seconds": "histogram",
        "pd_decode_batch_size": "histogram",
        "pd_kv_pages_cached": "gauge",
        "pd_prefix_cache_query_tokens": "counter",
        "pd_prefix_cache_hit_tokens": "counter",
        "pd_spec_draft_tokens": "counter",
        "pd_spec_accepted_tokens": "counter",
        "pd_spec_tokens_per_step": "histogram",
    }
    s = parse_samples(text)
    rank = tuple(sorted(labels.items()))
    assert s[("pd_kv_pages_used", rank)] == 12 and s[("pd_kv_pages_capacity", rank)] == 100
    assert s[("pd_expert_tokens", tuple(sorted({**labels, "expert": "3"}.items())))] == 40
    assert s[("pd_transfer_bytes_total", (("role", "decode"),))] == 4096
    assert s[("pd_kv_checksum_failures_total", (("role", "decode"),))] == 1
    assert s[("pd_kv_pages_cached", rank)] == 3
    assert s[("pd_prefix_cache_query_tokens_total", (("role", "decode"),))] == 48
    assert s[("pd_prefix_cache_hit_tokens_total", (("role", "decode"),))] == 32
    assert s[("pd_transfer_seconds_count", (("role", "decode"),))] == 1
    for position, drafts, accepted in (("0", 2, 1), ("1", 2, 1)):
        at = (("position", position), ("role", "decode"))
        assert s[("pd_spec_draft_tokens_total", at)] == drafts
        assert s[("pd_spec_accepted_tokens_total", at)] == accepted
    assert s[("pd_spec_tokens_per_step_sum", (("role", "decode"),))] == 5
    assert set(RANK_LABELS) <= {k for (name, ls) in s if name == "pd_rooms_open" for k, _ in ls}


def test_proxy_metrics_render_parseable_with_types():
    pytest.importorskip("starlette")  # the proxy's HTTP part; absent on a bare GPU host
    from pd.proxy.http import Proxy

    proxy = Proxy(ProxyConfig(bootstrap="127.0.0.1:1"))
    proxy.m_requests.inc(endpoint="completions", status="200")
    proxy.dispatcher.m_ttft.observe(0.3)
    proxy.dispatcher.m_tokens.inc(5, kind="completion")
    assert families(proxy.metrics.render()) == {
        "pd_proxy_requests": "counter",
        "pd_proxy_requests_inflight": "gauge",
        "pd_proxy_ttft_seconds": "histogram",
        "pd_request_phase_seconds": "histogram",
        "pd_kv_transfer_gbytes_per_second": "histogram",
        "pd_request_ttft_unaccounted_seconds": "histogram",
        "pd_proxy_tpot_seconds": "histogram",
        "pd_proxy_e2e_seconds": "histogram",
        "pd_proxy_aborts": "counter",
        "pd_proxy_tokens": "counter",
        "pd_proxy_prefill_retries": "counter",
        "pd_proxy_decode_retries": "counter",
    }


def test_proxy_metrics_scrape_survives_a_rank_leaving_mid_scrape():
    """A rank whose channel was closed as it left (the router prunes it) is skipped by the scrape, which
    still answers (it raised UsageError into a 500 before; a CI run's wait for a restarted rank failed on it)."""
    pytest.importorskip("starlette")
    import asyncio

    from pd.proxy.http import Proxy
    from pd.proxy.router import Rank
    from pd.rpc import bootstrap_pb2 as bpb

    proxy = Proxy(ProxyConfig(bootstrap="127.0.0.1:1"))
    gone = Rank(bpb.ROLE_PREFILL, "p1", 0, "127.0.0.1:9", "m", 512)
    proxy.router.ranks[gone.key] = gone

    async def scrape() -> str:
        await proxy.router.channel(gone.endpoint).close()
        return await proxy._relayed_metrics()

    assert "pd_kv_pages_used" not in asyncio.run(scrape())


# One case per rule of `promtool check metrics` the Registry enforces: (kind, name, help, labels, error).
REFUSED = {
    "gauge ending in _total": ("gauge", "pd_kv_pages_total", "Pages.", (), "only counters end in"),
    "histogram ending in _total": ("histogram", "pd_wait_total", "Waits.", (), "only counters end in"),
    "counter without _total": ("counter", "pd_requests", "Requests.", (), 'must end in "_total"'),
    "missing help": ("gauge", "pd_pages", "", (), "no help text"),
    "blank help": ("counter", "pd_requests_total", "  ", (), "no help text"),
    "camelCase name": ("gauge", "pd_kvPages", "Pages.", (), "snake_case"),
    "colon in name": ("gauge", "pd:pages", "Pages.", (), "snake_case"),
    "name starting with a digit": ("gauge", "1pd_pages", "Pages.", (), "snake_case"),
    "other characters in name": ("gauge", "pd-pages", "Pages.", (), "snake_case"),
    "camelCase label": ("gauge", "pd_pages", "Pages.", ("roleName",), "label 'roleName' must be snake_case"),
    "label with a dash": ("gauge", "pd_pages", "Pages.", ("the-role",), "must be snake_case"),
    "reserved __ label": ("gauge", "pd_pages", "Pages.", ("__role",), "no leading '__'"),
    "le label": ("gauge", "pd_pages", "Pages.", ("le",), "label 'le' is reserved"),
    "le label on a histogram": ("histogram", "pd_wait_seconds", "Waits.", ("le",), "label 'le' is reserved"),
    "quantile label": ("counter", "pd_requests_total", "Requests.", ("quantile",), "'quantile' is reserved"),
    "duplicate label": ("gauge", "pd_pages", "Pages.", ("role", "role"), "duplicate labels"),
    "_bucket suffix": ("gauge", "pd_pages_bucket", "Pages.", (), '"_bucket" is reserved'),
    "_count suffix": ("gauge", "pd_pages_count", "Pages.", (), '"_count" is reserved'),
    "_sum suffix": ("gauge", "pd_pages_sum", "Pages.", (), '"_sum" is reserved'),
    "type in name": ("gauge", "pd_pages_gauge", "Pages.", (), "type 'gauge'"),
    "type inside name": ("counter", "pd_counter_requests_total", "Requests.", (), "type 'counter'"),
    "abbreviated unit": ("histogram", "pd_wait_ms", "Waits.", (), "abbreviated units"),
    "abbreviated unit inside": ("counter", "pd_transfer_kb_total", "KB.", (), "abbreviated units"),
    "prefixed base unit": ("histogram", "pd_wait_milliseconds", "Waits.", (), 'base unit "seconds"'),
    "non-base unit": ("gauge", "pd_uptime_hours", "Uptime.", (), 'base unit "seconds" instead of "hours"'),
    "bits": ("counter", "pd_transfer_megabits_total", "Bits.", (), 'base unit "bytes"'),
}


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_registry_refuses_what_promtool_flags(case):
    kind, name, help_text, labels, error = case
    reg = Registry()
    create = getattr(reg, kind)
    with pytest.raises(MetricNameError, match=error):
        create(name, help_text, labels)
    assert reg.render() == ""  # nothing was registered


@pytest.mark.parametrize(
    "kind, name",
    [
        ("counter", "pd_transfer_bytes_total"),
        ("gauge", "pd_queue_length"),
        ("histogram", "pd_transfer_seconds"),
        # promtool flags abbreviations and types only after the first word.
        ("gauge", "ms_since_start_seconds"),
        ("gauge", "counter_resets"),
    ],
)
def test_registry_accepts_good_names(kind, name):
    getattr(Registry(), kind)(name, "Help.", ["role"])


def test_relayed_label_values_are_escaped():
    """The proxy writes relayed samples back as text: a label value with a quote, backslash or newline must
    parse back to itself."""
    pytest.importorskip("starlette")
    from pd.proxy.http import _escape

    value = 'in"st\\ance\nid'
    assert parse_samples(f'pd_rooms_open{{instance="{_escape(value)}"}} 1\n') == {
        ("pd_rooms_open", (("instance", value),)): 1.0
    }
