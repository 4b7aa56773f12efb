//! weft-dp: parse the flags and the Dataplane file, build the runtime, then run the proxy:
//! admin endpoint at once, the zone session, the listeners once the first configuration (and
//! certificate, with mTLS) is in place, and a drain on SIGTERM/SIGINT.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;
use weft_dp::admin::{self, Admin};
use weft_dp::client;
use weft_dp::config::{Cli, Command, Config, LogFormat};
use weft_dp::state::{Context, Labels, State};
use weft_dp::{dns, inbound, memory, metrics, outbound, tls, transparent, vips};

/// `pow(3)` for the whole binary, from the pure-Rust `libm` crate. The only libm function
/// the proxy links is `pow` (tokio's multi-threaded scheduler, `--threads N`, keeps an
/// average with `f64::powf`), and resolving it from glibc's libm.so loads that library,
/// whose load-time relocations keep ~300 KiB of it resident in every sidecar even when
/// nothing calls it. Defined here, the link does not need libm.so at all.
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

fn main() -> ExitCode {
    let args = match Cli::parse().command {
        Command::Version => {
            println!("weft-dp {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::TransparentRules(args) => {
            return match args.commands() {
                Ok(cmds) => {
                    println!("{}", cmds.join("\n"));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("weft-dp: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Run(args) => *args,
    };
    // Nothing starts unless the flags and files are right.
    let cfg = match Config::load(args).and_then(|cfg| init_tracing(&cfg).map(|()| cfg)) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("weft-dp: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = if cfg.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(cfg.threads))
            .enable_all()
            .build()
    };
    let result = runtime
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(run(cfg)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(cfg: &Config) -> anyhow::Result<()> {
    // `Targets` (target=level lists) rather than `EnvFilter`: a proxy needs no span-field
    // filters, and EnvFilter links the regex engine, which costs the sidecar's resident memory.
    let directives: Vec<&str> = cfg
        .log_level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let filter: tracing_subscriber::filter::Targets = directives
        .join(",")
        .parse()
        .map_err(|e| anyhow::anyhow!("--log-level {:?}: {e}", cfg.log_level))?;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match cfg.log_format {
        LogFormat::Text => registry.with(layer).init(),
        LogFormat::Json => registry.with(layer.json()).init(),
    }
    Ok(())
}

/// SIGTERM or SIGINT, whichever comes first; registered before anything starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

async fn run(mut cfg: Config) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    // What the listeners need of the Dataplane; not its parsed outbounds (a tags map each)
    // for as long as the proxy runs.
    let (inbounds, outbound_listeners) = (
        cfg.dataplane.spec.networking.inbound.len(),
        cfg.dataplane.outbounds(),
    );
    cfg.dataplane.spec.networking.outbound = Vec::new();
    // The session keeps the Dataplane file's text for its Hello; one copy is enough.
    let client_cfg = client::Config::new(&cfg);
    cfg.dataplane.text = String::new();
    let dp = &cfg.dataplane;
    let mut labels = Labels {
        mesh: dp.mesh.clone(),
        zone: String::new(),
        dataplane: dp.name.clone(),
    };
    let ctx = Context {
        state: State::new(),
        identity: tls::Identity::new(&dp.mesh),
        metrics: Arc::new(metrics::Metrics::new(labels.clone())),
        labels: Arc::new(labels.clone()),
        draining: CancellationToken::new(),
        tasks: TaskTracker::new(),
    };
    let client = client::Client::new(client_cfg, ctx.state.clone(), ctx.identity.clone());
    let session = client.status();
    // Ends the admin endpoint and the session when the process is done.
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();

    let admin = Admin::new(ctx.clone(), session.clone());
    let admin_listener = TcpListener::bind(cfg.admin_address)
        .await
        .with_context(|| format!("admin: binding {}", cfg.admin_address))?;
    tracing::info!(address = %cfg.admin_address, "admin endpoint listening");
    let mut admin_task = tokio::spawn(
        admin::serve(admin_listener, admin.clone(), stop.clone())
            .instrument(tracing::info_span!("admin")),
    );
    tracing::info!(
        zone = %cfg.zone_address, dataplane = %dp.name, mesh = %dp.mesh,
        version = env!("CARGO_PKG_VERSION"), "starting"
    );
    tokio::spawn(memory::trimmer(ctx.state.subscribe()));
    let mut session_task = tokio::spawn(
        client
            .run(stop.clone())
            .instrument(tracing::info_span!("session")),
    );

    // Listeners start once there is something to serve with.
    let mut progress = session.subscribe();
    tokio::select! {
        r = progress.wait_for(|p| p.waiting_for().is_none()) => {
            r.context("the session's status is gone")?;
        }
        r = &mut session_task => return ended("the zone session", r),
        r = &mut admin_task => return ended("the admin endpoint", r),
        s = signals.recv() => {
            tracing::info!(signal = s, "stopping before the first configuration");
            return Ok(());
        }
    }

    // The zone is known now: the listeners' metrics carry it.
    labels.zone = session.zone();
    let ctx = Context {
        metrics: Arc::new(metrics::Metrics::new(labels.clone())),
        labels: Arc::new(labels),
        ..ctx
    };
    admin.set_context(ctx.clone());
    let mut listeners = JoinSet::new();
    for l in dp.inbounds() {
        let listener = bind(&l.field, &l.host, l.port).await?;
        let span = tracing::info_span!("inbound", port = l.port, service = %l.inbound.service);
        let (field, ctx) = (l.field.clone(), ctx.clone());
        listeners.spawn(
            async move { (field, inbound::run(listener, l.inbound, ctx).await) }.instrument(span),
        );
    }
    let n_outbounds = outbound_listeners.len();
    // Every declared outbound on one task: an idle outbound is its socket and little else.
    let mut outbounds = Vec::with_capacity(outbound_listeners.len());
    for l in outbound_listeners {
        outbounds.push((bind(&l.field, &l.host, l.port).await?, l.outbound));
    }
    if !outbounds.is_empty() {
        let ctx = ctx.clone();
        listeners.spawn(
            async move {
                let r = outbound::run_all(outbounds, ctx).await;
                ("networking.outbound".to_string(), r)
            }
            .instrument(tracing::info_span!("outbounds")),
        );
    }
    if let Some(dns) = cfg.dns.clone() {
        let field = format!("--dns-address {}", dns.address);
        let udp = UdpSocket::bind(dns.address)
            .await
            .with_context(|| format!("{field}: binding UDP"))?;
        let tcp = TcpListener::bind(dns.address)
            .await
            .with_context(|| format!("{field}: binding TCP"))?;
        let ctx = ctx.clone();
        listeners.spawn(
            async move { (field, dns::run(udp, tcp, dns, ctx).await) }
                .instrument(tracing::info_span!("dns")),
        );
    }
    if cfg.bind_vips {
        let ctx = ctx.clone();
        listeners.spawn(
            async move { ("--bind-vips".to_string(), vips::run(ctx).await) }
                .instrument(tracing::info_span!("vips")),
        );
    }
    if let Some(t) = cfg.transparent {
        let field = format!("--transparent-outbound-port {}", t.address.port());
        let listener = TcpListener::bind(t.address)
            .await
            .with_context(|| format!("{field}: binding {}", t.address))?;
        let ctx = ctx.clone();
        listeners.spawn(
            async move { (field, transparent::run(listener, ctx).await) }
                .instrument(tracing::info_span!("transparent")),
        );
    }
    admin.set_listening();
    tracing::info!(
        inbounds,
        outbounds = n_outbounds,
        dns = ?cfg.dns.as_ref().map(|d| d.address),
        bind_vips = cfg.bind_vips,
        transparent = ?cfg.transparent.map(|t| t.address),
        "serving"
    );

    tokio::select! {
        s = signals.recv() => tracing::info!(signal = s, timeout = ?cfg.drain_timeout, "draining"),
        Some(r) = listeners.join_next() => {
            return match r {
                Ok((field, Ok(()))) => Err(anyhow::anyhow!("{field}: the listener stopped")),
                Ok((field, Err(e))) => Err(e.context(format!("{field}: the listener failed"))),
                Err(e) => Err(anyhow::anyhow!("a listener panicked: {e}")),
            };
        }
        r = &mut session_task => return ended("the zone session", r),
        r = &mut admin_task => return ended("the admin endpoint", r),
    }

    // Drain: stop accepting, let open connections finish within the timeout.
    ctx.draining.cancel();
    ctx.tasks.close();
    tokio::select! {
        _ = ctx.tasks.wait() => {
            tracing::info!("drained: every connection finished");
            return Ok(());
        }
        _ = tokio::time::sleep(cfg.drain_timeout) => {
            tracing::warn!(cut = ctx.tasks.len(), "drain timeout: cutting the connections still open");
        }
        s = signals.recv() => {
            tracing::warn!(signal = s, cut = ctx.tasks.len(), "second signal: cutting the connections still open");
        }
    }
    Ok(())
}

async fn bind(field: &str, host: &str, port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .with_context(|| format!("{field}: binding {}", authority(host, port)))
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A critical task ended before shutdown: that ends the process.
fn ended(what: &str, r: Result<anyhow::Result<()>, JoinError>) -> anyhow::Result<()> {
    match r {
        Ok(Ok(())) => Err(anyhow::anyhow!("{what} stopped")),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(anyhow::anyhow!("{what} panicked: {e}")),
    }
}

#[cfg(test)]
mod tests {
    /// The binary's own `pow` (instead of libm.so's) computes what `f64::powf` promises.
    #[test]
    fn pow_is_a_real_pow() {
        assert_eq!(super::pow(2.0, 10.0), 1024.0);
        assert!((super::pow(2.0, 0.5) - std::f64::consts::SQRT_2).abs() < 1e-15);
        assert!((super::pow(10.0, -3.5) - 0.00031622776601683794).abs() < 1e-18);
        assert!(super::pow(-1.0, 0.5).is_nan());
    }
}
