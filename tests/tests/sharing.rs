//! Guests of one image map its pages copy-on-write from one template, yet
//! none sees anything another wrote: not in the image's data, the heap,
//! the stack or the SSE registers.

mod common;

use shoal_host::{GuestConfig, GuestEnd};

#[test]
fn guests_of_one_image_never_see_each_others_writes() {
    let host = common::host();
    let residue = common::image("residue");
    let spawn = |mode: &str| {
        host.spawn(
            &residue,
            GuestConfig {
                args: vec![mode.into()],
                ..Default::default()
            },
        )
        .expect("spawns")
    };
    for round in 0..20 {
        // Writers still running or just ended while checkers start.
        let writers: Vec<_> = (0..4).map(|_| spawn("write")).collect();
        let checkers: Vec<_> = (0..4).map(|_| spawn("check")).collect();
        for writer in writers {
            assert_eq!(writer.wait().end, GuestEnd::Exited(0), "round {round}");
        }
        for checker in checkers {
            let report = checker.wait();
            assert_eq!(
                report.end,
                GuestEnd::Exited(0),
                "round {round}: {}",
                report.console_text()
            );
            assert!(report.console_text().starts_with("clean:"));
        }
    }
}
