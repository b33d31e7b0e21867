//! The operators' console at `/console/`: its files are served with a strict content-security
//! policy and no token, and in a real headless Chromium (Debian's, driven through ChromeDriver)
//! an operator signs in, finds a customer, grants credit, adjusts, voids, and sees the balances,
//! the history and the chart follow — with the browser reporting no policy violation.

mod support;

use std::time::Instant;

use serde_json::{json, Value};
use support::webdriver::{browser_paths, Driver, Session};
use support::{customer_path, grant_body, Backend, Ledger, TestDb, GATEWAY_TOKEN, TOKEN};

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                      form-action 'none'; base-uri 'none'; frame-ancestors 'none'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_files_are_served_without_a_token_under_a_strict_policy() {
    let db = TestDb::new(Backend::Sqlite).await;
    let ledger = Ledger::start(&db).await;
    let plain = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let moved = plain.get(ledger.url("/console")).send().await.expect("console");
    assert_eq!((moved.status().as_u16(), moved.headers()["location"].to_str().ok()), (308, Some("/console/")));
    for (path, content_type) in [
        ("/console/", "text/html; charset=utf-8"),
        ("/console/console.js", "text/javascript; charset=utf-8"),
        ("/console/console.css", "text/css; charset=utf-8"),
        ("/console/icon.svg", "image/svg+xml"),
    ] {
        let reply = plain.get(ledger.url(path)).send().await.expect("asset");
        assert_eq!(reply.status(), 200, "{path}");
        let headers = reply.headers();
        assert_eq!(headers["content-type"], content_type, "{path}");
        assert_eq!(headers["content-security-policy"], POLICY, "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers["referrer-policy"], "no-referrer", "{path}");
    }
    // The page loads only its own files: no inline script or style, nothing from another origin.
    let page = plain.get(ledger.url("/console/")).send().await.expect("page").text().await.expect("html");
    assert!(!page.contains("<script>") && !page.contains("style=") && !page.contains("<style"), "inline code");
    assert!(!page.contains("http://") && !page.contains("https://"), "another origin");
    // The data stays behind the token.
    let reply = plain.get(ledger.url("/v3/openmeter/customers")).send().await.expect("api");
    assert_eq!(reply.status(), 401);
    let reply = plain.get(ledger.url("/console/secrets.js")).send().await.expect("missing");
    assert_eq!(reply.status(), 404);
}

/// Chromium and ChromeDriver, or a failure that says how to get them (CI installs them first:
/// `scripts/test`). `CONSOLE_BROWSER_TEST=skip` skips the browser test explicitly.
fn browser() -> Option<(String, String)> {
    let (chromium, driver) = browser_paths();
    if std::path::Path::new(&chromium).exists() && std::path::Path::new(&driver).exists() {
        return Some((chromium, driver));
    }
    if std::env::var("CONSOLE_BROWSER_TEST").as_deref() == Ok("skip") {
        eprintln!("SKIPPED (CONSOLE_BROWSER_TEST=skip): the console's browser test needs {chromium} and {driver}");
        return None;
    }
    panic!(
        "the console's browser test needs Chromium ({chromium}) and ChromeDriver ({driver}): \
         apt-get install chromium chromium-driver (scripts/test does), set CHROMIUM/CHROMEDRIVER, \
         or skip it explicitly with CONSOLE_BROWSER_TEST=skip"
    );
}

/// Names with markup in them, which the console must show as text.
const GLOBEX: &str = "Globex <img src=x data-injected onerror=alert(1)>";
const TOKENS: &str = "Tokens <b data-injected>bold</b>";

async fn customer(ledger: &Ledger, body: Value) -> String {
    let (status, created) = ledger.post("/v3/openmeter/customers", body).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().expect("id").to_owned()
}

fn balance_cell(scope: &str, currency: &str, which: &str) -> String {
    format!("#balances tr[data-scope=\"{scope}\"][data-currency=\"{currency}\"] td[data-balance=\"{which}\"]")
}

async fn rows(session: &Session, css: &str) -> u64 {
    session.script("return document.querySelectorAll(arguments[0]).length", json!([css])).await.as_u64().unwrap_or(0)
}

async fn sign_in(session: &Session, base: &str) {
    session.goto(&format!("{base}/console/")).await;
    // A wrong token is refused and not kept.
    session.type_into("#token", "not-the-token").await;
    session.click("#login-form button").await;
    session
        .wait_for("the refusal", "return document.querySelector('#login-error').textContent.length > 0", json!([]))
        .await;
    let kept = session.script("return sessionStorage.length", json!([])).await;
    assert_eq!(kept, json!(0), "a refused token is not kept");
    // A gateway token is valid but may not use the console.
    session.type_into("#token", GATEWAY_TOKEN).await;
    session.click("#login-form button").await;
    let says_admin = "return document.querySelector('#login-error').textContent.includes('admin token')";
    session.wait_for("the gateway token's refusal", says_admin, json!([])).await;
    assert_eq!(session.script("return sessionStorage.length", json!([])).await, json!(0));
    session.type_into("#token", TOKEN).await;
    session.click("#login-form button").await;
    session.find("#customer-list").await;
    let kept = session.script("return Object.values(sessionStorage)", json!([])).await;
    assert_eq!(kept, json!([TOKEN]), "the token lives in the tab's session storage");
}

/// The list pages (25 a page), and the search matches subject keys too.
async fn list_and_search(session: &Session) {
    session.wait_text("#customers-page", "page 1 of 2").await;
    assert_eq!(rows(session, "#customer-list tbody tr[data-customer]").await, 25);
    // What customers are called is shown as text, never as markup.
    assert_eq!(rows(session, "#customer-list [data-injected]").await, 0, "a name became an element");
    assert!(session.text("#customer-list tbody").await.contains(GLOBEX), "the name shown as written");
    session.click("#customers-next").await;
    session.wait_text("#customers-page", "page 2 of 2").await;
    assert_eq!(rows(session, "#customer-list tbody tr[data-customer]").await, 2);
    session.type_into("#search", "acme-ap").await;
    session.click("#search-form button").await;
    session.wait_text("#customers-page", "1 found").await;
    assert_eq!(session.text("#customer-list tbody tr td:nth-child(3)").await, "acme-app");
}

/// Search, open the customer, see its balances and grant credit through the form.
async fn find_and_grant(session: &Session, acme: &str) {
    session.type_into("#search", "acme").await;
    session.click("#search-form button").await;
    session
        .wait_for(
            "one match",
            "return document.querySelectorAll('#customer-list tbody tr[data-customer]').length === 1",
            json!([]),
        )
        .await;
    session.click(&format!("#customer-list tr[data-customer=\"{acme}\"] a")).await;
    session.wait_text("#customer-name", "Acme Corp").await;
    // Welcome 5 + Tokens 3 (restricted to the feature) − a charge of 1.
    session.wait_text(&balance_cell("", "USD", "settled"), "7").await;
    session.wait_text(&balance_cell("tokens", "USD", "live"), "7").await;
    session.wait_text(&balance_cell("", "USD", "pending"), "0").await;
    // A refusal shows the ledger's problem and the field at fault.
    session.type_into("#grant-form [name=amount]", "0").await;
    session.click("#grant-form button").await;
    session.wait_text("#status", "amount must be greater than zero (amount)").await;
    session.type_into("#grant-form [name=amount]", "7.50").await;
    session.click("#grant-form button").await;
    session.wait_text(&balance_cell("", "USD", "settled"), "14.50").await;
    session.wait_text(&balance_cell("tokens", "USD", "live"), "14.50").await;
    session
        .wait_for(
            "three grants",
            "return document.querySelectorAll('#grants tbody tr[data-grant]').length === 3",
            json!([]),
        )
        .await;
    assert_eq!(rows(session, "#grants [data-injected]").await, 0, "a grant's name became an element");
    assert!(session.text("#grants tbody").await.contains(TOKENS), "the grant's name shown as written");
}

/// Adjust and void through the page; the history, the grants and the chart follow.
async fn adjust_and_void(session: &Session) {
    session.type_into("#adjust-form [name=amount]", "-2.5").await;
    session.click("#adjust-form button").await;
    // The adjustment draws from Welcome (first in the draw-down order).
    session.wait_text(&balance_cell("", "USD", "settled"), "12.00").await;
    let granted = "return [...document.querySelectorAll('#grants tbody tr[data-grant]')].find(r => r.cells[0].textContent === 'Credit').dataset.grant";
    let credit = session.script(granted, json!([])).await;
    session.click(&format!("#grants tr[data-grant={credit}] button[data-void]")).await;
    session.accept_alert().await;
    session
        .wait_for("the voided grant", "return !!document.querySelector('#grants td.status-voided')", json!([]))
        .await;
    session.wait_text(&balance_cell("", "USD", "settled"), "4.50").await;
    // funded 5, funded 3, consumed 1, funded 7.50, adjustment −2.5, void −7.50: newest first.
    session
        .wait_for(
            "six transactions",
            "return document.querySelectorAll('#transactions tbody tr[data-transaction]').length === 6",
            json!([]),
        )
        .await;
    assert!(session.text("#transactions tbody tr:first-child").await.contains("expired"));
    session
        .wait_for(
            "the chart",
            "const s = document.querySelector('#chart svg'); return !!s && s.dataset.points === '6'",
            json!([]),
        )
        .await;
    assert_eq!(rows(session, "#chart svg path.line").await, 1);
    session.script("document.querySelector('#tx-filters [name=type]').value = 'funded'", json!([])).await;
    session.click("#tx-filters button").await;
    session
        .wait_for(
            "the funded filter",
            "return document.querySelectorAll('#transactions tbody tr[data-transaction]').length === 3",
            json!([]),
        )
        .await;
}

async fn notifications_and_sign_out(session: &Session, base: &str) {
    session.click("#nav a[href='#/notifications']").await;
    session.wait_text("#channels tbody tr[data-channel] td:first-child", "billing-ops").await;
    session.wait_text("#rules tbody tr[data-rule] td:first-child", "low USD").await;
    assert!(session.text("#events tbody tr[data-event] td:last-child").await.contains("attempt(s)"));
    assert!(!session.text("#channels tbody").await.contains("c2VjcmV0LXNlY3JldC1zZWNyZXQtc2Vj"), "secret shown whole");
    // A reload keeps the tab signed in.
    session.goto(&format!("{base}/console/#/customers")).await;
    session.find("#customer-list").await;
    // A token the ledger stops accepting signs the tab out.
    session
        .script(
            "sessionStorage.setItem(sessionStorage.key(0), 'revoked'); location.hash = '#/notifications'",
            json!([]),
        )
        .await;
    session.find("#login-form").await;
    session
        .wait_for(
            "the sign-out notice",
            "return document.querySelector('#login-error').textContent.includes('refused')",
            json!([]),
        )
        .await;
    assert_eq!(session.script("return sessionStorage.length", json!([])).await, json!(0));
    // Signing out forgets the token.
    session.type_into("#token", TOKEN).await;
    session.click("#login-form button").await;
    session.find("#customer-list").await;
    session.click("#sign-out").await;
    session.find("#login-form").await;
    assert_eq!(session.script("return sessionStorage.length", json!([])).await, json!(0));
}

/// The operator's journey in a real browser: sign in, find a customer, grant credit through the
/// form, and see the balance change; then adjust, void, page through the notifications, sign out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_a_customer_and_grants_credit_in_a_real_browser() {
    let Some((chromium, driver)) = browser() else { return };
    let started = Instant::now();
    let db = TestDb::new(Backend::Sqlite).await;
    let ledger = Ledger::start(&db).await;
    let acme = customer(
        &ledger,
        json!({"name": "Acme Corp", "key": "acme", "usage_attribution": {"subject_keys": ["acme-app"]}}),
    )
    .await;
    customer(&ledger, json!({"name": GLOBEX, "key": "globex"})).await;
    for i in 0..25 {
        customer(&ledger, json!({"name": format!("Zeta {i:02}"), "key": format!("zeta-{i}")})).await;
    }
    ledger.grant(&acme, grant_body("5", json!({"name": "Welcome"}))).await;
    ledger.grant(&acme, grant_body("3", json!({"name": TOKENS, "filters": {"features": ["tokens"]}}))).await;
    // A channel and a rule that fires on the first charge, for the notifications page.
    let (status, channel) = ledger
        .post(
            "/v3/openmeter/notification/channels",
            json!({"type": "webhook", "name": "billing-ops",
            "url": "http://127.0.0.1:9/hook", "signing_secret": "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2Vj"}),
        )
        .await;
    assert_eq!(status, 201, "{channel}");
    let (status, rule) = ledger
        .post(
            "/v3/openmeter/notification/rules",
            json!({"type": "credits.balance.threshold", "name": "low USD",
            "channels": [channel["id"]], "currency": "USD", "thresholds": [{"type": "absolute", "value": "7.5"}]}),
        )
        .await;
    assert_eq!(status, 201, "{rule}");
    let (status, _) = ledger.charge(&acme, "1", "first-call").await;
    assert_eq!(status, 201);

    let driver = Driver::start(&chromium, &driver).await;
    let session = driver.session().await;
    sign_in(&session, &ledger.base).await;
    list_and_search(&session).await;
    find_and_grant(&session, &acme).await;
    adjust_and_void(&session).await;
    // CONSOLE_SCREENSHOT=/tmp/console.png keeps a picture of the customer's page.
    if let Ok(path) = std::env::var("CONSOLE_SCREENSHOT") {
        session.screenshot(std::path::Path::new(&path)).await;
    }
    notifications_and_sign_out(&session, &ledger.base).await;
    let log = session.browser_log().await;
    if std::env::var("CONSOLE_LOG").is_ok() {
        eprintln!("browser log: {log:#?}");
    }
    let problems: Vec<Value> = log
        .into_iter()
        .filter(|e| e["level"] == "SEVERE" || e["message"].as_str().unwrap_or("").contains("Content Security Policy"))
        // The refusals the journey provokes (two tokens, a zero grant) are logged by the browser as
        // failed fetches, on purpose.
        .filter(|e| {
            let message = e["message"].as_str().unwrap_or("");
            !(e["source"] == "network"
                && ["400", "401", "403"].iter().any(|s| message.contains(&format!("status of {s} "))))
        })
        .collect();
    assert!(problems.is_empty(), "the browser reported problems: {problems:?}");
    session.close().await;
    let (_, balance) = ledger.get(&format!("{}/credits/balance", customer_path(&acme))).await;
    assert_eq!(balance["balances"][0]["settled"], "4.50", "{balance}");
    assert_eq!(ledger.check().await, Vec::<String>::new());
    eprintln!("console browser journey: {:.1} s", started.elapsed().as_secs_f64());
}
