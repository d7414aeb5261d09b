import math

import pytest

from pd.metrics import Registry, parse_samples


def test_render_and_parse_round_trip():
    reg = Registry()
    c = reg.counter("pd_requests_total", "Requests.", ["role"])
    g = reg.gauge("pd_kv_pages_used", "Pages in use.", ["role", "instance", "rank"])
    h = reg.histogram("pd_ttft_seconds", "TTFT.", [], buckets=[0.1, 1.0])
    c.inc(role="prefill")
    c.inc(2, role="prefill")
    g.set(5, role="decode", instance='d"0', rank="0")
    used = [7]
    g.set_function(lambda: used[0], role="prefill", instance="p0", rank="1")
    used[0] = 9
    for v in (0.05, 0.5, 3.0):
        h.observe(v)
    s = parse_samples(reg.render())
    assert s[("pd_requests_total", (("role", "prefill"),))] == 3
    assert s[("pd_kv_pages_used", (("role", "decode"), ("instance", 'd"0'), ("rank", "0")))] == 5
    assert s[("pd_kv_pages_used", (("role", "prefill"), ("instance", "p0"), ("rank", "1")))] == 9
    assert s[("pd_ttft_seconds_bucket", (("le", "0.1"),))] == 1
    assert s[("pd_ttft_seconds_bucket", (("le", "1"),))] == 2
    assert s[("pd_ttft_seconds_bucket", (("le", "+Inf"),))] == 3
    assert math.isclose(s[("pd_ttft_seconds_sum", ())], 3.55)
    assert h.count() == 3


def test_label_and_counter_misuse_is_an_error():
    reg = Registry()
    c = reg.counter("x_total", "x", ["a"])
    with pytest.raises(ValueError, match="labels"):
        c.inc(b="1")
    with pytest.raises(ValueError, match="decrease"):
        c.inc(-1, a="1")
    with pytest.raises(ValueError, match="twice"):
        reg.counter("x_total", "x")
