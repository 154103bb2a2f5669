//! The web chat client served at `/`: static files embedded in the binary, no build step. The
//! page runs on the JavaScript SDK of `clients/js`, served from the same binary at
//! `/sdk/confab.js` (with its type declarations at `/sdk/confab.d.ts`).

use actix_web::{web, HttpResponse};

const INDEX_HTML: &str = include_str!("../static/index.html");
const APP_JS: &str = include_str!("../static/app.js");
const STYLE_CSS: &str = include_str!("../static/style.css");
const SDK_JS: &str = include_str!("../../clients/js/src/confab.js");
const SDK_DTS: &str = include_str!("../../clients/js/src/confab.d.ts");

/// Routes of the web client.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(index))
        .route("/app.js", web::get().to(app_js))
        .route("/style.css", web::get().to(style_css))
        .route("/sdk/confab.js", web::get().to(sdk_js))
        .route("/sdk/confab.d.ts", web::get().to(sdk_dts));
}

async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(INDEX_HTML)
}

async fn app_js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .body(APP_JS)
}

async fn style_css() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .body(STYLE_CSS)
}

async fn sdk_js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .body(SDK_JS)
}

async fn sdk_dts() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(SDK_DTS)
}
