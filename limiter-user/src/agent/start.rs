//! Undoing a start that fails: one guard instead of the cleanup repeated on every error path.

use std::path::PathBuf;

use tokio::sync::watch;

use crate::datapath::{self, Attachment};

/// What a start that fails before the main loop must undo, done when the guard is dropped
/// still armed (any early return): stop the API tasks, detach the program (attached but not
/// managed is not an option), and remove the pins a fresh start created before attaching (a
/// start that never enforced anything leaves none behind), putting back those it set aside. The API socket is removed by the
/// agent's `SocketFile`, on a failed start as on any other return.
///
/// Declare it before the loaded object: locals drop in reverse order, so the object releases
/// its maps before their pins are removed.
pub(super) struct StartGuard {
    fresh_pins: Option<PathBuf>,
    attachment: Option<Attachment>,
    stop: Option<watch::Sender<bool>>,
    started: bool,
}

impl StartGuard {
    /// Armed for a start that has bound its listeners.
    pub(super) fn new() -> StartGuard {
        StartGuard {
            fresh_pins: None,
            attachment: None,
            stop: None,
            started: false,
        }
    }

    /// The pins at `dir` were created by this start (none were there to adopt).
    pub(super) fn created_pins(&mut self, dir: PathBuf) {
        self.fresh_pins = Some(dir);
    }

    /// The program is attached: a failure from here detaches it, and leaves the pins. The pins
    /// the load set aside (another layout or size) are removed now.
    pub(super) fn attached(&mut self, attachment: Attachment) {
        self.attachment = Some(attachment);
        if let Some(pins) = self.fresh_pins.take()
            && let Err(e) = datapath::lifecycle::drop_set_aside(&pins)
        {
            tracing::warn!("removing the discarded pins: {}", crate::error_chain(&e));
        }
    }

    /// The API tasks run until `stop` says so.
    pub(super) fn serving(&mut self, stop: watch::Sender<bool>) {
        self.stop = Some(stop);
    }

    /// The start is complete: disarms the guard and hands over what the main loop stops with.
    pub(super) fn started(mut self) -> (Option<Attachment>, Option<watch::Sender<bool>>) {
        self.started = true;
        (self.attachment.take(), self.stop.take())
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if self.started {
            return;
        }
        if let Some(stop) = &self.stop {
            let _ = stop.send(true);
        }
        if let Some(attachment) = self.attachment.take()
            && let Err(e) = attachment.detach()
        {
            tracing::error!("detaching after a failed start: {}", crate::error_chain(&e));
        }
        if let Some(pins) = &self.fresh_pins {
            let _ = datapath::remove_pins(pins);
            // Pins of another layout or size this start would have discarded come back.
            datapath::lifecycle::put_back(pins);
        }
    }
}
