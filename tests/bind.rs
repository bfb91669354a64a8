//! Binding an address something already listens on fails with `AddrInUse`, although the
//! server's own listeners share their port through SO_REUSEPORT; a freed address (even
//! with connections left in TIME_WAIT) binds again.

mod support;

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use support::{Owned, TestClient};
use websocket_driver::server::{Handler, Server, ServerHandle, Upgrade, Ws};
use websocket_driver::{Backend, Message};

struct Echo;
impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let _ = ws.send_message(&message);
    }
}

fn start(addr: SocketAddr, backend: Backend) -> ServerHandle {
    Server::bind(addr)
        .unwrap()
        .threads(2)
        .backend(backend)
        .start(|_| Upgrade::Accept(Echo))
        .unwrap()
}

fn echo_once(addr: SocketAddr) {
    let mut client = TestClient::connect(addr, "/").unwrap();
    client.send_text("still me").unwrap();
    assert_eq!(
        client.next_message().unwrap(),
        Owned::Text("still me".into())
    );
    client.driver.close_connection(1000, "").unwrap();
    client.flush().unwrap();
    assert_eq!(
        client.next_message().unwrap(),
        Owned::Close(1000, String::new())
    );
}

#[test]
fn binding_the_address_of_a_running_server_fails_with_addr_in_use() {
    for backend in [Backend::Epoll, Backend::IoUring] {
        let server = start("127.0.0.1:0".parse().unwrap(), backend);
        let addr = server.local_addr();
        let err = Server::bind(addr).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AddrInUse, "{backend}: {err}");
        // Also through the wildcard address.
        let any: SocketAddr = format!("0.0.0.0:{}", addr.port()).parse().unwrap();
        assert_eq!(Server::bind(any).unwrap_err().kind(), ErrorKind::AddrInUse);
        // The running server was not joined: it still answers.
        echo_once(addr);
        server.shutdown(Duration::from_secs(1)).unwrap();
    }
}

#[test]
fn a_bound_but_not_started_server_holds_its_address() {
    let first = Server::bind("127.0.0.1:0").unwrap();
    let addr = first.local_addr().unwrap();
    let err = Server::bind(addr).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AddrInUse, "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[test]
fn a_plain_std_listener_holding_the_port_makes_bind_fail() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let err = Server::bind(addr).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AddrInUse, "{err}");
    // Once it is gone, the address is free.
    drop(listener);
    let server = start(addr, Backend::Epoll);
    echo_once(addr);
    server.shutdown(Duration::from_secs(1)).unwrap();
}

#[test]
fn an_address_freed_by_shutdown_binds_again_with_every_loop() {
    for backend in [Backend::Epoll, Backend::IoUring] {
        let server = start("127.0.0.1:0".parse().unwrap(), backend);
        let addr = server.local_addr();
        // Connections the server closed first leave its side in TIME_WAIT.
        echo_once(addr);
        server.shutdown(Duration::from_secs(1)).unwrap();
        let again = start(addr, backend);
        assert_eq!(again.local_addr(), addr);
        echo_once(addr);
        again.shutdown(Duration::from_secs(1)).unwrap();
    }
}
