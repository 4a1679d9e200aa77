//! Adds a hypercall to shoal: number 0x1000 adds two numbers for the
//! built-in `custom` guest. Run it with
//! `cargo run --release --example custom_hypercall` (prints "sum: 42").
use shoal_host::{GuestConfig, Host, builtin};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let host = Host::new()?;
    host.register_hypercall(0x1000, |_caller, [a, b]: [u64; 2]| {
        a.checked_add(b).ok_or("the sum overflows")
    })?;
    let image = builtin::image("custom").ok_or("no custom guest")??;
    let args = ["add", "2", "40"].map(String::from).to_vec();
    let report = host
        .spawn(
            &image,
            GuestConfig {
                args,
                ..Default::default()
            },
        )?
        .wait();
    print!("{}", report.console_text());
    Ok(())
}
