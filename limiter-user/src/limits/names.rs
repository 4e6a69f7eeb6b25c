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

    /// A change is under way until the returned guard is done, restored (a change that failed
    /// and wrote the config before it back, at another generation) or dropped (then the names
    /// before stay published at the generation before: entries resolved since are read as not
    /// current, never misnamed).
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
    /// The change failed, and the maps hold the policies before it again, written anew at
    /// generation `generation`: the names before are theirs. (Dropped instead, the change
    /// would leave the names at the generation before, and every entry resolved since read as
    /// not current, which enrols none of them until the next change.)
    pub fn restored(self, generation: u32) {
        let names = self
            .names
            .published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone();
        self.done(generation, names);
    }

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
        // A change that failed and wrote the policies before it back: the names before, at
        // the generation they were written at.
        let before: Arc<WireNames> = Arc::new(WireNames::new(&[crate::cluster::GlobalPolicy {
            id: 1,
            matches: "10.0.0.0/8".into(),
            limit: 100,
            window_us: 1_000_000,
            grouping: String::new(),
        }]));
        names.changing().done(5, before.clone());
        names.changing().restored(7);
        assert_eq!(names.read(|g, n| (g, n.name(1))), Some((7, before.name(1))));
    }
}
