//! The floor: a minimal tokio-rustls mTLS tunnel, one half per process, on one thread.
//!
//! - `bench-tunnel client --listen A --connect B ...`: plaintext in on A, TLS 1.3 with its
//!   client certificate out to B, the server verified by SPIFFE ID (`--expect`);
//! - `bench-tunnel server --listen B --connect U ...`: TLS 1.3 in on B (client certificate
//!   required, chained to the mesh root), plaintext out to U.
//!
//! One upstream connection per downstream connection, bytes copied both ways: no HTTP
//! parsing, no pooling, no policy. What any mTLS sidecar pair costs at least.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use weft_core::pki::SpiffeId;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Client,
    Server,
}

#[derive(Parser, Debug)]
struct Args {
    mode: Mode,
    #[arg(long)]
    listen: String,
    #[arg(long)]
    connect: String,
    /// Workload certificate then intermediate, PEM.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// The mesh root, PEM.
    #[arg(long)]
    ca: PathBuf,
    /// The server's SPIFFE ID (client mode).
    #[arg(long, default_value = "spiffe://bench/server")]
    expect: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!(
        "bench-tunnel {:?} listening on {} -> {}",
        args.mode, args.listen, args.connect
    );
    let connect: Arc<str> = args.connect.clone().into();
    match args.mode {
        Mode::Client => {
            let expected: SpiffeId = args.expect.parse()?;
            let cfg = weft_bench::tunnel_client_config(&args.cert, &args.key, &args.ca, expected)?;
            let connector = tokio_rustls::TlsConnector::from(cfg);
            let name = ServerName::try_from("server.bench")?;
            loop {
                let (mut down, _) = listener.accept().await?;
                let _ = down.set_nodelay(true);
                let connector = connector.clone();
                let name = name.clone();
                let connect = connect.clone();
                tokio::spawn(async move {
                    let result = async {
                        let up = TcpStream::connect(&*connect).await?;
                        up.set_nodelay(true)?;
                        let mut up = connector.connect(name, up).await?;
                        tokio::io::copy_bidirectional(&mut down, &mut up).await?;
                        anyhow::Ok(())
                    }
                    .await;
                    if let Err(e) = result {
                        eprintln!("connection: {e:#}");
                    }
                });
            }
        }
        Mode::Server => {
            let cfg = weft_bench::tunnel_server_config(&args.cert, &args.key, &args.ca)?;
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            loop {
                let (down, _) = listener.accept().await?;
                let _ = down.set_nodelay(true);
                let acceptor = acceptor.clone();
                let connect = connect.clone();
                tokio::spawn(async move {
                    let result = async {
                        let mut down = acceptor.accept(down).await?;
                        let mut up = TcpStream::connect(&*connect).await?;
                        up.set_nodelay(true)?;
                        tokio::io::copy_bidirectional(&mut down, &mut up).await?;
                        anyhow::Ok(())
                    }
                    .await;
                    if let Err(e) = result {
                        eprintln!("connection: {e:#}");
                    }
                });
            }
        }
    }
}
