//! The demo's application: an HTTP server that says who it is and who called it (the
//! `x-forwarded-client-cert` its sidecar adds). `demo-app NAME 127.0.0.1:PORT`.

use axum::http::HeaderMap;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(name), Some(listen)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: demo-app NAME ADDRESS:PORT");
    };
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    let app = axum::Router::new().fallback(move |headers: HeaderMap| {
        let name = name.clone();
        async move {
            let caller = headers
                .get("x-forwarded-client-cert")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').find_map(|p| p.strip_prefix("URI=")))
                .unwrap_or("unknown (no mesh identity)")
                .to_string();
            format!("hello from {name}; you are {caller}\n")
        }
    });
    axum::serve(listener, app).await?;
    Ok(())
}
