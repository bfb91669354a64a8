//! The chat example (`examples/chat.rs`) in a real browser: headless Chromium, driven
//! through the Chrome DevTools Protocol over this crate's own [`BlockingClient`].
//!
//! The test builds the example (`cargo build --profile test --example chat`, nothing to do
//! after `cargo test` has built its targets), starts it on a free loopback port, starts
//! `/usr/bin/chromium` (or `$CHROMIUM`) with `--remote-debugging-port=0` and reads the
//! DevTools URL from its stderr. Three pages join: alice and bob in `alpha`, carol in
//! `beta`. Alice types a line with HTML in it; alice and bob must show it as literal text
//! (no element made of it), carol must not see it. Join, leave and refused-join notices are
//! checked too, and a screenshot of alice's page is saved to
//! `target/test-artifacts/chat.png`. Every wait polls the DOM against a deadline.
//!
//! Chromium is required: without it the test fails (`.ci/run` installs it).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use websocket_driver::client::BlockingClient;
use websocket_driver::{Message, Options};

/// How long any one thing may take (a bound on waiting, not a speed requirement).
const PATIENCE: Duration = Duration::from_secs(30);

/// The line alice sends: if the page used it as HTML, a `<b>` element would appear.
const HTML_LINE: &str = r#"<b>hi</b> & "x""#;

/// A child process that is killed and reaped when dropped, so a failing assertion
/// leaves nothing running.
struct Reaped {
    child: Child,
    /// Kill the child's whole process group too (Chromium's zygote and renderers).
    group: bool,
    /// A directory to remove once the child is gone.
    scratch: Option<PathBuf>,
}

impl Reaped {
    /// Waits up to `grace` for the child to exit on its own (the guard then kills the rest).
    fn exit_within(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if self.group {
            // The child leads its own group (`process_group(0)`): only its processes.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Reads `stderr` on a thread, forever (a full pipe would stall the child), keeping the
/// lines for failure messages and handing each to `lines`.
fn drain(
    stderr: impl Read + Send + 'static,
    kept: Arc<Mutex<Vec<String>>>,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            kept.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    rx
}

/// The first line from `lines` that `pick` accepts, within [`PATIENCE`].
fn first_line<T>(
    lines: &mpsc::Receiver<String>,
    what: &str,
    kept: &Mutex<Vec<String>>,
    mut pick: impl FnMut(&str) -> Option<T>,
) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(found) = pick(&line) {
                    return found;
                }
            }
            Err(_) => panic!(
                "no {what} within {PATIENCE:?}; its stderr:\n{}",
                kept.lock().unwrap().join("\n")
            ),
        }
    }
}

/// The chat example's binary, built by cargo (a no-op when `--all-targets` built it).
fn chat_binary() -> PathBuf {
    support::example_binary("chat", &[])
}

/// Starts the chat server on a free loopback port; returns it and its address.
fn start_server() -> (Reaped, String) {
    let binary = chat_binary();
    let mut child = Command::new(&binary)
        .args(["--addr", "127.0.0.1:0", "--threads", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let kept = Arc::default();
    let lines = drain(child.stderr.take().unwrap(), Arc::clone(&kept));
    let server = Reaped {
        child,
        group: false,
        scratch: None,
    };
    let addr = first_line(&lines, "chat listening line", &kept, |line| {
        let rest = line.strip_prefix("chat: listening on http://")?;
        Some(rest.split('/').next()?.to_string())
    });
    (server, addr)
}

/// Starts headless Chromium; returns it and its DevTools browser URL.
fn start_chromium() -> (Reaped, String) {
    let path =
        std::env::var_os("CHROMIUM").map_or_else(|| "/usr/bin/chromium".into(), PathBuf::from);
    assert!(
        path.exists(),
        "{} not found: this test needs Chromium (Debian: apt-get install chromium; \
         .ci/run installs it; or set CHROMIUM=/path/to/chromium)",
        path.display()
    );
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let profile =
        std::env::temp_dir().join(format!("wsd-chat-chromium-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&profile).unwrap();
    let mut command = Command::new(&path);
    command
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--remote-debugging-port=0",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-background-timer-throttling",
            "--disable-backgrounding-occluded-windows",
            "--disable-renderer-backgrounding",
            "--hide-scrollbars",
            "--window-size=900,640",
            "--mute-audio",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
    let kept = Arc::default();
    let lines = drain(child.stderr.take().unwrap(), Arc::clone(&kept));
    let browser = Reaped {
        child,
        group: true,
        scratch: Some(profile),
    };
    let url = first_line(&lines, "DevTools listening line", &kept, |line| {
        Some(
            line.strip_prefix("DevTools listening on ")?
                .trim()
                .to_string(),
        )
    });
    (browser, url)
}

/// A DevTools Protocol connection to the browser; pages are flattened sessions on it.
struct Cdp {
    client: BlockingClient,
    inbox: mpsc::Receiver<Value>,
    next_id: u64,
}

impl Cdp {
    fn connect(url: &str) -> Cdp {
        let client = BlockingClient::new(url, Options::default()).unwrap();
        let (tx, inbox) = mpsc::channel();
        client.on_message(move |_, message| {
            if let Message::Text(text) = message {
                match serde_json::from_str::<Value>(&text) {
                    Ok(value) => {
                        let _ = tx.send(value);
                    }
                    Err(e) => eprintln!("cdp: unparsable message ({e}): {text}"),
                }
            }
        });
        client
            .start_connection()
            .unwrap_or_else(|e| panic!("cannot connect to DevTools at {url}: {e}"));
        Cdp {
            client,
            inbox,
            next_id: 0,
        }
    }

    /// Sends a call without waiting for its answer; returns its id.
    fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            request["sessionId"] = json!(session);
        }
        self.client
            .send_text(&request.to_string())
            .unwrap_or_else(|e| panic!("{method}: cannot send: {e}"));
        id
    }

    /// Calls `method` (on a page's session, or the browser's) and returns its result;
    /// events that arrive meanwhile are dropped.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.send(session, method, params);
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = self
                .inbox
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("{method}: no answer within {PATIENCE:?} ({e})"));
            if reply["id"] == id {
                if let Some(error) = reply.get("error") {
                    panic!("{method} failed: {error}");
                }
                return reply["result"].clone();
            }
        }
    }
}

/// One browser tab with the chat page, attached as a flattened session.
struct Page {
    name: &'static str,
    target_id: String,
    session: String,
}

impl Page {
    fn open(cdp: &mut Cdp, name: &'static str, url: &str) -> Page {
        let target = cdp.call(None, "Target.createTarget", json!({"url": url}));
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = cdp.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": &target_id, "flatten": true}),
        );
        let page = Page {
            name,
            target_id,
            session: attached["sessionId"].as_str().unwrap().to_string(),
        };
        page.wait(
            cdp,
            "the chat page loaded as HTML",
            "document.readyState === 'complete' && document.contentType === 'text/html' \
             && document.getElementById('join') !== null",
        );
        page
    }

    /// Evaluates `expression` in the page and returns its value.
    fn eval(&self, cdp: &mut Cdp, expression: &str) -> Value {
        let result = cdp.call(
            Some(&self.session),
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{}: {expression} threw {exception}", self.name);
        }
        result["result"]["value"].clone()
    }

    /// The chat log as `type: text` lines.
    fn log(&self, cdp: &mut Cdp) -> Vec<String> {
        let lines = self.eval(
            cdp,
            "Array.from(document.querySelectorAll('#log li'), \
             li => li.dataset.type + ': ' + li.textContent)",
        );
        serde_json::from_value(lines).unwrap()
    }

    /// Polls `condition` (a JS expression) until it is true, within [`PATIENCE`].
    fn wait(&self, cdp: &mut Cdp, what: &str, condition: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if self.eval(cdp, condition) == json!(true) {
                return;
            }
            if Instant::now() > deadline {
                let status = self.eval(cdp, "document.getElementById('status')?.textContent");
                panic!(
                    "{}: not {what} within {PATIENCE:?}; status {status}, log {:#?}",
                    self.name,
                    self.log(cdp)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Fills the join form and submits it.
    fn join(&self, cdp: &mut Cdp, nick: &str, room: &str) {
        self.eval(
            cdp,
            &format!(
                "document.getElementById('nick').value = {}; \
                 document.getElementById('room').value = {}; \
                 document.getElementById('join').click(); true",
                json!(nick),
                json!(room)
            ),
        );
    }

    /// Types `text` into the message field as keyboard input and presses Enter.
    fn say(&self, cdp: &mut Cdp, text: &str) {
        let session = Some(self.session.as_str());
        cdp.call(session, "Page.bringToFront", json!({}));
        self.wait(
            cdp,
            "ready to send",
            "!document.getElementById('text').disabled",
        );
        self.eval(cdp, "document.getElementById('text').focus(); true");
        cdp.call(session, "Input.insertText", json!({"text": text}));
        for kind in ["keyDown", "keyUp"] {
            cdp.call(
                session,
                "Input.dispatchKeyEvent",
                json!({"type": kind, "key": "Enter", "code": "Enter",
                       "windowsVirtualKeyCode": 13, "text": "\r"}),
            );
        }
    }

    /// Whether the log holds a chat line `text` from `nick` (as text, compared exactly).
    fn has_line(nick: &str, text: &str) -> String {
        format!(
            "Array.from(document.querySelectorAll('#log li[data-type=message]')).some(li => \
             li.querySelector('.nick')?.textContent === {} && \
             li.querySelector('.text')?.textContent === {})",
            json!(nick),
            json!(text)
        )
    }

    fn has_notice(kind: &str, text: &str) -> String {
        format!(
            "Array.from(document.querySelectorAll('#log li[data-type={kind}]')).some(li => \
             li.textContent.includes({}))",
            json!(text)
        )
    }
}

/// A plain HTTP GET: status and body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http_request(addr, "GET", path);
    (status, body)
}

/// A plain HTTP request without a body: status, head and body.
fn http_request(addr: &str, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: no status in {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_string(), body.to_string())
}

/// Where artifacts go: `target/test-artifacts` next to this test's binary.
fn artifacts_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/chat_browser-HASH
    let target = exe
        .ancestors()
        .nth(3)
        .filter(|dir| dir.join("CACHEDIR.TAG").exists() || dir.ends_with("target"))
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
            Path::to_path_buf,
        );
    target.join("test-artifacts")
}

#[test]
fn three_pages_two_rooms_in_headless_chromium() {
    let started = Instant::now();
    let (_server, addr) = start_server();
    let (status, body) = http_get(&addr, "/");
    assert_eq!(status, 200);
    assert!(body.contains(r#"<ul id="log""#), "{body}");
    assert_eq!(http_get(&addr, "/nope").0, 404);
    let (status, head, _) = http_request(&addr, "POST", "/");
    assert_eq!(status, 405);
    assert!(head.contains("\r\nAllow: GET"), "{head}");

    let (mut browser, devtools) = start_chromium();
    let mut cdp = Cdp::connect(&devtools);
    let url = format!("http://{addr}/");
    let alice = Page::open(&mut cdp, "alice", &url);
    let bob = Page::open(&mut cdp, "bob", &url);
    let carol = Page::open(&mut cdp, "carol", &url);

    alice.join(&mut cdp, "alice", "alpha");
    alice.wait(
        &mut cdp,
        "welcomed",
        &Page::has_notice("welcome", "joined #alpha as alice"),
    );
    bob.join(&mut cdp, "bob", "alpha");
    bob.wait(
        &mut cdp,
        "welcomed with alice in the room",
        &Page::has_notice("welcome", "here: alice, bob"),
    );
    carol.join(&mut cdp, "carol", "beta");
    carol.wait(
        &mut cdp,
        "welcomed alone",
        &Page::has_notice("welcome", "#beta as carol; here: carol"),
    );
    alice.wait(
        &mut cdp,
        "told that bob joined",
        &Page::has_notice("join", "bob joined"),
    );

    // Alice types HTML; alpha shows it as text, beta not at all.
    alice.say(&mut cdp, HTML_LINE);
    for page in [&alice, &bob] {
        page.wait(
            &mut cdp,
            "showing alice's line",
            &Page::has_line("alice", HTML_LINE),
        );
        let elements = page.eval(
            &mut cdp,
            "document.querySelectorAll('#log b, #log *:not(li):not(span)').length",
        );
        assert_eq!(elements, json!(0), "{}: user text became markup", page.name);
        let text = page.eval(&mut cdp, "document.getElementById('log').textContent");
        assert!(
            text.as_str().unwrap().contains("<b>hi</b>"),
            "{}: {text}",
            page.name
        );
    }
    assert_eq!(
        alice.eval(&mut cdp, "document.getElementById('text').value"),
        json!("")
    );
    // Carol's own line comes back to her after alice's went out: had alice's reached
    // beta, it would be there by now.
    carol.say(&mut cdp, "anyone in beta?");
    carol.wait(
        &mut cdp,
        "showing her own line",
        &Page::has_line("carol", "anyone in beta?"),
    );
    let carol_log = carol.log(&mut cdp);
    assert!(
        !carol_log
            .iter()
            .any(|l| l.contains("hi</b>") || l.contains("alice")),
        "carol, in beta, saw alpha: {carol_log:#?}"
    );
    bob.say(&mut cdp, "bye");
    alice.wait(
        &mut cdp,
        "showing bob's line",
        &Page::has_line("bob", "bye"),
    );
    let alice_log = alice.log(&mut cdp);
    assert!(
        !alice_log
            .iter()
            .any(|l| l.contains("beta?") || l.contains("carol")),
        "alice, in alpha, saw beta: {alice_log:#?}"
    );

    // Bob's tab closes: alice hears he left (published from the server's on_close).
    cdp.call(
        None,
        "Target.closeTarget",
        json!({"targetId": bob.target_id}),
    );
    alice.wait(
        &mut cdp,
        "told that bob left",
        &Page::has_notice("leave", "bob left"),
    );

    // The server refuses a nickname over 24 characters, and says why.
    carol.join(&mut cdp, &"x".repeat(25), "beta");
    carol.wait(
        &mut cdp,
        "refused",
        &Page::has_notice("error", "a nickname is 1 to 24 characters"),
    );
    carol.wait(
        &mut cdp,
        "closed with 1008",
        "document.getElementById('status').textContent.startsWith('disconnected (1008')",
    );

    // A nickname that would pass for another with a character that prints as nothing.
    carol.join(&mut cdp, "alice\u{200b}", "alpha");
    carol.wait(
        &mut cdp,
        "refused an invisible character",
        &Page::has_notice("error", "control or invisible characters"),
    );

    let dir = artifacts_dir();
    std::fs::create_dir_all(&dir).unwrap();
    cdp.call(Some(&alice.session), "Page.bringToFront", json!({}));
    let shot = cdp.call(
        Some(&alice.session),
        "Page.captureScreenshot",
        json!({"format": "png"}),
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let path = dir.join("chat.png");
    std::fs::write(&path, &png).unwrap();
    // Straight to the stderr descriptor: shown even when the harness captures output.
    let _ = writeln!(
        std::io::stderr(),
        "chat_browser: screenshot of alice's page: {}",
        path.display()
    );

    // A clean exit; the guards kill whatever is left.
    cdp.send(None, "Browser.close", json!({}));
    browser.exit_within(Duration::from_secs(5));
    let _ = writeln!(
        std::io::stderr(),
        "chat_browser: done in {:.1?}",
        started.elapsed()
    );
}
