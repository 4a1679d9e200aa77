//! What the `echo` and `http` servers share: their arguments (`[DURATION]
//! [CONNECTIONS]`) and their stack. Included by each (`#[path]`).

use shoal_guest::{boot, println, time};
use shoal_guest_net::Stack;

/// A server's start: when to stop, how many connections to take at once,
/// and its stack.
pub struct Server {
    /// The monotonic time to stop at (`u64::MAX`: never).
    pub deadline: u64,
    /// Connections served at once (listening sockets per port).
    pub connections: usize,
    /// The guest's TCP/IP stack.
    pub stack: Stack,
}

/// Reads the arguments (`connections` by default) and opens the stack.
/// Says what is wrong and gives the exit code otherwise: 2 for bad
/// arguments, 1 for no network device.
pub fn start(name: &str, connections: usize) -> Result<Server, i32> {
    let mut args = boot::args();
    let deadline = match args.next() {
        Some(text) => match time::parse_duration_ns(text) {
            Some(ns) => time::monotonic_ns().saturating_add(ns),
            None => {
                println!("{name}: not a duration: {text}");
                return Err(2);
            }
        },
        None => u64::MAX,
    };
    let connections = match args.next().map(str::parse::<usize>) {
        None => connections,
        Some(Ok(n)) if (1..=64).contains(&n) => n,
        Some(_) => {
            println!("{name}: CONNECTIONS is 1 to 64");
            return Err(2);
        }
    };
    match Stack::open() {
        Ok(stack) => Ok(Server {
            deadline,
            connections,
            stack,
        }),
        Err(e) => {
            println!("{name}: no network device ({e:?}); run with --net NAME");
            Err(1)
        }
    }
}
