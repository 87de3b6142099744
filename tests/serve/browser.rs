//! The viewer page in headless Chromium, driven over the DevTools protocol: load the page,
//! start a stream, see frames drawn, switch the prompt, see the ack and a block of the new
//! prompt on screen. The screenshot is kept at `target/tmp/serve-browser.png`.
//!
//! Chromium is Debian's `chromium` (installed by `scripts/install-test-tools.sh`; `BC_CHROMIUM`
//! names another binary). Without it the test fails, unless `BC_SKIP_BROWSER=1`.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Bound on every wait of this test (page load, frames, ack).
const WAIT: Duration = Duration::from_secs(60);

fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BC_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |d| d.join(name)))
        .find(|p| p.is_file())
}

/// Kills the browser (the process this test started) when the test ends, however it ends.
struct Browser(Child);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The DevTools endpoint Chromium writes to `DevToolsActivePort` in its profile folder.
fn devtools_url(profile: &Path, browser: &mut Browser) -> String {
    let file = profile.join("DevToolsActivePort");
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(s) = std::fs::read_to_string(&file) {
            let mut lines = s.lines();
            if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                return format!("ws://127.0.0.1:{}{}", port.trim(), path.trim());
            }
        }
        if let Ok(Some(status)) = browser.0.try_wait() {
            panic!("chromium exited early ({status})");
        }
        assert!(Instant::now() < deadline, "chromium never opened DevTools");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A DevTools connection attached to one page.
struct Cdp {
    ws: super::client::Ws,
    next_id: u64,
    session: Option<String>,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .expect("DevTools send");
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"));
            let Some(Ok(Message::Text(t))) = m else {
                match m {
                    Some(Ok(_)) => continue,
                    _ => panic!("DevTools connection lost during {method}"),
                }
            };
            let v: Value = serde_json::from_str(t.as_str()).expect("DevTools JSON");
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    panic!("{method}: {e}");
                }
                return v["result"].clone();
            }
            // Events (and answers for other sessions) are not needed.
        }
    }

    /// Evaluates `expr` in the page; its value (JSON-serializable).
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is true; on time out, fails with `what` and the page's state.
    async fn wait_for(&mut self, expr: &str, what: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.eval(expr).await == json!(true) {
                return;
            }
            if Instant::now() > deadline {
                let state = self.eval("JSON.stringify(window.bc)").await;
                panic!("timed out waiting for {what} ({expr}); page state: {state}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub fn run() {
    let Some(chromium) = find_chromium() else {
        if std::env::var("BC_SKIP_BROWSER").as_deref() == Ok("1") {
            eprintln!("browser_end_to_end: skipped (no chromium, BC_SKIP_BROWSER=1)");
            return;
        }
        panic!(
            "chromium not found: install it with scripts/install-test-tools.sh (or set \
             BC_CHROMIUM, or BC_SKIP_BROWSER=1 to skip this test)"
        );
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Paced like a real viewer, at a rate the CPU tiny model keeps up with.
    let server = super::start_server(1, 24.0);
    let addr = server.addr();
    let profile = tempfile::tempdir().unwrap();
    let mut browser = Browser(
        Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                "--window-size=1000,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium.display())),
    );
    let url = devtools_url(profile.path(), &mut browser);
    let shot = rt.block_on(async {
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect to DevTools");
        let mut cdp = Cdp {
            ws,
            next_id: 0,
            session: None,
        };
        let target = cdp
            .call(
                "Target.createTarget",
                json!({"url": format!("http://{addr}/")}),
            )
            .await["targetId"]
            .clone();
        let session = cdp
            .call(
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        cdp.session = Some(session);
        cdp.wait_for(
            "document.readyState === 'complete' && typeof window.bc === 'object'",
            "the page",
        )
        .await;
        // The built-in models: the page says the pictures are noise-like.
        assert_eq!(
            cdp.eval("document.getElementById('noise').hidden").await,
            json!(false)
        );
        cdp.eval("document.getElementById('start').click()").await;
        cdp.wait_for("bc.framesShown >= 6", "frames on the canvas")
            .await;
        cdp.eval(
            "document.getElementById('prompt').value = 'a blue whale under the ice'; \
             document.getElementById('switch').click()",
        )
        .await;
        cdp.wait_for("bc.acks.length >= 1", "the prompt_ack").await;
        cdp.wait_for(
            "bc.lastBlockShown >= bc.acks[0] && bc.switchVisibleMs !== null",
            "a block of the new prompt on screen",
        )
        .await;
        let state = cdp.eval("JSON.stringify(window.bc)").await;
        let state: Value = serde_json::from_str(state.as_str().unwrap()).unwrap();
        assert_eq!(state["errors"], json!([]), "{state}");
        assert_eq!(state["state"], json!("streaming"), "{state}");
        // The canvas shows a frame: not all one colour.
        let distinct = cdp
            .eval(
                "(() => { const c = document.getElementById('view'); \
                 const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
                 const s = new Set(); for (let i = 0; i < d.length; i += 4) s.add(d[i]); \
                 return s.size; })()",
            )
            .await;
        assert!(distinct.as_u64().unwrap_or(0) > 8, "canvas: {distinct}");
        let png = cdp
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await["data"]
            .as_str()
            .expect("screenshot data")
            .to_string();
        cdp.eval("document.getElementById('stop').click()").await;
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(png)
            .expect("base64")
    });
    assert!(shot.starts_with(b"\x89PNG\r\n\x1a\n"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve-browser.png");
    std::fs::write(&out, &shot).unwrap();
    eprintln!("browser_end_to_end: screenshot {}", out.display());
    drop(browser);
    rt.block_on(super::client::wait_no_streams(addr));
}
