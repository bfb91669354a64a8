//! `Backend::Auto` falls back to epoll when io_uring is unavailable. The environment
//! switch makes the io_uring probe fail; it is set in this test binary only.

mod support;

use std::time::Duration;

use support::{Owned, TestClient};
use websocket_driver::server::{Handler, Server, ServerConfig, Upgrade, Ws};
use websocket_driver::{Backend, Message};

struct Echo;
impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let _ = ws.send_message(&message);
    }
}

#[test]
fn auto_serves_on_epoll_when_io_uring_is_unavailable() {
    // SAFETY: the only test in this binary, so no other thread reads the environment.
    unsafe { std::env::set_var("WSD_IO_URING", "off") };
    let why = websocket_driver::reactor::io_uring_support().unwrap_err();
    assert!(why.contains("WSD_IO_URING=off"), "{why}");
    assert!(
        matches!(Backend::Auto.resolve(), Ok((Backend::Epoll, ref line)) if line.contains("io_uring unavailable"))
    );

    let config = ServerConfig {
        threads: 1,
        backend: Backend::Auto,
        ..ServerConfig::default()
    };
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .config(config)
        .start(|_| Upgrade::Accept(Echo))
        .unwrap();
    assert_eq!(server.backend(), Backend::Epoll);
    let mut client = TestClient::connect(server.local_addr(), "/").unwrap();
    client.send_text("over epoll").unwrap();
    assert_eq!(
        client.next_message().unwrap(),
        Owned::Text("over epoll".into())
    );

    // Asking for io_uring explicitly is an error, not a silent fallback.
    let explicit = Server::bind("127.0.0.1:0")
        .unwrap()
        .backend(Backend::IoUring)
        .start(|_| Upgrade::Accept(Echo))
        .unwrap_err();
    assert_eq!(explicit.kind(), std::io::ErrorKind::Unsupported);
    drop(client);
    server.shutdown(Duration::from_secs(1)).unwrap();
}
