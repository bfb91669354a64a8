//! The library never changes the open-file limit on its own: `ServerConfig::default()`
//! only reads it, and `raise_open_file_limit` is the explicit call that raises it.
//! Alone in its own test binary: it lowers and raises this process's limit.

use rlimit::Resource;
use websocket_driver::ServerConfig;
use websocket_driver::reactor::default_max_connections;

#[test]
fn server_config_default_reads_but_never_raises_the_open_file_limit() {
    let (_, hard) = rlimit::getrlimit(Resource::NOFILE).unwrap();
    // Start below the hard limit (in CI the soft limit is often already at it), so a
    // raise would show.
    let low = 512.min(hard);
    rlimit::setrlimit(Resource::NOFILE, low, hard).unwrap();

    let config = ServerConfig::default();
    let (soft, hard_after) = rlimit::getrlimit(Resource::NOFILE).unwrap();
    assert_eq!(
        (soft, hard_after),
        (low, hard),
        "ServerConfig::default() changed RLIMIT_NOFILE"
    );
    // Its default follows the limit as it is: the soft limit minus the reserve of 64.
    assert_eq!(config.max_connections, low as usize - 64);
    assert_eq!(default_max_connections(), low as usize - 64);

    // The explicit call raises the soft limit to the hard one and says so.
    let raised = websocket_driver::raise_open_file_limit().unwrap();
    let (soft, _) = rlimit::getrlimit(Resource::NOFILE).unwrap();
    assert_eq!(raised, soft);
    assert!(soft >= low);
    if cfg!(target_os = "linux") {
        assert_eq!(soft, hard);
    }
    assert_eq!(ServerConfig::default().max_connections, soft as usize - 64);
}
