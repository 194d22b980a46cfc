//! The HTTP side: the axum routes, the accept loop with its timeouts, and
//! the graceful shutdown behind [`ServerHandle`].

use crate::api::{parse_params, ApiError, MAX_BODY};
use crate::model::{submit, Info, Job, Pool, Reply};
use anyhow::{bail, Context, Result};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri, Version};
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use lm::checkpoint::Loaded;
use serde_json::json;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::task::{Context as TaskCx, Poll};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};

/// How long the server waits on a client.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// For a request's headers, counted from when the connection is ready
    /// for the next request: an idle or slow connection is closed after it.
    pub header_read: Duration,
    /// For a request's whole body once its headers are in (else a 408).
    pub body_read: Duration,
    /// For a write to the socket to make progress: a client that stops
    /// reading its answer loses the connection after it.
    pub write: Duration,
    /// At shutdown, for the connections still open once every accepted
    /// request is answered.
    pub close: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header_read: Duration::from_secs(30),
            body_read: Duration::from_secs(30),
            write: Duration::from_secs(60),
            close: Duration::from_secs(10),
        }
    }
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct Options {
    /// The model name clients send.
    pub name: String,
    /// Port on 127.0.0.1 (0 = any free port).
    pub port: u16,
    /// Worker threads that run requests on the model (at least 1).
    pub workers: usize,
    /// The largest `max_tokens` (at least 1).
    pub max_tokens_limit: usize,
    /// Requests waiting for a worker beyond which a request is a 503.
    pub queue: usize,
    pub timeouts: Timeouts,
}

impl Options {
    pub fn new(name: &str, port: u16, workers: usize, max_tokens_limit: usize) -> Self {
        Options {
            name: name.to_string(),
            port,
            workers,
            max_tokens_limit,
            queue: 64.max(workers.saturating_mul(16)),
            timeouts: Timeouts::default(),
        }
    }

    /// Refuses settings the server cannot run with.
    pub fn check(&self) -> Result<()> {
        if self.workers == 0 {
            bail!("--workers must be at least 1 (the worker threads that run requests on the model)");
        }
        if self.max_tokens_limit == 0 {
            bail!("--max-tokens-limit must be at least 1 (the most tokens an answer may have)");
        }
        if self.queue == 0 {
            bail!("the request queue must hold at least 1 request");
        }
        Ok(())
    }
}

/// Requests in progress, and whether the server is shutting down.
#[derive(Default)]
struct Gate {
    stopping: AtomicBool,
    in_flight: AtomicUsize,
}

/// One request counted in flight; a streaming response keeps it until its
/// last event is out.
struct Entered(Arc<Gate>);

impl Gate {
    /// Counts a request in, unless the server is shutting down. Counting
    /// first and checking after means that a request either is waited for
    /// by the shutdown or sees `stopping`.
    fn enter(self: &Arc<Self>) -> Option<Entered> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let entered = Entered(self.clone());
        if self.stopping.load(Ordering::SeqCst) {
            return None; // dropping `entered` counts it out again
        }
        Some(entered)
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct App {
    info: Arc<Info>,
    jobs: SyncSender<Job>,
    gate: Arc<Gate>,
    body_read: Duration,
}

/// A running server; dropping it shuts it down.
pub struct ServerHandle {
    pub addr: SocketAddr,
    gate: Arc<Gate>,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
    pool: Pool,
}

impl ServerHandle {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests being served at this moment.
    pub fn in_flight(&self) -> usize {
        self.gate.in_flight.load(Ordering::SeqCst)
    }

    /// Stops taking requests (those that arrive now get a 503), lets every
    /// request accepted before finish (a stream runs to its end), closes the
    /// socket and joins the workers.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Blocks until the server stops.
    pub fn wait(mut self) {
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        self.pool.join();
    }

    fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        self.pool.join();
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts serving `model` as `name` on 127.0.0.1:`port` with `workers`
/// worker threads and the default timeouts.
pub fn start(
    model: Loaded,
    name: &str,
    port: u16,
    workers: usize,
    max_tokens_limit: usize,
) -> Result<ServerHandle> {
    start_with(model, Options::new(name, port, workers, max_tokens_limit))
}

/// Starts serving `model` with `opts`.
pub fn start_with(model: Loaded, opts: Options) -> Result<ServerHandle> {
    opts.check()?;
    let port = opts.port;
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}; pick another --port"))?;
    let addr = listener.local_addr().context("the server has no address")?;
    listener.set_nonblocking(true).context("cannot make the socket non-blocking")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("serve-io")
        .enable_all()
        .build()
        .context("cannot start the server's runtime")?;
    let info = Arc::new(Info::new(&opts.name, opts.max_tokens_limit));
    let mut pool = Pool::start(model, info.clone(), opts.workers, opts.queue)?;
    let Some(jobs) = pool.sender() else { bail!("the worker pool has no queue") };
    let gate = Arc::new(Gate::default());
    let app = App { info, jobs, gate: gate.clone(), body_read: opts.timeouts.body_read };
    let (stop, stop_rx) = watch::channel(false);
    let timeouts = opts.timeouts.clone();
    let g = gate.clone();
    let server = std::thread::Builder::new().name("serve-accept".into()).spawn(move || {
        rt.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => serve(l, router(app), g, stop_rx, timeouts).await,
                Err(e) => eprintln!("align serve: cannot use the socket: {e}"),
            }
        });
    });
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            pool.join();
            return Err(e).context("cannot start the server thread");
        }
    };
    Ok(ServerHandle { addr, gate, stop, server: Some(server), pool })
}

fn router(app: App) -> Router {
    Router::new()
        .route("/v1/models", get(models).fallback(wrong_method))
        .route("/v1/chat/completions", post(chat).fallback(wrong_method))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(app.clone(), gate))
        .with_state(app)
}

/// Counts every request in flight, and answers 503 once shutting down.
async fn gate(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let Some(entered) = app.gate.enter() else { return ApiError::shutting_down().into_response() };
    let entered = Arc::new(entered);
    req.extensions_mut().insert(entered.clone());
    next.run(req).await
}

async fn models(State(app): State<App>) -> Response {
    let v =
        json!({"object": "list", "data": [{"id": app.info.name, "object": "model", "owned_by": "align"}]});
    Json(v).into_response()
}

async fn wrong_method(uri: Uri) -> Response {
    ApiError::new(405, "invalid_request_error", format!("{} does not accept this method", uri.path()))
        .into_response()
}

async fn not_found(uri: Uri) -> Response {
    let path = uri.path();
    ApiError::new(404, "not_found", format!("no route {path}; use /v1/chat/completions or /v1/models"))
        .into_response()
}

/// Reads the body, at most [`MAX_BODY`] bytes: a larger declared length is
/// refused before anything is read or allocated.
async fn read_body(headers: &HeaderMap, body: Body, limit: Duration) -> Result<Vec<u8>, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(ApiError::too_large());
    }
    let read = async {
        let mut buf = Vec::with_capacity(declared.unwrap_or(0) as usize);
        let mut chunks = body.into_data_stream();
        while let Some(c) = chunks.next().await {
            let c = c.map_err(|e| ApiError::bad(format!("cannot read the request body: {e}")))?;
            if buf.len() + c.len() > MAX_BODY {
                return Err(ApiError::too_large());
            }
            buf.extend_from_slice(&c);
        }
        Ok(buf)
    };
    match tokio::time::timeout(limit, read).await {
        Ok(r) => r,
        Err(_) => Err(ApiError {
            close: true,
            ..ApiError::new(
                408,
                "invalid_request_error",
                format!("the request body did not arrive within {} s", limit.as_secs_f64()),
            )
        }),
    }
}

async fn chat(
    State(app): State<App>,
    Extension(entered): Extension<Arc<Entered>>,
    version: Version,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&headers, body, app.body_read).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let params = match parse_params(&app.info.name, app.info.max_tokens_limit, &body) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if !params.stream {
        let (tx, rx) = oneshot::channel();
        if let Err(e) = submit(&app.jobs, Job { params, reply: Reply::Whole(tx) }) {
            return e.into_response();
        }
        return match rx.await {
            Ok(Ok(v)) => Json(v).into_response(),
            Ok(Err(e)) => e.into_response(),
            Err(_) => ApiError::internal_generic().into_response(),
        };
    }
    let (opened_tx, opened) = oneshot::channel();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    if let Err(e) =
        submit(&app.jobs, Job { params, reply: Reply::Stream { opened: opened_tx, events: events_tx } })
    {
        return e.into_response();
    }
    match opened.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return e.into_response(),
        Err(_) => return ApiError::internal_generic().into_response(),
    }
    if version < Version::HTTP_11 {
        // No chunked transfer in HTTP/1.0: the same events in one body.
        let mut all = String::new();
        while let Some(data) = events.recv().await {
            all.push_str(&format!("data: {data}\n\n"));
        }
        return (StatusCode::OK, [(header::CONTENT_TYPE, "text/event-stream")], all).into_response();
    }
    // The stream holds the request in flight until its last event is out.
    let stream = futures_util::stream::unfold((events, entered), |(mut events, entered)| async move {
        let data = events.recv().await?;
        Some((Ok::<_, Infallible>(Event::default().data(data)), (events, entered)))
    });
    Sse::new(stream).into_response()
}

/// Accepts connections until `stop`, then keeps answering new requests with
/// a 503 until every accepted one is done, then closes the socket and the
/// connections.
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    gate: Arc<Gate>,
    mut stop: watch::Receiver<bool>,
    timeouts: Timeouts,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(timeouts.header_read);
    let graceful = GracefulShutdown::new();
    let accept = |r: std::io::Result<(tokio::net::TcpStream, SocketAddr)>| match r {
        Ok((socket, _)) => {
            let socket = WriteTimeout { inner: socket, limit: timeouts.write, timer: None };
            let conn = http.serve_connection(TokioIo::new(socket), TowerToHyperService::new(app.clone()));
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = conn.await;
            });
            None
        }
        // Out of file descriptors and the like: wait a little and go on.
        Err(e) => {
            eprintln!("align serve: accept failed: {e}");
            Some(Duration::from_millis(50))
        }
    };
    loop {
        tokio::select! {
            r = listener.accept() => if let Some(pause) = accept(r) { tokio::time::sleep(pause).await },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    gate.stopping.store(true, Ordering::SeqCst);
    let drained = async {
        while gate.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::pin!(drained);
    loop {
        tokio::select! {
            r = listener.accept() => if let Some(pause) = accept(r) { tokio::time::sleep(pause).await },
            _ = &mut drained => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(timeouts.close) => {
            eprintln!("align serve: closing the connections still open after {:?}", timeouts.close);
        }
    }
}

/// A socket whose writes fail once one has made no progress for `limit`,
/// so that a client that stops reading cannot hold a connection (and the
/// request on it, which a shutdown waits for) forever.
struct WriteTimeout {
    inner: tokio::net::TcpStream,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteTimeout {
    /// After the socket said Pending: Pending, or the timeout's error.
    fn pending<T>(&mut self, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<T>> {
        let limit = self.limit;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing within the write timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(&mut self, p: Poll<std::io::Result<T>>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<T>> {
        match p {
            Poll::Pending => self.pending(cx),
            ready => {
                self.timer = None;
                ready
            }
        }
    }
}

impl AsyncRead for WriteTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteTimeout {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(p, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(p, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(p, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<std::io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(p, cx)
    }
}
