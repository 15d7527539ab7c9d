"""The operator console, in Debian's chromium at 1366x768, against a running `up`.

What the page shows is checked against what the platform did: the traffic the fixtures
sent (conftest.py), and what the gateway does after an action taken on the page (a purged
entry is a miss, a revoked key is refused).
"""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import (
    AXE_JS,
    COMPOSE_CLIENT,
    SCREENSHOTS,
    VIEWPORT,
    Problems,
    cache_status,
    flood,
    request,
    wait_for,
)
from playwright.sync_api import expect

PANELS = [
    "panel-routes",
    "panel-upstreams",
    "panel-cache",
    "panel-rate-limits",
    "panel-redis",
    "panel-audit",
    "panel-keys",
]
# The page refreshes every 2 s; a few refreshes are allowed for anything to show up.
LIVE = 15_000
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def numbers(text: str) -> list[float]:
    return [float(n) for n in NUMBER.findall(text.replace(",", ""))]


def submit(page, form: str):
    page.locator(
        f"{form} button[type=submit], {form} button:not([type]), {form} input[type=submit]"
    ).first.click()


def login(page, platform, how: str = "fragment"):
    if how == "fragment":
        page.goto(f"{platform.admin}/#token={platform.token}")
    else:
        page.goto(f"{platform.admin}/")
        page.fill("#token", platform.token)
        submit(page, "#login")
    expect(page.locator("#console")).to_be_visible(timeout=LIVE)
    expect(page.locator("#login")).to_be_hidden()


def wait_live(page, panel: str):
    """Waits for `panel`'s first successful fetch; an error state fails at once, with the
    message the panel shows."""
    section = page.locator(f"#{panel}")

    def state():
        s = section.get_attribute("data-state")
        if s == "error":
            raise AssertionError(f"#{panel} is in error: {section.inner_text()!r}")
        return s == "live"

    wait_for(f"#{panel}[data-state=live]", state, timeout=LIVE / 1000)


def cell(row, header: str) -> str | None:
    """The text of `row`'s cell under the column whose header matches `header` (a
    regular expression, case-insensitive), or None when no header matches."""
    return row.evaluate(
        """(row, pattern) => {
            const re = new RegExp(pattern, 'i');
            const heads = [...row.closest('table').querySelectorAll('thead th')];
            const i = heads.findIndex(th => re.test(th.textContent));
            return i < 0 || !row.cells[i] ? null : row.cells[i].textContent.trim();
        }""",
        header,
    )


def rows(page, selector: str):
    loc = page.locator(selector)
    return [loc.nth(i) for i in range(loc.count())]


def shot(page, name: str, locator=None):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    target = locator if locator is not None else page
    kwargs = {} if locator is not None else {"full_page": True}
    target.screenshot(path=str(SCREENSHOTS / f"{name}.png"), animations="disabled", **kwargs)


# Loading and logging in.


def test_the_page_loads_without_errors_and_logs_in_with_the_form(page, platform):
    r = page.goto(f"{platform.admin}/")
    assert r.status == 200
    assert r.header_value("content-type").startswith("text/html")
    csp = r.header_value("content-security-policy") or ""
    assert "default-src 'self'" in csp, f"Content-Security-Policy: {csp!r}"
    assert page.locator("html").get_attribute("lang") == "en"
    assert page.locator("h1").count() == 1
    assert page.locator("main").count() == 1
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("label[for=token]")).to_have_count(1)
    assert page.locator("#token").get_attribute("type") == "password"
    expect(page.locator("#console")).to_be_hidden()

    page.fill("#token", platform.token)
    submit(page, "#login")
    expect(page.locator("#console")).to_be_visible(timeout=LIVE)
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#gateway-id")).not_to_have_text(re.compile(r"^\s*$"))
    for panel in PANELS:
        wait_live(page, panel)
        assert page.locator(f"#{panel} :is(h2, h3, h4)").count() >= 1, f"#{panel} has no heading"
    # A few refreshes, then nothing may have gone wrong on the way.
    wait_for("a route with a rate", lambda: any_route_rate(page), timeout=LIVE / 1000)
    assert page.problems.items == [], "\n".join(page.problems.items)


def test_the_token_in_the_fragment_logs_in_and_leaves_the_address_bar(page, platform):
    login(page, platform, "fragment")
    assert platform.token not in page.url and "token=" not in page.url, page.url
    stored = page.evaluate("() => Object.values(sessionStorage)")
    assert any(platform.token in v for v in stored), "the token is not in sessionStorage"
    # The session survives a reload: the token is taken from sessionStorage.
    page.reload()
    expect(page.locator("#console")).to_be_visible(timeout=LIVE)
    wait_live(page, "panel-routes")
    assert page.problems.items == [], "\n".join(page.problems.items)


def test_a_wrong_token_shows_the_login_error(page, platform):
    page.goto(f"{platform.admin}/")
    page.fill("#token", "not-the-admin-token")
    submit(page, "#login")
    expect(page.locator("#login-error")).to_be_visible(timeout=LIVE)
    expect(page.locator("#login-error")).not_to_have_text(re.compile(r"^\s*$"))
    expect(page.locator("#console")).to_be_hidden()


# Each panel, with live data from the running platform.


def any_route_rate(page) -> bool:
    for row in rows(page, "#panel-routes tbody tr[data-route]"):
        text = cell(row, r"rate|req") or ""
        if any(n > 0 for n in numbers(text)):
            return True
    return False


def test_every_panel_shows_live_data_from_the_platform(page, platform):
    login(page, platform)
    for panel in PANELS:
        wait_live(page, panel)

    # Routes: the ones the traffic used, each with a chart, and a non-zero rate.
    names = wait_for(
        "route rows",
        lambda: {r.get_attribute("data-route") for r in rows(page, "#panel-routes tbody tr")},
    )
    for expected in ["user", "product", "user-and-product", "users"]:
        assert expected in names, (expected, names)
    for row in rows(page, "#panel-routes tbody tr[data-route]"):
        assert row.locator("svg.spark").count() == 1, row.get_attribute("data-route")
    wait_for("a route with a non-zero request rate", lambda: any_route_rate(page), LIVE / 1000)
    for column in [r"error", r"p50", r"p95", r"p99"]:
        row = page.locator('#panel-routes tbody tr[data-route="user"]').first
        assert cell(row, column) is not None, f"no {column} column in #panel-routes"

    # Upstreams: every instance `up` started, with its health.
    for pool in ["users", "products", "preferences", "audit"]:
        for endpoint in platform.endpoints(pool):
            row = page.locator(
                f'#panel-upstreams tbody tr[data-upstream="{pool}"][data-endpoint="{endpoint}"]'
            )
            expect(row).to_have_count(1)
            for c in [".health", ".in-flight", ".latency", ".ejected"]:
                expect(row.locator(c)).to_have_count(1)
            expect(row.locator(".health")).not_to_have_text(re.compile(r"^\s*$"))

    # Cache: ratios by level; the traffic read every entry twice, so L1 hits are not 0.
    for c in ["#cache-hit-l1", "#cache-hit-l2", "#cache-miss", "#cache-origin-calls"]:
        wait_for(f"a number in {c}", lambda c=c: numbers(page.locator(c).inner_text()))
    assert any(n > 0 for n in numbers(page.locator("#cache-hit-l1").inner_text()))

    # Rate limits: both shipped limits, and the throttled client's refusals counted.
    for limit in ["per-client", "compose-per-minute"]:
        expect(page.locator(f'#panel-rate-limits tbody tr[data-limit="{limit}"]')).to_have_count(1)
    per_client = page.locator('#panel-rate-limits tbody tr[data-limit="per-client"]')
    refused = cell(per_client, r"refus|reject|denied|block|429")
    assert refused is not None, "no refused column in #panel-rate-limits"
    wait_for(
        "per-client refusals",
        lambda: any(
            n > 0 for n in numbers(cell(per_client, r"refus|reject|denied|block|429") or "")
        ),
        LIVE / 1000,
    )
    expect(page.locator("#limit-fallback")).not_to_have_text(re.compile(r"^\s*$"))

    # Redis: both roles, their figures, and the doctor's findings from `up`'s start.
    for role in ["cache", "durable"]:
        row = page.locator(f'#panel-redis tbody tr[data-role="{role}"]')
        expect(row).to_have_count(1)
        assert len(numbers(row.inner_text())) >= 2, row.inner_text()
    findings = page.locator("#doctor-findings li")
    wait_for("doctor findings", lambda: findings.count() >= 1)
    expect(findings.first).not_to_have_text(re.compile(r"^\s*$"))

    # Keys: at least the demo key `up` created.
    wait_for("key rows", lambda: page.locator("#keys tbody tr[data-key-id]").count() >= 1)
    expect(page.locator("#keys tbody tr[data-key-id] button.revoke").first).to_be_visible()

    assert page.problems.items == [], "\n".join(page.problems.items)


def test_the_panels_fit_in_1366x768(page, platform):
    """Nothing to scroll sideways, in the page or in a panel: a column cut off at the
    resolution the console is made for is a figure the operator does not see."""
    login(page, platform)
    for panel in PANELS:
        wait_live(page, panel)
    wait_for("route rows", lambda: page.locator("#panel-routes tbody tr").count() >= 1)
    wait_for("key rows", lambda: page.locator("#keys tbody tr").count() >= 1)
    overflowing = page.evaluate(
        """() => {
            const out = [];
            if (document.documentElement.scrollWidth > window.innerWidth)
                out.push(`the page: ${document.documentElement.scrollWidth}px wide`);
            for (const e of document.querySelectorAll('#console *')) {
                const style = getComputedStyle(e);
                if (!['auto', 'scroll'].includes(style.overflowX)) continue;
                if (e.scrollWidth > e.clientWidth + 1)
                    out.push(`#${e.closest('section').id} ${e.tagName.toLowerCase()}`
                        + `.${e.className}: ${e.scrollWidth}px of content in ${e.clientWidth}px`);
            }
            return out;
        }"""
    )
    assert overflowing == [], "scrolls sideways at 1366x768:\n" + "\n".join(overflowing)


# Actions taken from the page, checked through the gateway.


def test_a_purge_by_tag_from_the_page_empties_the_cache_for_that_path(page, platform):
    path = "/products/77"  # never read by the background traffic
    platform.get(path)
    wait_for("a cached answer", lambda: "hit" in cache_status(platform.get(path)))
    login(page, platform)
    wait_live(page, "panel-cache")
    page.fill("#purge-tag", path)
    submit(page, "#purge")
    result = page.locator("#purge-result")
    wait_for("the purge's result", lambda: numbers(result.inner_text()))
    assert numbers(result.inner_text())[0] >= 1, result.inner_text()
    status = cache_status(platform.get(path))
    assert "fwd=" in status and "; hit" not in status, status
    assert page.problems.items == [], "\n".join(page.problems.items)


def test_a_client_over_its_limit_is_looked_up_and_reset_from_the_page(page, platform):
    identity = f"ip={COMPOSE_CLIENT}|route=user-and-product"

    def state():
        return platform.admin_call("GET", f"/rate-limits/compose-per-minute/{identity}").json()

    # 600 a minute per client on the composed route, used up by a client of its own. Its
    # per-client limit (100/s) refuses most of a burst before this one counts it, so this
    # takes a few seconds of bursts.
    wait_for(
        "a refusal by compose-per-minute",
        lambda: "compose-per-minute" in flood(platform, "/api/1/2", COMPOSE_CLIENT, 100),
        timeout=60,
    )
    before = state()
    # The sliding window's estimate of the last minute gives a few back as time passes;
    # without a reset, not the half of them before that minute is over.
    assert before["remaining"] < before["quota"] // 2, before
    login(page, platform)
    wait_live(page, "panel-rate-limits")
    page.select_option("#limit-name", "compose-per-minute")
    page.fill("#limit-identity", identity)
    submit(page, "#limit-lookup")
    shown = page.locator("#limit-state")
    wait_for("the client's state", lambda: numbers(shown.inner_text()))
    looked_up = shown.inner_text()
    page.click("#limit-reset")
    wait_for("the reset's result", lambda: shown.inner_text() != looked_up)
    # Without the reset, nothing would come back for a minute.
    after = state()
    assert after["remaining"] >= after["quota"] - 5, after
    assert platform.get("/api/1/2", source=COMPOSE_CLIENT).status == 200
    assert page.problems.items == [], "\n".join(page.problems.items)


def test_an_api_key_created_on_the_page_works_until_revoked_on_the_page(page, platform):
    login(page, platform)
    wait_live(page, "panel-keys")
    keys = "#keys tbody tr[data-key-id]"
    wait_for("the key list", lambda: page.locator(keys).count() >= 1)
    before = {r.get_attribute("data-key-id") for r in rows(page, keys)}

    form = page.locator("#key-create")
    form.get_by_label(re.compile(r"^\s*owner", re.I)).fill(f"console-{os.getpid()}")
    form.get_by_label(re.compile(r"^\s*name", re.I)).fill("browser test")
    form.get_by_label(re.compile(r"^\s*scopes", re.I)).fill("users:write")
    submit(page, "#key-create")

    secret_box = page.locator("#key-secret")
    text = wait_for(
        "the secret, shown once",
        lambda: secret_box.is_visible()
        and secret_box.evaluate("e => (e.value ?? e.textContent).trim()"),
    )
    secret = max(text.split(), key=len)
    new = wait_for(
        "the new key's row",
        lambda: {r.get_attribute("data-key-id") for r in rows(page, keys)} - before,
    )
    assert len(new) == 1, new
    (key_id,) = new

    def create_user(n: int):
        return request(
            platform.gateway,
            "POST",
            "/users",
            body={
                "username": f"console{os.getpid()}x{n}",
                "email": f"console{os.getpid()}x{n}@example.com",
                "name": "Console Test",
            },
            headers={"x-api-key": secret},
        )

    r = create_user(1)
    assert r.status == 201, (r.status, r.body, text)

    row = page.locator(f'#keys tbody tr[data-key-id="{key_id}"]')
    row.locator("button.revoke").click()
    wait_for(
        "the key gone from the list or shown revoked",
        lambda: row.count() == 0 or "revoked" in row.inner_text().lower(),
    )
    refused = wait_for(
        "the gateway to refuse the revoked key",
        lambda: (r := create_user(2)).status == 401 and r,
        timeout=5,
    )
    assert "revoked" in refused.json().get("detail", ""), refused.body
    assert page.problems.items == [], "\n".join(page.problems.items)
    # Shown once: not after a reload.
    page.reload()
    wait_live(page, "panel-keys")
    assert secret not in page.content()


def test_audit_search_from_the_form_and_verify(page, platform):
    transfer = platform.facts["transfer"]
    login(page, platform)
    wait_live(page, "panel-audit")
    form = page.locator("#audit-search")
    form.get_by_label(re.compile(r"^\s*account\s*$", re.I)).fill(transfer["from_account"])
    submit(page, "#audit-search")
    results = page.locator("#audit-results tbody tr")
    wait_for(
        "the transfer in the results",
        lambda: transfer["id"] in page.locator("#audit-results tbody").inner_text(),
    )

    # A broad search: the 3,000 demo transfers, over more than one page.
    form.get_by_label(re.compile(r"^\s*account\s*$", re.I)).fill("")
    submit(page, "#audit-search")
    wait_for("a page of results", lambda: results.count() > 1)
    first_page = page.locator("#audit-results tbody").inner_text()
    nxt = page.locator("#audit-next")
    expect(nxt).to_be_enabled(timeout=LIVE)
    nxt.click()
    wait_for(
        "the next page",
        lambda: (
            results.count() >= 1 and page.locator("#audit-results tbody").inner_text() != first_page
        ),
    )

    page.click("#audit-verify")
    verified = page.locator("#audit-verify-result")
    # Past any "in progress" text.
    wait_for(
        "the verification's result",
        lambda: (t := verified.inner_text().strip()) and not t.endswith(("…", "...")),
    )
    assert re.search(r"\bok\b|verified|intact|valid", verified.inner_text(), re.I), (
        verified.inner_text()
    )
    print(f"audit verify: {verified.inner_text()!r}")
    assert page.problems.items == [], "\n".join(page.problems.items)


# Accessibility.


def axe_violations(page) -> list[dict]:
    page.add_script_tag(path=AXE_JS)
    result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return result["violations"]


def report(violations: list[dict]) -> str:
    lines = []
    for v in violations:
        lines.append(f"[{v['impact']}] {v['id']}: {v['help']} ({v['helpUrl']})")
        for node in v["nodes"]:
            lines.append(f"    {', '.join(map(str, node['target']))}: {node['failureSummary']}")
    return "\n".join(lines)


@pytest.mark.skipif(not AXE_JS, reason="AXE_JS (axe-core's axe.min.js) is not set")
def test_axe_core_finds_no_serious_or_critical_violation(browser, platform):
    # axe is injected as an inline script, which the page's CSP forbids; the other tests
    # load the page with its CSP enforced.
    ctx = browser.new_context(viewport=VIEWPORT, bypass_csp=True)
    ctx.set_default_timeout(10_000)
    try:
        page = ctx.new_page()
        page.problems = Problems(page)
        found = []
        page.goto(f"{platform.admin}/")
        expect(page.locator("#login")).to_be_visible()
        found += [("login", v) for v in axe_violations(page)]
        # The form: a fragment alone would not reload the page it is already on.
        login(page, platform, "form")
        for panel in PANELS:
            wait_live(page, panel)
        wait_for("route rows", lambda: page.locator("#panel-routes tbody tr").count() >= 1)
        found += [("console", v) for v in axe_violations(page)]
    finally:
        ctx.close()
    for where, v in found:
        print(f"axe ({where}): " + report([v]))
    bad = [(w, v) for w, v in found if v["impact"] in ("serious", "critical")]
    assert not bad, "serious or critical violations:\n" + "\n".join(
        f"on the {w} screen: " + report([v]) for w, v in bad
    )
    print(json.dumps({"axe_violations": len(found)}))


# Screenshots, last: the README shows the console after some history.


def test_screenshots_for_the_readme(page, platform):
    login(page, platform)
    for panel in PANELS:
        wait_live(page, panel)
    # Twenty samples (about 40 s) of the background traffic, whose rate varies, so that the
    # charts show a curve rather than a point.
    line = page.locator('#panel-routes tbody tr[data-route="user"] svg.spark polyline')
    wait_for(
        "a route chart with 20 points",
        lambda: line.count() and len(line.first.get_attribute("points").split()) >= 20,
        timeout=60,
    )
    # The audit panel with results, as an operator sees it after a search.
    submit(page, "#audit-search")
    wait_for("audit results", lambda: page.locator("#audit-results tbody tr").count() > 1)
    shot(page, "console")
    for panel in ["panel-routes", "panel-upstreams", "panel-redis", "panel-audit"]:
        shot(page, panel, page.locator(f"#{panel}"))
    assert page.problems.items == [], "\n".join(page.problems.items)
