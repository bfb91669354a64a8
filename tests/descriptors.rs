//! Every way a connection ends gives its socket's descriptor back, on both backends, and a
//! stopped server gives back its loops' own (listener, epoll instance or rings, wakers).
//! Alone in its own test binary, as one test: it counts this process's open descriptors.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::{Owned, TestClient, eventually, open_descriptors};
use websocket_driver::Backend;
use websocket_driver::Message;
use websocket_driver::server::{Handler, Server, Upgrade, Ws};

struct Echo;
impl Handler for Echo {
    fn on_message(&mut self, ws: &mut Ws<'_>, message: Message<'_>) {
        let _ = ws.send_message(&message);
    }
}

const EACH: usize = 20;

fn every_ending_gives_its_descriptor_back(backend: Backend) {
    let before_server = open_descriptors().len();
    let server = Server::bind("127.0.0.1:0")
        .unwrap()
        .threads(2)
        .backend(backend)
        .start(|_| Upgrade::Accept(Echo))
        .unwrap();
    let addr = server.local_addr();
    // Each loop has built its backend (io_uring: its ring, on its own thread) by the time
    // `start` returns.
    let with_server = open_descriptors().len();
    assert!(with_server > before_server, "{backend}: no listener?");

    for _ in 0..EACH {
        // A close handshake the client starts.
        let mut client = TestClient::connect(addr, "/").unwrap();
        client.send_text("hello").unwrap();
        assert_eq!(client.next_message().unwrap(), Owned::Text("hello".into()));
        client.driver.close_connection(1000, "").unwrap();
        client.flush().unwrap();
        assert!(matches!(
            client.next_message().unwrap(),
            Owned::Close(1000, _)
        ));
        assert!(
            client.wait_eof(),
            "{backend}: no EOF after the close handshake"
        );

        // A close the server starts (1007: text that is not UTF-8), answered.
        let mut client = TestClient::connect(addr, "/").unwrap();
        let frame = [0x81, 0x82, 0, 0, 0, 0, 0xff, 0xfe];
        client.stream.write_all(&frame).unwrap();
        assert!(matches!(
            client.next_message().unwrap(),
            Owned::Close(1007, _)
        ));
        assert!(client.wait_eof(), "{backend}: no EOF after 1007");

        // The same, never answered: the server's linger ends with our FIN.
        let mut client = TestClient::connect(addr, "/").unwrap();
        client.stream.write_all(&frame).unwrap();
        client.stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(
            client.wait_eof(),
            "{backend}: no EOF after an unanswered 1007"
        );

        // Reset while open.
        let client = TestClient::connect(addr, "/").unwrap();
        socket2::SockRef::from(&client.stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(client);

        // A request that is not an upgrade: 426, then the server closes.
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 426"),
            "{backend}: {}",
            String::from_utf8_lossy(&answer)
        );

        // Cut mid-handshake, and reset right after connecting.
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgr")
            .unwrap();
        drop(stream);
        let stream = TcpStream::connect(addr).unwrap();
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(stream);
    }

    assert!(
        eventually(Duration::from_secs(15), || server.stats().connections_open
            == 0),
        "{backend}: connections left open: {:?}",
        server.stats()
    );
    // Seven connections a round: two of them may be cut before the server accepts them.
    let total = server.stats().connections_total;
    assert!(
        (5 * EACH as u64..=7 * EACH as u64).contains(&total),
        "{backend}: {total} connections"
    );
    assert!(
        eventually(Duration::from_secs(15), || open_descriptors().len()
            == with_server),
        "{backend}: {with_server} descriptors with the server idle, now {:#?}",
        open_descriptors()
    );

    // The loops' wakers live as long as something can still send to them: the handle
    // (and every `Sender`) holds them.
    server.shutdown(Duration::from_secs(2)).unwrap();
    drop(server);
    assert!(
        eventually(Duration::from_secs(5), || open_descriptors().len()
            == before_server),
        "{backend}: {before_server} descriptors before the server, after its shutdown \
         {:#?}",
        open_descriptors()
    );
}

#[test]
fn connections_and_loops_give_their_descriptors_back() {
    every_ending_gives_its_descriptor_back(Backend::Epoll);
    every_ending_gives_its_descriptor_back(Backend::IoUring);
}
