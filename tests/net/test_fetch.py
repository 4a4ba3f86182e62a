"""The async fetcher against a real local server: deadlines, caps, redirects, retries, opt-outs."""

from __future__ import annotations

import socket
import time

import pytest

from curate.net.fetch import disallowed_directive, is_transient, user_agent
from tests.net.conftest import fetch, fetch_all
from tests.net.hostile_server import GOOD_JPEG

pytestmark = pytest.mark.timeout(60)

SLACK_S = 0.75  # scheduling slack on a loaded 2-core machine


def test_good_image(server):
    r = fetch(server.url("/static/good.jpg"))
    assert r.error is None and r.status == 200 and r.body == GOOD_JPEG and r.attempts == 1


def test_slow_drip_ends_at_the_deadline(server):
    t0 = time.monotonic()
    r = fetch(server.url("/drip"), timeout=1.0)
    elapsed = time.monotonic() - t0
    assert r.error == "timeout"
    assert elapsed < 1.0 + SLACK_S


def test_server_that_never_answers_ends_at_the_deadline(server):
    t0 = time.monotonic()
    r = fetch(server.url("/hang"), timeout=1.0)
    assert r.error == "timeout"
    assert time.monotonic() - t0 < 1.0 + SLACK_S


def test_many_hostile_downloads_share_one_deadline_window(server):
    """Concurrency: 20 hanging downloads cost one deadline, not twenty."""
    t0 = time.monotonic()
    results = fetch_all([server.url("/hang")] * 10 + [server.url("/drip")] * 10, timeout=1.0)
    assert {r.error for r in results} == {"timeout"}
    assert time.monotonic() - t0 < 1.0 + 2 * SLACK_S


def test_huge_body_by_content_length_is_refused_before_reading(server):
    t0 = time.monotonic()
    r = fetch(server.url("/huge"), timeout=5.0)
    assert r.error == "too_large" and r.status == 200
    assert time.monotonic() - t0 < 1.0


def test_huge_chunked_body_is_cut_at_max_bytes(server):
    r = fetch(server.url("/huge-chunked"), timeout=5.0, max_bytes=256 * 1024)
    assert r.error == "too_large"


def test_redirect_chain_within_the_limit_is_followed(server):
    r = fetch(server.url("/chain/3"), max_redirects=3)
    assert r.error is None and r.body == GOOD_JPEG
    assert r.final_url.endswith("/static/good.jpg")


def test_too_many_redirects(server):
    assert fetch(server.url("/chain/4"), max_redirects=3).error == "too_many_redirects"


def test_redirect_loop(server):
    assert fetch(server.url("/loop/a")).error == "redirect_loop"


def test_redirect_to_another_scheme_is_refused(server):
    r = fetch(server.url("/redirect?to=file:///etc/passwd"))
    assert r.error == "bad_scheme"


def test_http_404(server):
    r = fetch(server.url("/static/missing.jpg"))
    assert (r.error, r.status, r.attempts) == ("http_404", 404, 1)


def test_404_is_not_retried(server):
    r = fetch(server.url("/static/missing2.jpg"), retries=3)
    assert r.error == "http_404" and r.attempts == 1
    assert len(server.hits["/static/missing2.jpg"]) == 1


def test_500_then_200_with_retries(server):
    r = fetch(server.url("/flaky/k500?fail=1&status=500"), retries=2)
    assert r.error is None and r.body == GOOD_JPEG and r.attempts == 2


def test_500_without_retries_fails(server):
    r = fetch(server.url("/flaky/k500b?fail=1&status=500"), retries=0)
    assert r.error == "http_500" and r.status == 500


def test_429_backs_off_exponentially(server):
    r = fetch(server.url("/flaky/k429?fail=2&status=429"), retries=2, retry_backoff=0.2)
    assert r.error is None and r.attempts == 3
    t = server.hits["/flaky/k429"]
    assert len(t) == 3
    assert t[1] - t[0] >= 0.2 and t[2] - t[1] >= 0.4


def test_429_retry_after_is_honoured(server):
    r = fetch(server.url("/flaky/kra?fail=1&status=429&retry_after=0.5"), retries=1, retry_backoff=0.0)
    assert r.error is None
    t = server.hits["/flaky/kra"]
    assert t[1] - t[0] >= 0.5


def test_retries_give_up_with_the_last_reason(server):
    r = fetch(server.url("/flaky/k503?fail=9&status=503"), retries=2, retry_backoff=0.01)
    assert r.error == "http_503" and r.attempts == 3


def test_x_robots_tag_noai_opts_out(server):
    url = server.add("noai.jpg", GOOD_JPEG, headers={"X-Robots-Tag": "noai"})
    r = fetch(url)
    assert r.error == "opt_out:noai" and r.body is None


def test_x_robots_tag_for_another_bot_does_not_apply(server):
    url = server.add("otherbot.jpg", GOOD_JPEG, headers={"X-Robots-Tag": "otherbot: noai"})
    assert fetch(url).error is None
    assert fetch(url, user_agent_token="OtherBot").error == "opt_out:noai"


def test_x_robots_tag_check_can_be_disabled(server):
    url = server.add("noimageai.jpg", GOOD_JPEG, headers={"X-Robots-Tag": "noimageai, nofollow"})
    assert fetch(url).error == "opt_out:noimageai"
    assert fetch(url, disallowed_header_directives=frozenset()).error is None


def test_disallowed_directive_parsing():
    d = frozenset({"noai", "noindex"})
    assert disallowed_directive(["nofollow", "NoIndex"], None, d) == "noindex"
    assert disallowed_directive(["googlebot: noai"], None, d) is None
    assert disallowed_directive(["mybot: noai, nofollow"], "mybot", d) == "noai"
    assert disallowed_directive(["unavailable_after: 25 Jun 2010 15:00:00 PST"], None, d) is None
    assert disallowed_directive([], None, d) is None


def test_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert fetch(f"http://127.0.0.1:{port}/x.jpg").error == "connect_error"


def test_dns_failure_is_dns_error():
    def nxdomain(host, *args):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    assert fetch("http://no-such-host.test/x.jpg", lookup=nxdomain).error == "dns_error"


def test_bad_urls():
    assert fetch("http:///nohost").error == "bad_url"
    assert fetch("not a url at all").error == "bad_scheme"


def test_content_type_is_not_trusted(server):
    """The fetcher returns bytes whatever the label; the image layer sniffs them."""
    url = server.add("mislabelled.txt", GOOD_JPEG, content_type="text/plain")
    r = fetch(url)
    assert r.error is None and r.body == GOOD_JPEG and r.content_type.startswith("text/plain")


def test_helpers():
    assert is_transient("timeout") and is_transient("http_503") and is_transient("http_429")
    assert not is_transient("http_404") and not is_transient("dns_error") and not is_transient(None)
    assert "mybot" in user_agent("mybot") and user_agent(None).startswith("Mozilla/5.0")
