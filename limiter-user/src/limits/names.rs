//! The names on the wire of the global policies the maps' ids stand for, published for the
//! cluster's enrolment with the maps' generation, and a version that is odd while a change is
//! under way: a reader of client entries takes the names only if the version was the same even
//! number before and after its reads (a seqlock), so it never names an entry resolved under
//! policies it does not have. The policy store writes the trie before it moves the generation
//! on, so an entry resolved in between carries the old generation and a new id: only the
//! version tells such an entry apart. Readers never wait for a change (which can take a second
//! at a million clients); one that overlaps a change reads no names, and tries again.

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicU64, Ordering},
};

use crate::cluster::WireNames;

/// See the module docs.
#[derive(Debug)]
pub struct GlobalNames {
    version: AtomicU64,
    published: RwLock<(u32, Arc<WireNames>)>,
}

impl GlobalNames {
    /// The names in force at maps' generation `generation`.
    pub fn new(generation: u32, names: Arc<WireNames>) -> GlobalNames {
        GlobalNames {
            version: AtomicU64::new(0),
            published: RwLock::new((generation, names)),
        }
    }

    /// A change is under way until the returned guard is done or dropped (then the names before
    /// stay published: a change that failed and wrote the config before it back leaves the
    /// maps at another generation, whose entries are then read as not current, never misnamed).
    pub fn changing(&self) -> Changing<'_> {
        self.version.fetch_add(1, Ordering::AcqRel);
        Changing {
            names: self,
            done: false,
        }
    }

    /// `read(generation, names)` with the names published, if no change overlapped it (`None`:
    /// one did; read again later).
    pub fn read<R>(&self, read: impl FnOnce(u32, &WireNames) -> R) -> Option<R> {
        let before = self.version.load(Ordering::Acquire);
        if before % 2 == 1 {
            return None;
        }
        let (generation, names) = self
            .published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let result = read(generation, &names);
        (self.version.load(Ordering::Acquire) == before).then_some(result)
    }
}

/// A change of the maps' policies under way (see [`GlobalNames::changing`]).
pub struct Changing<'a> {
    names: &'a GlobalNames,
    done: bool,
}

impl Changing<'_> {
    /// The change is in force, at maps' generation `generation`, with `names`.
    pub fn done(mut self, generation: u32, names: Arc<WireNames>) {
        *self
            .names
            .published
            .write()
            .unwrap_or_else(|e| e.into_inner()) = (generation, names);
        self.done = true;
        self.names.version.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.names.version.fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_that_overlaps_a_change_gets_nothing() {
        let names = GlobalNames::new(3, Arc::default());
        assert_eq!(names.read(|generation, _| generation), Some(3));
        let changing = names.changing();
        assert_eq!(names.read(|g, _| g), None, "during the change");
        changing.done(4, Arc::default());
        assert_eq!(names.read(|g, _| g), Some(4));
        // A change that begins while a read is under way spoils it.
        let spoiled = names.read(|g, _| {
            drop(names.changing());
            g
        });
        assert_eq!(spoiled, None);
        assert_eq!(
            names.read(|g, _| g),
            Some(4),
            "a dropped change keeps the names"
        );
    }
}
