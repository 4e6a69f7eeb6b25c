//! The one way userspace writes a client entry without racing the packets counting in it: a
//! never-attached XDP program (`limiter_check`, `limiter_adapt`) run with BPF_PROG_TEST_RUN
//! (Linux 4.12, commit 1cf1cae963c2) on a frame of fixed-size slots, which the program reads,
//! acts on with the fast path's own atomics, and answers in place.
//!
//! [`TestRunFrame`] is that runner, generic over the slot layout: API checks
//! ([`crate::check`]), adaptive writes ([`crate::adaptive::tuner`]) and the in-place policy
//! refresh ([`super::Tables::refresh_all`]) all go through it. [`EntryReads`] runs the adapt
//! program's read frames over many keys, for the adaptive loop and the cluster's enrolment.

use std::{io, mem::size_of, os::fd::BorrowedFd};

use aya::Pod;
use limiter_common::{
    AdaptRead,
    addr::ClientKey,
    maps::{
        ADAPT_BATCH, ADAPT_ETHERTYPE, ADAPT_KIND_READ, ADAPT_KIND_WRITE, ADAPT_OFFSET,
        ADAPT_READ_BATCH, ADAPT_READ_LEN, ADAPT_SLOT_LEN, CHECK_BATCH, CHECK_ETHERTYPE,
        CHECK_REQUEST_OFFSET, CHECK_SLOT_LEN, CHECK_VETO_OFFSET,
    },
};

use super::syscall;

/// The XDP entry point that applies adapt frames (never attached).
pub const ADAPT_PROGRAM: &str = "limiter_adapt";
/// The XDP entry point that decides checks (never attached).
pub const CHECK_PROGRAM: &str = "limiter_check";
/// `XDP_PASS` (include/uapi/linux/bpf.h, `enum xdp_action`): what the test-run programs return
/// for a frame they processed.
pub const XDP_PASS: u32 = 2;

/// The layout of one kind of test-run frame: an Ethernet header with a private ethertype, a
/// 16-bit kind (for programs that take more than one; written before every run, as the check
/// program uses its first byte as the frame's veto), then up to `batch` slots of `slot_len`
/// bytes from `offset`.
#[derive(Debug, Clone, Copy)]
pub struct FrameLayout {
    pub ethertype: u16,
    pub kind: u16,
    pub offset: usize,
    pub slot_len: usize,
    pub batch: usize,
}

/// `limiter_adapt`'s frames (`AdaptSlot`s, answered in each slot's `result`).
pub const ADAPT_FRAME: FrameLayout = FrameLayout {
    ethertype: ADAPT_ETHERTYPE,
    kind: ADAPT_KIND_WRITE,
    offset: ADAPT_OFFSET,
    slot_len: ADAPT_SLOT_LEN,
    batch: ADAPT_BATCH,
};

/// `limiter_adapt`'s read frames (`AdaptRead`s, each filled with a copy of its entry).
pub const ADAPT_READ_FRAME: FrameLayout = FrameLayout {
    ethertype: ADAPT_ETHERTYPE,
    kind: ADAPT_KIND_READ,
    offset: ADAPT_OFFSET,
    slot_len: ADAPT_READ_LEN,
    batch: ADAPT_READ_BATCH,
};

/// Where a frame's kind is, after the Ethernet header.
const KIND_OFFSET: usize = 14;

/// Why [`EntryReads::read`] read nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    #[error("running {ADAPT_PROGRAM} with BPF_PROG_TEST_RUN")]
    Run(#[from] io::Error),
    #[error("{ADAPT_PROGRAM} rejected a read frame (returned {0})")]
    Rejected(u32),
}

/// Read frames of the adapt program: copies of many clients' entries, [`ADAPT_READ_BATCH`] a
/// program run, instead of a lookup syscall per client and map (the program looks in every map
/// an entry may live in).
pub struct EntryReads {
    frame: TestRunFrame,
}

impl Default for EntryReads {
    fn default() -> Self {
        EntryReads {
            frame: TestRunFrame::new(ADAPT_READ_FRAME),
        }
    }
}

impl EntryReads {
    /// Program runs a read of `keys` takes.
    pub fn runs(&self, keys: usize) -> usize {
        keys.div_ceil(self.frame.batch())
    }

    /// Runs `program` (the adapt program) on read frames of `keys`; returns one answer per key,
    /// in order: its `result` says whether the key's entry was found and copied
    /// (`ADAPT_APPLIED`, with `state` and `home`), not resident (`ADAPT_NOT_RESIDENT`), or not
    /// reached (0); its `key` is the one asked, unless the frame came back broken.
    pub fn read(
        &mut self,
        program: BorrowedFd<'_>,
        keys: &[ClientKey],
    ) -> Result<Vec<AdaptRead>, ReadFrameError> {
        let mut out = Vec::with_capacity(keys.len());
        let mut requests = Vec::with_capacity(self.frame.batch());
        let mut answers = Vec::with_capacity(self.frame.batch());
        for chunk in keys.chunks(self.frame.batch()) {
            requests.clear();
            requests.extend(chunk.iter().map(|&key| AdaptRead {
                key,
                ..AdaptRead::default()
            }));
            let ret =
                self.frame
                    .run_into::<AdaptRead, AdaptRead>(program, &requests, 0, &mut answers)?;
            if ret != XDP_PASS {
                return Err(ReadFrameError::Rejected(ret));
            }
            // One answer per slot (`run_into`): `out` keeps `keys`' order.
            out.extend_from_slice(&answers);
        }
        Ok(out)
    }
}

/// The check frame's kind is its veto byte (`CHECK_VETO_OFFSET`), clear when a run starts.
const _: () = assert!(CHECK_FRAME.kind == 0 && CHECK_VETO_OFFSET == KIND_OFFSET);

/// `limiter_check`'s frames (a `CheckRequest` then its `CheckReply` per slot).
pub const CHECK_FRAME: FrameLayout = FrameLayout {
    ethertype: CHECK_ETHERTYPE,
    kind: 0,
    offset: CHECK_REQUEST_OFFSET,
    slot_len: CHECK_SLOT_LEN,
    batch: CHECK_BATCH,
};

/// A program and a frame buffer reused across its runs.
pub struct TestRunFrame {
    layout: FrameLayout,
    frame: Vec<u8>,
}

/// What one run left: the program's return value and each slot's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult<Out> {
    pub ret: u32,
    pub answers: Vec<Out>,
}

impl TestRunFrame {
    pub fn new(layout: FrameLayout) -> TestRunFrame {
        let mut frame = vec![0u8; layout.offset + layout.batch * layout.slot_len];
        frame[12..14].copy_from_slice(&layout.ethertype.to_be_bytes());
        frame[KIND_OFFSET..KIND_OFFSET + 2].copy_from_slice(&layout.kind.to_ne_bytes());
        TestRunFrame { layout, frame }
    }

    /// Most slots one run carries.
    pub fn batch(&self) -> usize {
        self.layout.batch
    }

    /// Runs `program` once on `requests` (at most [`TestRunFrame::batch`]; more is an error),
    /// each written at the start of its slot, and reads each slot's answer, an `Out` at
    /// `answer_at` bytes into the slot, after the run.
    pub fn run<In: Pod, Out: Pod>(
        &mut self,
        program: BorrowedFd<'_>,
        requests: &[In],
        answer_at: usize,
    ) -> io::Result<RunResult<Out>> {
        let mut answers = Vec::with_capacity(requests.len());
        let ret = self.run_into(program, requests, answer_at, &mut answers)?;
        Ok(RunResult { ret, answers })
    }

    /// [`TestRunFrame::run`] with the answers put in `answers` (cleared first, then one per
    /// request, in order) and the
    /// program's return value returned: a caller running frame after frame (an API check
    /// batch) reuses one buffer instead of allocating per run.
    pub fn run_into<In: Pod, Out: Pod>(
        &mut self,
        program: BorrowedFd<'_>,
        requests: &[In],
        answer_at: usize,
        answers: &mut Vec<Out>,
    ) -> io::Result<u32> {
        let FrameLayout {
            offset,
            slot_len,
            batch,
            ..
        } = self.layout;
        if requests.len() > batch
            || size_of::<In>() > slot_len
            || answer_at + size_of::<Out>() > slot_len
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} requests of {} bytes answered at {answer_at} by {} bytes do not fit a \
                     frame of {batch} slots of {slot_len} bytes",
                    requests.len(),
                    size_of::<In>(),
                    size_of::<Out>()
                ),
            ));
        }
        for (i, request) in requests.iter().enumerate() {
            // A slot starts zeroed, so an answer the program did not write reads as none (the
            // frame is reused: it would otherwise hold the answer of an earlier run).
            self.frame[offset + i * slot_len..offset + (i + 1) * slot_len].fill(0);
            // SAFETY: `In` is `Pod` (plain bytes, any alignment via `write_unaligned`), and the
            // check above keeps slot `i` (< batch) of `slot_len >= size_of::<In>()` bytes inside
            // the buffer of `offset + batch * slot_len` bytes.
            unsafe {
                self.frame
                    .as_mut_ptr()
                    .add(offset + i * slot_len)
                    .cast::<In>()
                    .write_unaligned(*request);
            }
        }
        // The header too: a program may write the frame's spare bytes (the check program's veto,
        // `CHECK_VETO_OFFSET`).
        self.frame[KIND_OFFSET..KIND_OFFSET + 2].copy_from_slice(&self.layout.kind.to_ne_bytes());
        let len = offset + requests.len() * slot_len;
        let ret = syscall::prog_test_run(program, &mut self.frame[..len])?;
        answers.clear();
        answers.extend((0..requests.len()).map(|i| {
            // SAFETY: as above, with `answer_at + size_of::<Out>() <= slot_len`; every bit
            // pattern is a valid `Out` (`Pod`), and the program wrote each answer in place.
            unsafe {
                self.frame
                    .as_ptr()
                    .add(offset + i * slot_len + answer_at)
                    .cast::<Out>()
                    .read_unaligned()
            }
        }));
        Ok(ret)
    }
}
