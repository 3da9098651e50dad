//! Progress on stderr: a bar with bytes and rate when stderr is a terminal, nothing otherwise.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vmpack_formats::pack::Progress;

pub struct Bar(Option<ProgressBar>);

impl Bar {
    /// A bar towards `total` bytes (`None`: unknown total, a spinner with bytes and rate).
    pub fn new(total: Option<u64>, message: &str, quiet: bool) -> Bar {
        if quiet || !std::io::stderr().is_terminal() {
            return Bar(None);
        }
        let pb = match total {
            Some(t) => {
                let pb = ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr());
                pb.set_style(
                    ProgressStyle::with_template(
                        "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                    )
                    .expect("static template")
                    .progress_chars("=> "),
                );
                pb
            }
            None => {
                let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                pb.set_style(
                    ProgressStyle::with_template(
                        "{msg:>10} {spinner} {bytes} {binary_bytes_per_sec}",
                    )
                    .expect("static template"),
                );
                pb
            }
        };
        pb.set_message(message.to_string());
        pb.enable_steady_tick(Duration::from_millis(200));
        Bar(Some(pb))
    }

    pub fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn advance(&self, bytes: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(bytes);
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}
