//! A TCP proxy for fault injection between a zone and global: it forwards bytes both ways
//! until told to freeze the connections it holds. A frozen connection stops forwarding in
//! both directions but keeps both sockets open (a silent stall, like a dead middlebox),
//! while connections accepted later pass through.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy on `127.0.0.1:<port>` to one upstream address.
pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    /// One freeze switch per connection accepted so far.
    switches: Mutex<Vec<watch::Sender<bool>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Proxy {
    pub async fn start(upstream: String) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::default());
        let accept = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((down, _)) = listener.accept().await {
                    let (tx, rx) = watch::channel(false);
                    shared.switches.lock().unwrap().push(tx);
                    let upstream = upstream.clone();
                    let task = tokio::spawn(async move {
                        let Ok(up) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let _ = down.set_nodelay(true);
                        let _ = up.set_nodelay(true);
                        let (dr, dw) = down.into_split();
                        let (ur, uw) = up.into_split();
                        tokio::join!(pipe(dr, uw, rx.clone()), pipe(ur, dw, rx));
                    });
                    shared.tasks.lock().unwrap().push(task);
                }
            }
        });
        Ok(Proxy {
            port,
            shared,
            accept,
        })
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.switches.lock().unwrap().len()
    }

    /// Stop forwarding on every connection accepted so far, keeping their sockets open.
    /// Returns how many were frozen.
    pub fn freeze_current(&self) -> usize {
        let switches = self.shared.switches.lock().unwrap();
        for s in switches.iter() {
            let _ = s.send(true);
        }
        switches.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for t in self.shared.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// Copy `from` to `to` until EOF, an error, or the freeze switch; once frozen, hold both
/// halves (open, silent) until the task is aborted.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            r = from.read(&mut buf) => r,
            _ = frozen.wait_for(|f| *f) => break,
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if *frozen.borrow() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    // Frozen: keep the sockets open and forward nothing.
    let _keep = (from, to);
    std::future::pending::<()>().await;
}
