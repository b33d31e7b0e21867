//! `GET /v3/openapi.json`: the API description, generated from the handlers and types.

use axum::response::IntoResponse;
use utoipa::OpenApi;

use super::{
    authorize, balance, channels, charges, customers, events, gateway, grants, notification_events, rules, transactions,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "credits-ledger", description = "Prepaid credit ledger: Konnect-compatible credits API plus charges, voids and gateway sync."),
    paths(
        customers::create, customers::list, customers::get, customers::update, customers::delete,
        grants::create, grants::list, grants::get, grants::settle_external, grants::void_request,
        balance::get, transactions::list, charges::charge, charges::adjust, events::ingest, events::list, gateway::sync, authorize::authorize,
        channels::create, channels::list, channels::get, channels::update, channels::delete,
        rules::create, rules::list, rules::get, rules::update, rules::delete,
        notification_events::list, notification_events::get,
    ),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
    }
}

pub async fn document() -> impl IntoResponse {
    axum::Json(ApiDoc::openapi())
}
