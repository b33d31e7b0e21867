// The ledger's operator console: plain DOM, no framework, no build step. Every number it shows
// comes from this ledger's API (same origin) with the admin token kept in sessionStorage; amounts
// are shown exactly as the API writes them (decimal strings) and turned into floating point only
// to place points on the chart.
"use strict";

(function () {
  const TOKEN_KEY = "credits-ledger-admin-token";
  const API = "/v3/openmeter";
  const $ = (selector) => document.querySelector(selector);

  // ---- HTTP ----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, problem) {
      super(problem && (problem.detail || problem.title) ? (problem.detail || problem.title) : "HTTP " + status);
      this.status = status;
      this.field = problem && problem.field;
    }
  }

  async function api(method, path, body, headers) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const init = { method, headers: Object.assign({ Authorization: "Bearer " + token }, headers || {}) };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    const text = await response.text();
    const data = text ? JSON.parse(text) : null;
    if (response.status === 401) {
      signOut("The ledger refused the token; sign in again.");
    }
    if (!response.ok) {
      throw new ApiError(response.status, data);
    }
    return data;
  }

  const query = (params) => {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) {
      if (v !== undefined && v !== null && v !== "") q.append(k, v);
    }
    const s = q.toString();
    return s ? "?" + s : "";
  };

  // ---- DOM helpers ---------------------------------------------------------------------------

  // Elements are built with textContent only: nothing from the API is ever parsed as HTML.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (v !== undefined && v !== null) node.setAttribute(k, v);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fill(tbody, rows, columns, emptyText) {
    tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: columns }, emptyText))]));
  }

  const num = (text, attrs) => el("td", Object.assign({ class: String(text).startsWith("-") ? "num neg" : "num" }, attrs || {}), text);
  const when = (t) => (t ? t.replace("T", " ").replace(/\.\d+Z$/, "Z").replace("Z", " UTC") : "");

  function status(message, ok) {
    const s = $("#status");
    s.textContent = message || "";
    s.className = message ? (ok ? "ok" : "bad") : "";
  }

  function report(error) {
    status(error instanceof ApiError ? error.message + (error.field ? " (" + error.field + ")" : "") : String(error), false);
  }

  // ---- Sign in -------------------------------------------------------------------------------

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("#login-error").textContent = message || "";
    location.hash = "#/login";
    route();
  }

  async function signIn(event) {
    event.preventDefault();
    const token = $("#token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    try {
      await api("GET", API + "/notification/channels?page[size]=1");
      $("#token").value = "";
      $("#login-error").textContent = "";
      location.hash = "#/customers";
      route();
    } catch (error) {
      sessionStorage.removeItem(TOKEN_KEY);
      $("#login-error").textContent =
        error.status === 403 ? "This token may not use the console: it needs an admin token." : error.message;
    }
  }

  // ---- Customers -----------------------------------------------------------------------------

  const customersState = { page: 1, size: 25, total: 0 };

  async function findCustomers(text) {
    const size = { "page[size]": 100, sort: "name" };
    // Name, key and subject key, each matched as a substring; one request per field (filters on
    // different fields combine with AND).
    const pages = await Promise.all(
      ["name", "key", "usage_attribution_subject_key"].map((field) =>
        api("GET", API + "/customers" + query(Object.assign({ ["filter[" + field + "][contains]"]: text }, size)))
      )
    );
    const byId = new Map();
    pages.forEach((p) => p.data.forEach((c) => byId.set(c.id, c)));
    return [...byId.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  async function showCustomers() {
    const text = $("#search").value.trim();
    let customers;
    if (text) {
      customers = await findCustomers(text);
      $("#customers-page").textContent = customers.length + " found";
    } else {
      const params = { "page[size]": customersState.size, "page[number]": customersState.page, sort: "name" };
      const page = await api("GET", API + "/customers" + query(params));
      customers = page.data;
      customersState.total = page.meta.page.total;
      const pages = Math.max(1, Math.ceil(customersState.total / customersState.size));
      $("#customers-page").textContent = "page " + customersState.page + " of " + pages;
    }
    $("#customers-prev").disabled = !!text || customersState.page <= 1;
    $("#customers-next").disabled = !!text || customersState.page * customersState.size >= customersState.total;
    const rows = customers.map((c) =>
      el("tr", { "data-customer": c.id },
        el("td", {}, el("a", { href: "#/customer/" + encodeURIComponent(c.id) }, c.name)),
        el("td", {}, c.key),
        el("td", {}, (c.usage_attribution.subject_keys || []).join(", ")),
        el("td", {}, c.currency || ""),
        el("td", {}, when(c.created_at)))
    );
    fill($("#customer-list tbody"), rows, 5, text ? "No customer matches." : "No customers yet.");
  }

  // ---- One customer --------------------------------------------------------------------------

  const view = { id: null, customer: null, grants: [], txPath: null, idempotencyKey: null };

  const customerPath = (id) => API + "/customers/" + encodeURIComponent(id);

  async function allGrants(id) {
    const grants = [];
    for (let number = 1; number <= 20; number++) {
      const page = await api("GET", customerPath(id) + "/credits/grants" + query({ "page[size]": 1000, "page[number]": number }));
      grants.push(...page.data);
      if (grants.length >= page.meta.page.total || page.data.length === 0) break;
    }
    return grants;
  }

  async function showCustomer(id) {
    view.id = id;
    const [customer, grants] = await Promise.all([api("GET", customerPath(id)), allGrants(id)]);
    view.customer = customer;
    view.grants = grants;
    $("#customer-name").textContent = customer.name;
    const facts = [["Id", customer.id], ["Key", customer.key],
      ["Subject keys", (customer.usage_attribution.subject_keys || []).join(", ") || "none"],
      ["Email", customer.primary_email], ["Currency", customer.currency], ["Created", when(customer.created_at)],
      ["Deleted", when(customer.deleted_at)]].filter(([, v]) => v);
    $("#customer-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
    if (customer.currency) {
      document.querySelectorAll("#grant-form [name=currency], #adjust-form [name=currency]").forEach((i) => (i.value = customer.currency));
    }
    renderGrants();
    const currencies = await showBalances();
    renderChartChoices(currencies);
    view.txPath = customerPath(id) + "/credits/transactions" + transactionFilters();
    await Promise.all([showTransactions(view.txPath), drawChart()]);
  }

  async function showBalances() {
    const path = customerPath(view.id) + "/credits/balance";
    const features = [...new Set(view.grants.flatMap((g) => (g.filters && g.filters.features) || []))].sort();
    const scopes = [""].concat(features);
    const answers = await Promise.all(
      scopes.map((f) => api("GET", path + query({ "filter[feature_key][eq]": f })))
    );
    const rows = [];
    answers.forEach((answer, i) => {
      answer.balances.forEach((b) => {
        rows.push(el("tr", { "data-scope": scopes[i], "data-currency": b.currency },
          el("td", {}, scopes[i] ? "feature " + scopes[i] : "all credit"),
          el("td", {}, b.currency),
          num(b.settled, { "data-balance": "settled" }),
          num(b.live, { "data-balance": "live" }),
          num(b.pending, { "data-balance": "pending" })));
      });
    });
    fill($("#balances tbody"), rows, 5, "No credit in any currency yet.");
    return [...new Set(answers[0].balances.map((b) => b.currency))];
  }

  function renderGrants() {
    const rows = view.grants.map((g) => {
      const voidable = g.status === "active" || g.status === "pending";
      const button = voidable
        ? el("button", { type: "button", class: "secondary", "data-void": g.id, onclick: () => voidGrant(g) }, "Void")
        : null;
      return el("tr", { "data-grant": g.id },
        el("td", {}, g.name),
        num(g.amount + " " + g.currency),
        el("td", { class: "status-" + g.status }, g.status + (g.voided_at ? " " + when(g.voided_at) : "")),
        num(g.priority),
        el("td", {}, ((g.filters && g.filters.features) || []).join(", ") || "all"),
        el("td", {}, when(g.effective_at)),
        el("td", {}, g.expires_at ? when(g.expires_at) : "never"),
        el("td", {}, g.funding_method + (g.purchase ? " (" + g.purchase.settlement_status + ")" : "")),
        el("td", {}, button));
    });
    fill($("#grants tbody"), rows, 9, "No grants yet.");
  }

  async function voidGrant(grant) {
    if (!confirm("Void what is left of “" + grant.name + "”? The history keeps everything.")) return;
    try {
      await api("POST", customerPath(view.id) + "/credits/grants/" + encodeURIComponent(grant.id) + "/void");
      status("Voided " + grant.name + ".", true);
      await showCustomer(view.id);
    } catch (error) {
      report(error);
    }
  }

  // ---- Forms ---------------------------------------------------------------------------------

  function grantBody(form) {
    const v = (name) => form.elements[name].value.trim();
    const body = { name: v("name"), amount: v("amount"), currency: v("currency"), funding_method: v("funding_method") };
    if (body.funding_method !== "none") {
      body.purchase = { currency: body.currency };
      if (v("per_unit_cost_basis")) body.purchase.per_unit_cost_basis = v("per_unit_cost_basis");
    }
    if (v("priority")) body.priority = Number(v("priority"));
    if (v("expires_after")) body.expires_after = v("expires_after");
    if (v("key")) body.key = v("key");
    const features = v("features").split(",").map((f) => f.trim()).filter(Boolean);
    if (features.length) body.filters = { features };
    return body;
  }

  async function submitGrant(event) {
    event.preventDefault();
    const form = event.target;
    try {
      const grant = await api("POST", customerPath(view.id) + "/credits/grants", grantBody(form));
      status("Granted " + grant.amount + " " + grant.currency + " (" + grant.name + ").", true);
      form.elements.amount.value = "";
      form.elements.key.value = "";
      await showCustomer(view.id);
    } catch (error) {
      report(error);
    }
  }

  async function submitAdjustment(event) {
    event.preventDefault();
    const form = event.target;
    const v = (name) => form.elements[name].value.trim();
    const body = { name: v("name"), amount: v("amount"), currency: v("currency") };
    if (v("description")) body.description = v("description");
    // One key per intended adjustment: a double submit or a retry after a lost answer books once.
    view.idempotencyKey = view.idempotencyKey || randomKey();
    try {
      await api("POST", customerPath(view.id) + "/credits/adjustments", body, { "Idempotency-Key": view.idempotencyKey });
      view.idempotencyKey = null;
      status("Adjusted by " + body.amount + " " + body.currency + ".", true);
      form.elements.amount.value = "";
      await showCustomer(view.id);
    } catch (error) {
      if (error.status === 400) view.idempotencyKey = null;
      report(error);
    }
  }

  // 128 random bits as hex (crypto.randomUUID needs a secure context; a ledger reached over plain
  // HTTP by name is not one).
  function randomKey() {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return "console-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // ---- Transactions --------------------------------------------------------------------------

  function transactionFilters() {
    const f = $("#tx-filters").elements;
    return query({
      "page[size]": 20,
      "filter[type]": f.type.value,
      "filter[currency]": f.currency.value.trim(),
      "filter[feature_key][eq]": f.feature_key.value.trim(),
    });
  }

  async function showTransactions(path) {
    const page = await api("GET", path);
    const rows = page.data.map((t) =>
      el("tr", { "data-transaction": t.id },
        el("td", {}, when(t.booked_at)),
        el("td", {}, t.type),
        el("td", {}, t.name),
        num(t.amount + " " + t.currency),
        num(t.available_balance.after + " " + t.currency))
    );
    fill($("#transactions tbody"), rows, 5, "No transactions match.");
    const older = page.meta.page.next;
    const newer = page.meta.page.previous;
    $("#tx-older").disabled = !older;
    $("#tx-newer").disabled = !newer;
    $("#tx-older").onclick = () => showTransactions(older).catch(report);
    $("#tx-newer").onclick = () => showTransactions(newer).catch(report);
  }

  // ---- Chart ---------------------------------------------------------------------------------

  function renderChartChoices(currencies) {
    const select = $("#chart-currency");
    const current = select.value;
    select.replaceChildren(...currencies.map((c) => el("option", { value: c }, c)));
    if (currencies.includes(current)) select.value = current;
  }

  // The settled balance after each movement of one currency, oldest first (at most 5,000).
  async function balancePoints(currency) {
    const points = [];
    let path = customerPath(view.id) + "/credits/transactions" + query({ "page[size]": 1000, "filter[currency]": currency });
    for (let i = 0; i < 5 && path; i++) {
      const page = await api("GET", path);
      page.data.forEach((t) => points.push({ t: Date.parse(t.booked_at), v: Number(t.available_balance.after), label: t.available_balance.after }));
      path = page.meta.page.next;
    }
    return points.filter((p) => p.t <= Date.now()).sort((a, b) => a.t - b.t);
  }

  async function drawChart() {
    const currency = $("#chart-currency").value;
    const box = $("#chart");
    if (!currency) {
      box.replaceChildren(el("p", { class: "hint" }, "No movements yet."));
      return;
    }
    const points = await balancePoints(currency);
    if (points.length === 0) {
      box.replaceChildren(el("p", { class: "hint" }, "No movements in " + currency + " yet."));
      return;
    }
    points.push({ t: Date.now(), v: points[points.length - 1].v, label: points[points.length - 1].label });
    box.replaceChildren(chartSvg(points, currency));
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // A step line: the balance holds between movements and changes at each one.
  function chartSvg(points, currency) {
    const [w, h, left, right, top, bottom] = [720, 220, 70, 12, 12, 28];
    const t0 = points[0].t, t1 = Math.max(points[points.length - 1].t, t0 + 1);
    const values = points.map((p) => p.v).concat([0]);
    const lo = Math.min(...values), hi = Math.max(...values, lo + 1e-9);
    const x = (t) => left + ((t - t0) / (t1 - t0)) * (w - left - right);
    const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (h - top - bottom);
    let d = "M" + x(points[0].t).toFixed(1) + "," + y(points[0].v).toFixed(1);
    for (let i = 1; i < points.length; i++) {
      d += " H" + x(points[i].t).toFixed(1) + " V" + y(points[i].v).toFixed(1);
    }
    const root = svg("svg", { viewBox: "0 0 " + w + " " + h, width: w, height: h, role: "img", "data-points": points.length - 1 });
    root.append(svg("title", {}, "Settled " + currency + " balance over time"));
    root.append(svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: h - bottom }));
    root.append(svg("line", { class: "axis", x1: left, y1: h - bottom, x2: w - right, y2: h - bottom }));
    root.append(svg("line", { class: "zero", x1: left, y1: y(0), x2: w - right, y2: y(0) }));
    root.append(svg("path", { class: "line", d }));
    // Axis labels are the API's exact amounts, not the floating-point values used to place them.
    const label = (v) => (points.find((p) => p.v === v) || { label: v === 0 ? "0" : "" }).label;
    root.append(svg("text", { x: left - 6, y: y(hi) + 4, "text-anchor": "end" }, label(hi)));
    root.append(svg("text", { x: left - 6, y: y(lo) + 4, "text-anchor": "end" }, label(lo)));
    root.append(svg("text", { x: left, y: h - 8 }, when(new Date(t0).toISOString())));
    root.append(svg("text", { x: w - right, y: h - 8, "text-anchor": "end" }, "now"));
    return root;
  }

  // ---- Notifications -------------------------------------------------------------------------

  const notificationsState = { eventsPath: null };

  function ruleCondition(r) {
    if (r.type === "credits.grant.expiring") return "grant expires within " + r.before;
    return "live balance at or below " + (r.thresholds || [])
      .map((t) => (t.type === "percent" ? t.value + "%" : t.value)).join(" / ");
  }

  async function showNotifications() {
    const [channels, rules] = await Promise.all([
      api("GET", API + "/notification/channels?page[size]=1000"),
      api("GET", API + "/notification/rules?page[size]=1000"),
    ]);
    const names = new Map(channels.data.map((c) => [c.id, c.name]));
    fill($("#channels tbody"), channels.data.map((c) =>
      el("tr", { "data-channel": c.id },
        el("td", {}, c.name), el("td", {}, c.type), el("td", {}, c.url),
        el("td", {}, Object.keys(c.custom_headers || {}).join(", ") || "none"),
        el("td", {}, c.signing_secret ? c.signing_secret.slice(0, 10) + "…" : ""),
        el("td", {}, when(c.created_at)))), 6, "No channels.");
    fill($("#rules tbody"), rules.data.map((r) =>
      el("tr", { "data-rule": r.id },
        el("td", {}, r.name), el("td", {}, r.type), el("td", {}, ruleCondition(r)),
        el("td", {}, [r.currency, r.feature_key ? "feature " + r.feature_key : null,
          r.customer_ids && r.customer_ids.length ? r.customer_ids.length + " customers" : "all customers"].filter(Boolean).join(", ")),
        el("td", {}, (r.channels || []).map((id) => names.get(id) || id).join(", ")))), 5, "No rules.");
    $("#events tbody").replaceChildren();
    notificationsState.eventsPath = API + "/notification/events?page[size]=25";
    await showMoreEvents();
  }

  function eventDetail(e) {
    const d = e.payload && e.payload.data ? e.payload.data : {};
    if (d.threshold) return (d.currency || "") + " live " + (d.balance ? d.balance.live : "?") + " ≤ " + d.threshold.amount;
    if (d.grant) return "grant " + d.grant.name + ": " + d.grant.remaining + " left, expires " + when(d.grant.expires_at);
    return "";
  }

  async function showMoreEvents() {
    const page = await api("GET", notificationsState.eventsPath);
    const rows = page.data.map((e) =>
      el("tr", { "data-event": e.id },
        el("td", {}, when(e.created_at)),
        el("td", {}, e.type),
        el("td", {}, el("a", { href: "#/customer/" + encodeURIComponent(e.customer_id) }, e.customer_id)),
        el("td", {}, eventDetail(e)),
        el("td", {}, e.deliveries.map((d) =>
          el("div", { class: "delivery-" + d.status },
            d.status + ", " + d.attempts + " attempt(s)" + (d.last_status ? ", last HTTP " + d.last_status : "") +
            (d.last_error ? ", " + d.last_error : "")))))
    );
    const tbody = $("#events tbody");
    if (!tbody.children.length && !rows.length) fill(tbody, [], 5, "No events yet.");
    else tbody.append(...rows);
    notificationsState.eventsPath = page.meta.page.next;
    $("#events-older").disabled = !notificationsState.eventsPath;
  }

  // ---- Routing -------------------------------------------------------------------------------

  function show(section) {
    for (const id of ["login", "customers", "customer", "notifications"]) $("#" + id).hidden = id !== section;
    $("#nav").hidden = section === "login";
  }

  async function route() {
    const hash = location.hash || "#/customers";
    if (!sessionStorage.getItem(TOKEN_KEY)) {
      show("login");
      $("#token").focus();
      return;
    }
    try {
      if (hash.startsWith("#/customer/")) {
        show("customer");
        await showCustomer(decodeURIComponent(hash.slice("#/customer/".length)));
      } else if (hash === "#/notifications") {
        show("notifications");
        await showNotifications();
      } else {
        show("customers");
        await showCustomers();
      }
    } catch (error) {
      report(error);
    }
  }

  function wire() {
    $("#login-form").addEventListener("submit", signIn);
    $("#sign-out").addEventListener("click", () => signOut("Signed out."));
    $("#search-form").addEventListener("submit", (e) => {
      e.preventDefault();
      customersState.page = 1;
      showCustomers().catch(report);
    });
    $("#customers-prev").addEventListener("click", () => { customersState.page--; showCustomers().catch(report); });
    $("#customers-next").addEventListener("click", () => { customersState.page++; showCustomers().catch(report); });
    $("#grant-form").addEventListener("submit", submitGrant);
    $("#adjust-form").addEventListener("submit", submitAdjustment);
    $("#tx-filters").addEventListener("submit", (e) => {
      e.preventDefault();
      view.txPath = customerPath(view.id) + "/credits/transactions" + transactionFilters();
      showTransactions(view.txPath).catch(report);
    });
    $("#chart-currency").addEventListener("change", () => drawChart().catch(report));
    $("#events-older").addEventListener("click", () => showMoreEvents().catch(report));
    window.addEventListener("hashchange", () => { status(""); route(); });
    route();
  }

  document.addEventListener("DOMContentLoaded", wire);
})();
