//! `/v3/openmeter/customers`: create, read, replace, delete, list (page pagination, filters,
//! sorting), and the uniqueness of keys and usage-attribution subject keys.

mod support;

use serde_json::{json, Value};
use support::{column, customer_path, data, parse_time, Backend, Ledger, TestDb};

const CUSTOMERS: &str = "/v3/openmeter/customers";

async fn create(ledger: &Ledger, body: Value) -> Value {
    let (status, body) = ledger.post(CUSTOMERS, body).await;
    assert_eq!(status, 201, "{body}");
    body
}

async fn list(ledger: &Ledger, query: &str) -> Value {
    let (status, body) = ledger.get(&format!("{CUSTOMERS}{query}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn customer_round_trip_create_get_replace_delete(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let created = create(
        &ledger,
        json!({
            "name": "Acme Inc",
            "description": "the first customer",
            "labels": {"env": "test", "tier": "gold"},
            "key": "acme",
            "usage_attribution": {"subject_keys": ["acme-1", "acme-2"]},
            "primary_email": "billing@acme.example",
            "currency": "USD",
            "billing_address": {"country": "US", "city": "Austin", "line1": "1 Main St"}
        }),
    )
    .await;
    let id = created["id"].as_str().expect("id").to_owned();
    assert!(ledger::api::request::ulid_param("id", &id).is_ok(), "{id} is a ULID");
    assert_eq!(created["name"], "Acme Inc");
    assert_eq!(created["description"], "the first customer");
    assert_eq!(created["labels"], json!({"env": "test", "tier": "gold"}));
    assert_eq!(created["key"], "acme");
    assert_eq!(created["usage_attribution"], json!({"subject_keys": ["acme-1", "acme-2"]}));
    assert_eq!(created["primary_email"], "billing@acme.example");
    assert_eq!(created["currency"], "USD");
    assert_eq!(created["billing_address"], json!({"country": "US", "city": "Austin", "line1": "1 Main St"}));
    assert_eq!(created["created_at"], created["updated_at"]);
    assert!(created.get("deleted_at").is_none(), "{created}");

    let (status, fetched) = ledger.get(&customer_path(&id)).await;
    assert_eq!(status, 200, "{fetched}");
    assert_eq!(fetched, created);

    // PUT replaces the editable fields; omitted optional fields are cleared, the key stays.
    let (status, replaced) = ledger
        .put(
            &customer_path(&id),
            json!({"name": "Acme Corp", "labels": {"env": "prod"}, "usage_attribution": {"subject_keys": ["acme-3"]}}),
        )
        .await;
    assert_eq!(status, 200, "{replaced}");
    assert_eq!(replaced["id"], json!(id));
    assert_eq!(replaced["key"], "acme");
    assert_eq!(replaced["name"], "Acme Corp");
    assert_eq!(replaced["labels"], json!({"env": "prod"}));
    assert_eq!(replaced["usage_attribution"], json!({"subject_keys": ["acme-3"]}));
    for cleared in ["description", "primary_email", "currency", "billing_address", "deleted_at"] {
        assert!(replaced.get(cleared).is_none(), "{cleared} in {replaced}");
    }
    assert_eq!(replaced["created_at"], created["created_at"]);
    assert!(
        parse_time(replaced["updated_at"].as_str().unwrap_or(""))
            >= parse_time(created["updated_at"].as_str().unwrap_or(""))
    );
    let (_, fetched) = ledger.get(&customer_path(&id)).await;
    assert_eq!(fetched, replaced);

    // The key cannot change through PUT.
    let (status, body) = ledger.put(&customer_path(&id), json!({"name": "Acme", "key": "other"})).await;
    support::assert_problem(status, "application/problem+json", &body, 400, Some("key"));

    let reply = ledger.call(reqwest::Method::DELETE, &customer_path(&id)).send().await;
    assert_eq!(reply.status, 204);
    assert_eq!(reply.text, "");
    // A deleted customer can still be read, marked as deleted, but is no longer listed.
    let (status, fetched) = ledger.get(&customer_path(&id)).await;
    assert_eq!(status, 200, "{fetched}");
    assert!(fetched["deleted_at"].is_string(), "{fetched}");
    let listed = list(&ledger, "").await;
    assert_eq!(data(&listed).len(), 0, "{listed}");
    assert_eq!(listed["meta"]["page"]["total"], 0);
    // Replacing a deleted customer is 410 Gone; deleting it again is 404.
    let reply = ledger.call(reqwest::Method::PUT, &customer_path(&id)).json(&json!({"name": "Again"})).send().await;
    reply.assert_problem(410, None);
    let reply = ledger.call(reqwest::Method::DELETE, &customer_path(&id)).send().await;
    reply.assert_problem(404, None);
    let (_, fetched) = ledger.get(&customer_path(&id)).await;
    assert_eq!(fetched["name"], "Acme Corp", "the refused PUT changed nothing");
}

async fn customer_keys_and_subject_keys_are_unique_until_deleted(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let a =
        create(&ledger, json!({"name": "a", "key": "a", "usage_attribution": {"subject_keys": ["s1", "s2"]}})).await;
    let a_id = a["id"].as_str().expect("id").to_owned();

    let rows = ledger.row_counts().await;
    // A clash is a conflict with what exists (409, as Konnect's engine answers), naming the field.
    let reply = ledger.call(reqwest::Method::POST, CUSTOMERS).json(&json!({"name": "b", "key": "a"})).send().await;
    reply.assert_problem(409, Some("key"));
    let reply = ledger
        .call(reqwest::Method::POST, CUSTOMERS)
        .json(&json!({"name": "b", "key": "b", "usage_attribution": {"subject_keys": ["s9", "s2"]}}))
        .send()
        .await;
    reply.assert_problem(409, Some("usage_attribution.subject_keys"));
    assert!(reply.body["detail"].as_str().unwrap_or("").contains("[s2]"), "{}", reply.body);
    assert_eq!(ledger.row_counts().await, rows, "refused creations store nothing");

    // The same subject twice in one request is held once (the schema lets a list repeat one).
    let b =
        create(&ledger, json!({"name": "b", "key": "b", "usage_attribution": {"subject_keys": ["s3", "s3"]}})).await;
    assert_eq!(b["usage_attribution"]["subject_keys"], json!(["s3"]));
    let b_id = b["id"].as_str().expect("id").to_owned();
    // B may not take A's subject through PUT either; B stays as it was.
    let reply = ledger
        .call(reqwest::Method::PUT, &customer_path(&b_id))
        .json(&json!({"name": "b", "usage_attribution": {"subject_keys": ["s3", "s1"]}}))
        .send()
        .await;
    reply.assert_problem(409, Some("usage_attribution.subject_keys"));
    let (_, fetched) = ledger.get(&customer_path(&b_id)).await;
    assert_eq!(fetched, b);
    // A customer may keep its own subjects through PUT.
    let (status, body) = ledger
        .put(&customer_path(&a_id), json!({"name": "a2", "usage_attribution": {"subject_keys": ["s2", "s1"]}}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage_attribution"]["subject_keys"], json!(["s2", "s1"]));

    // Deleting A frees its key and its subjects.
    let (status, _) = ledger.delete(&customer_path(&a_id)).await;
    assert_eq!(status, 204);
    let c =
        create(&ledger, json!({"name": "c", "key": "a", "usage_attribution": {"subject_keys": ["s1", "s2"]}})).await;
    assert_ne!(c["id"], a["id"]);
    let by_subject = list(&ledger, "?filter[usage_attribution_subject_key]=s1").await;
    assert_eq!(column(&by_subject, "id"), vec![c["id"].as_str().unwrap_or("").to_owned()]);
    let by_key = list(&ledger, "?filter[key]=a").await;
    assert_eq!(column(&by_key, "name"), vec!["c"]);
    // A's subjects moved to C, so B still cannot have them.
    let reply = ledger
        .call(reqwest::Method::PUT, &customer_path(&b_id))
        .json(&json!({"name": "b", "usage_attribution": {"subject_keys": ["s1"]}}))
        .send()
        .await;
    reply.assert_problem(409, Some("usage_attribution.subject_keys"));
}

/// Five customers, created in a scrambled name order.
async fn five_customers(ledger: &Ledger) -> Vec<Value> {
    let mut out = Vec::new();
    for name in ["delta", "alpha", "echo", "charlie", "bravo"] {
        out.push(
            create(
                ledger,
                json!({"name": name, "key": format!("key-{name}"), "primary_email": format!("{name}@example.com"),
                    "usage_attribution": {"subject_keys": [format!("sub-{name}")]}}),
            )
            .await,
        );
    }
    out
}

async fn customer_list_paginates_by_page_number(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    five_customers(&ledger).await;
    let all = list(&ledger, "").await;
    assert_eq!(column(&all, "name"), vec!["alpha", "bravo", "charlie", "delta", "echo"], "name is the default sort");
    assert_eq!(all["meta"]["page"], json!({"number": 1, "size": 100, "total": 5}));
    let page = list(&ledger, "?page[size]=2&page[number]=2").await;
    assert_eq!(column(&page, "name"), vec!["charlie", "delta"]);
    assert_eq!(page["meta"]["page"], json!({"number": 2, "size": 2, "total": 5}));
    let page = list(&ledger, "?page[size]=2&page[number]=3").await;
    assert_eq!(column(&page, "name"), vec!["echo"]);
    let page = list(&ledger, "?page[size]=2&page[number]=4").await;
    assert_eq!(data(&page).len(), 0);
    assert_eq!(page["meta"]["page"], json!({"number": 4, "size": 2, "total": 5}));
    let page = list(&ledger, "?page[size]=1000").await;
    assert_eq!(data(&page).len(), 5);
    // Filters and pagination together: the total counts every match, not the page.
    let page = list(&ledger, "?filter[key][neq]=key-alpha&page[size]=3").await;
    assert_eq!(column(&page, "name"), vec!["bravo", "charlie", "delta"]);
    assert_eq!(page["meta"]["page"]["total"], 4);

    // As Konnect's engine does: a size or number below 1 is the default, a size above 1000 is
    // 1000, a number beyond i64 the last possible page.
    for (query, number, size) in [
        ("?page[size]=0", 1, 100),
        ("?page[size]=-3&page[number]=0", 1, 100),
        ("?page[size]=1001", 1, 1000),
        ("?page[size]=99999999999999999999999", 1, 1000),
        ("?page[number]=-1", 1, 100),
    ] {
        let page = list(&ledger, query).await;
        assert_eq!(page["meta"]["page"], json!({"number": number, "size": size, "total": 5}), "{query}");
        assert_eq!(data(&page).len(), 5, "{query}");
    }
    let beyond = list(&ledger, "?page[number]=99999999999999999999").await;
    assert_eq!((data(&beyond).len(), &beyond["meta"]["page"]["number"]), (0, &json!(i64::MAX)));
    for (query, field) in
        [("?page[size]=two", "page[size]"), ("?page[number]=1.5", "page[number]"), ("?page[after]=x", "page[after]")]
    {
        let reply = ledger.call(reqwest::Method::GET, &format!("{CUSTOMERS}{query}")).send().await;
        reply.assert_problem(400, Some(field));
    }
}

async fn customer_list_sorts_by_name_id_and_creation(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let customers = five_customers(&ledger).await;
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        column(&list(&ledger, "?sort=name").await, "name"),
        names(&["alpha", "bravo", "charlie", "delta", "echo"])
    );
    assert_eq!(
        column(&list(&ledger, "?sort=name%20asc").await, "name"),
        names(&["alpha", "bravo", "charlie", "delta", "echo"])
    );
    assert_eq!(
        column(&list(&ledger, "?sort=name%20desc").await, "name"),
        names(&["echo", "delta", "charlie", "bravo", "alpha"])
    );

    let mut ids: Vec<String> = customers.iter().map(|c| c["id"].as_str().unwrap_or("").to_owned()).collect();
    ids.sort();
    assert_eq!(column(&list(&ledger, "?sort=id").await, "id"), ids);
    ids.reverse();
    assert_eq!(column(&list(&ledger, "?sort=id%20desc").await, "id"), ids);

    // Creation order (ties on the clock broken by id).
    let mut by_creation: Vec<(chrono::DateTime<chrono::Utc>, String)> = customers
        .iter()
        .map(|c| (parse_time(c["created_at"].as_str().unwrap_or("")), c["id"].as_str().unwrap_or("").to_owned()))
        .collect();
    by_creation.sort();
    let expected: Vec<String> = by_creation.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(column(&list(&ledger, "?sort=created_at").await, "id"), expected);
    let reversed: Vec<String> = expected.iter().rev().cloned().collect();
    assert_eq!(column(&list(&ledger, "?sort=created_at%20desc").await, "id"), reversed);
    // Sorted pages follow one another.
    let page = list(&ledger, "?sort=name%20desc&page[size]=2&page[number]=2").await;
    assert_eq!(column(&page, "name"), names(&["charlie", "bravo"]));

    for bad in ["?sort=email", "?sort=name%20sideways", "?sort="] {
        let reply = ledger.call(reqwest::Method::GET, &format!("{CUSTOMERS}{bad}")).send().await;
        reply.assert_problem(400, Some("sort"));
    }
}

async fn customer_list_filters_by_key_name_email_and_subject(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    five_customers(&ledger).await;
    let cases: &[(&str, &[&str])] = &[
        ("?filter[key]=key-alpha", &["alpha"]),
        ("?filter[key][eq]=key-bravo", &["bravo"]),
        ("?filter[key][eq]=key-nobody", &[]),
        ("?filter[key][oeq]=key-alpha,key-echo", &["alpha", "echo"]),
        ("?filter[key][neq]=key-alpha", &["bravo", "charlie", "delta", "echo"]),
        ("?filter[key][contains]=ha", &["alpha", "charlie"]),
        ("?filter[key][ocontains]=lph,ravo", &["alpha", "bravo"]),
        ("?filter[name][eq]=delta", &["delta"]),
        ("?filter[primary_email][contains]=echo@", &["echo"]),
        ("?filter[usage_attribution_subject_key]=sub-echo", &["echo"]),
        ("?filter[usage_attribution_subject_key][eq]=sub-delta", &["delta"]),
        ("?filter[usage_attribution_subject_key][oeq]=sub-alpha,sub-bravo", &["alpha", "bravo"]),
        ("?filter[usage_attribution_subject_key][contains]=sub-", &["alpha", "bravo", "charlie", "delta", "echo"]),
        ("?filter[usage_attribution_subject_key][ocontains]=lie,lta", &["charlie", "delta"]),
        ("?filter[usage_attribution_subject_key][neq]=sub-alpha", &["bravo", "charlie", "delta", "echo"]),
        ("?filter[key][neq]=key-charlie&filter[usage_attribution_subject_key][contains]=ch", &["echo"]),
    ];
    for (query, expected) in cases {
        let body = list(&ledger, query).await;
        assert_eq!(column(&body, "name"), expected.to_vec(), "{query}");
        assert_eq!(body["meta"]["page"]["total"], json!(expected.len()), "{query}");
    }
    for (query, field) in
        [("?filter[key][like]=a", "filter[key][like]"), ("?filter[plan]=a", "filter[plan]"), ("?limit=5", "limit")]
    {
        let reply = ledger.call(reqwest::Method::GET, &format!("{CUSTOMERS}{query}")).send().await;
        reply.assert_problem(400, Some(field));
    }
}

async fn customer_fields_are_validated(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let existing = ledger.customer("existing").await;
    let rows = ledger.row_counts().await;
    let base = json!({"name": "n", "key": "k"});
    let cases: Vec<(Value, &str)> = vec![
        (json!({"name": ""}), "name"),
        (json!({"name": "x".repeat(257)}), "name"),
        (json!({"description": "d".repeat(1025)}), "description"),
        (json!({"key": ""}), "key"),
        (json!({"key": "k".repeat(257)}), "key"),
        (json!({"key": null}), "key"),
        (json!({"name": null}), "name"),
        (json!({"currency": "usd"}), "currency"),
        (json!({"currency": "USDT"}), "currency"),
        (json!({"labels": {"konnect.io": "x"}}), "labels.konnect.io"),
        (json!({"labels": {"ok": "bad value"}}), "labels.ok"),
        (json!({"billing_address": {"country": "usa"}}), "billing_address.country"),
        (json!({"billing_address": {"planet": "earth"}}), "billing_address.planet"),
        (json!({"usage_attribution": {"subject_keys": [""]}}), "usage_attribution.subject_keys[0]"),
        (json!({"usage_attribution": {"subject_keys": "s"}}), "usage_attribution.subject_keys"),
        (json!({"usage_attribution": {"subjects": ["s"]}}), "usage_attribution.subjects"),
        (json!({"nickname": "n"}), "nickname"),
    ];
    for (extra, field) in cases {
        let body = support::merged(base.clone(), extra);
        let reply = ledger.call(reqwest::Method::POST, CUSTOMERS).json(&body).send().await;
        reply.assert_problem(400, Some(field));
        let mut put_body = support::merged(body, json!({"key": null}));
        if field == "key" {
            continue; // PUT has no key to get wrong
        }
        if put_body.get("name").is_none() && field != "name" {
            put_body["name"] = json!("n");
        }
        let reply = ledger.call(reqwest::Method::PUT, &customer_path(&existing)).json(&put_body).send().await;
        reply.assert_problem(400, Some(field));
    }
    assert_eq!(ledger.row_counts().await, rows, "nothing stored");
    let (_, fetched) = ledger.get(&customer_path(&existing)).await;
    assert_eq!(fetched["name"], "existing");
}

/// Creates eight customers at once, the `i`th with `(key, subject key)` of `names(i)`; how many
/// were created (every other answer must be a 409).
async fn created_at_once(ledger: &std::sync::Arc<Ledger>, names: impl Fn(usize) -> (String, String)) -> usize {
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (ledger, (key, subject)) = (ledger.clone(), names(i));
            tokio::spawn(async move {
                let body = json!({"name": "n", "key": key, "usage_attribution": {"subject_keys": [subject]}});
                ledger.post(CUSTOMERS, body).await
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        let (status, body) = t.await.expect("task");
        assert!(status == 201 || status == 409, "{status} {body}");
        created += usize::from(status == 201);
    }
    created
}

/// Customers created at once with one key, or one subject key: one is created, the others clash
/// (409), never a 500. On PostgreSQL writers run side by side, so the unique index, not the check
/// before it, is what refuses the others.
async fn customers_created_at_once_with_one_key_clash_with_409(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = std::sync::Arc::new(Ledger::start(&db).await);
    for round in 0..5 {
        let one_key = created_at_once(&ledger, |i| (format!("same-{round}"), format!("subject-{round}-{i}"))).await;
        assert_eq!(one_key, 1, "round {round}: one customer per key");
        let one_subject = created_at_once(&ledger, |i| (format!("own-{round}-{i}"), format!("shared-{round}"))).await;
        assert_eq!(one_subject, 1, "round {round}: one customer per subject key");
    }
}

on_both_backends!(
    customers_created_at_once_with_one_key_clash_with_409,
    customer_round_trip_create_get_replace_delete,
    customer_keys_and_subject_keys_are_unique_until_deleted,
    customer_list_paginates_by_page_number,
    customer_list_sorts_by_name_id_and_creation,
    customer_list_filters_by_key_name_email_and_subject,
    customer_fields_are_validated,
);
