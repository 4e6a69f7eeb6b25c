//! The directories the agent creates files in (`--state-dir`, the API socket's directory) must be
//! ones no other user can change: the agent runs privileged, so a directory another user can
//! write lets that user plant a symlink where the agent is about to write (and have it write
//! through the link), swap the snapshot or the policy overlay for files of their own (an overlay
//! is policy: `default: { action: pass }`), or replace the API socket.
//!
//! Rules, checked on the directory after following symlinks, and on each of its ancestors:
//! - the state directory is owned by the agent's effective uid and writable by nobody else
//!   (mode without group/other write): it holds the snapshot (it lists clients) and the overlay;
//! - the socket directory is owned by the agent's uid or by root, and writable by group or others
//!   only with the sticky bit (`/tmp`: others may add entries but not remove or rename the
//!   agent's), since the socket is bound afresh and never opened through a path;
//! - every ancestor is owned by root or by the agent's uid, and writable by group or others only
//!   with the sticky bit (otherwise another user could rename the directory away and put one of
//!   their own in its place).
//!
//! A missing directory is created (the state directory 0700, the socket directory 0755: the CLI
//! lists it to find the only agent's socket) before it is checked.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

/// What the directory is for, which decides its rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    /// `--state-dir`: the snapshot and the policy overlay.
    State,
    /// The API socket's directory.
    Socket,
}

impl DirKind {
    fn name(self) -> &'static str {
        match self {
            DirKind::State => "state directory",
            DirKind::Socket => "API socket directory",
        }
    }

    /// The mode a missing directory is created with.
    fn create_mode(self) -> u32 {
        match self {
            DirKind::State => 0o700,
            DirKind::Socket => 0o755,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrustedDirError {
    #[error("creating the {kind} {path}")]
    Create {
        kind: &'static str,
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("checking the {kind} {path}")]
    Stat {
        kind: &'static str,
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error(
        "the {kind} {path} {problem}; the agent writes files there as a privileged user, so {fix}"
    )]
    Untrusted {
        kind: &'static str,
        path: PathBuf,
        problem: Problem,
        fix: String,
    },
}

/// What is wrong with a directory's owner or mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// Writable by group or others (`mode` is the permission bits, sticky bit included).
    Writable { mode: u32 },
    /// Owned by `owner`, who is neither the agent's uid (`agent`) nor (where allowed) root.
    Owner { owner: u32, agent: u32 },
    /// Not a directory.
    NotDir,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Problem::Writable { mode } => {
                let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
                    (true, true) => "group and others",
                    (true, false) => "its group",
                    _ => "others",
                };
                write!(f, "is writable by {who} (mode {mode:04o})")
            }
            Problem::Owner { owner, agent } => {
                write!(f, "is owned by uid {owner}, not by the agent's uid {agent}")
            }
            Problem::NotDir => write!(f, "is not a directory"),
        }
    }
}

/// The rule one directory on the path must pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Owned by the agent, writable by nobody else.
    Private,
    /// Owned by the agent or root; writable by others only with the sticky bit.
    Shared,
}

/// Judges one directory's owner and mode (`st_uid`, `st_mode`) under `rule` for an agent running
/// as `euid`.
fn judge(owner: u32, mode: u32, rule: Rule, euid: u32) -> Option<Problem> {
    let perm = mode & 0o7777;
    match rule {
        Rule::Private => {
            if owner != euid {
                return Some(Problem::Owner { owner, agent: euid });
            }
            if perm & 0o022 != 0 {
                return Some(Problem::Writable { mode: perm });
            }
        }
        Rule::Shared => {
            if owner != euid && owner != 0 {
                return Some(Problem::Owner { owner, agent: euid });
            }
            let sticky = perm & 0o1000 != 0;
            if perm & 0o022 != 0 && !sticky {
                return Some(Problem::Writable { mode: perm });
            }
        }
    }
    None
}

/// How to fix `problem` on `path`.
fn fix(path: &Path, problem: Problem, kind: DirKind, euid: u32) -> String {
    let flag = match kind {
        DirKind::State => "--state-dir",
        DirKind::Socket => "--api-socket",
    };
    match problem {
        Problem::Writable { .. } => format!(
            "run `chmod go-w {}` (or give {flag} another directory)",
            path.display()
        ),
        Problem::Owner { .. } => format!(
            "run `chown {euid} {}` (or give {flag} a directory the agent's user owns)",
            path.display()
        ),
        Problem::NotDir => format!("give {flag} a directory"),
    }
}

/// Creates `dir` if missing, then checks it and its ancestors (see the module docs).
pub fn prepare(dir: &Path, kind: DirKind) -> Result<(), TrustedDirError> {
    let name = kind.name();
    // Recursive: no error if it exists as a directory (whose mode is left alone).
    fs::DirBuilder::new()
        .recursive(true)
        .mode(kind.create_mode())
        .create(dir)
        .map_err(|error| TrustedDirError::Create {
            kind: name,
            path: dir.to_path_buf(),
            error,
        })?;
    check(dir, kind)
}

/// Checks `dir` (which must exist) and its ancestors (see the module docs).
pub fn check(dir: &Path, kind: DirKind) -> Result<(), TrustedDirError> {
    let name = kind.name();
    let stat_err = |path: &Path| {
        let path = path.to_path_buf();
        move |error| TrustedDirError::Stat {
            kind: name,
            path,
            error,
        }
    };
    // Symlinks along the way are resolved: the rules apply to the directories the agent's files
    // really land in, and to the ones above them.
    let real = fs::canonicalize(dir).map_err(stat_err(dir))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let own_rule = match kind {
        DirKind::State => Rule::Private,
        DirKind::Socket => Rule::Shared,
    };
    for (i, path) in real.ancestors().enumerate() {
        let meta = fs::metadata(path).map_err(stat_err(path))?;
        let problem = if !meta.is_dir() {
            Some(Problem::NotDir)
        } else {
            let rule = if i == 0 { own_rule } else { Rule::Shared };
            judge(meta.uid(), meta.mode(), rule, euid)
        };
        if let Some(problem) = problem {
            // Name the directory as the operator gave it; an ancestor by its own path.
            let shown = if i == 0 { dir } else { path };
            return Err(TrustedDirError::Untrusted {
                kind: name,
                path: shown.to_path_buf(),
                problem,
                fix: fix(shown, problem, kind, euid),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_private_directory_must_be_the_agents_and_not_writable_by_others() {
        assert_eq!(judge(0, 0o40700, Rule::Private, 0), None);
        assert_eq!(judge(0, 0o40755, Rule::Private, 0), None);
        assert_eq!(
            judge(0, 0o40777, Rule::Private, 0),
            Some(Problem::Writable { mode: 0o777 })
        );
        assert_eq!(
            judge(0, 0o40770, Rule::Private, 0),
            Some(Problem::Writable { mode: 0o770 })
        );
        // The sticky bit does not help: others could still add an overlay of their own.
        assert_eq!(
            judge(0, 0o41777, Rule::Private, 0),
            Some(Problem::Writable { mode: 0o1777 })
        );
        // Root's directory is not a capabilities-only agent's, nor another user's root's.
        assert_eq!(
            judge(0, 0o40700, Rule::Private, 65534),
            Some(Problem::Owner {
                owner: 0,
                agent: 65534
            })
        );
        assert_eq!(
            judge(1000, 0o40700, Rule::Private, 0),
            Some(Problem::Owner {
                owner: 1000,
                agent: 0
            })
        );
    }

    #[test]
    fn a_shared_directory_may_be_roots_and_world_writable_only_when_sticky() {
        assert_eq!(judge(0, 0o41777, Rule::Shared, 0), None);
        assert_eq!(judge(0, 0o41777, Rule::Shared, 65534), None);
        assert_eq!(judge(65534, 0o40755, Rule::Shared, 65534), None);
        assert_eq!(
            judge(0, 0o40777, Rule::Shared, 0),
            Some(Problem::Writable { mode: 0o777 })
        );
        assert_eq!(
            judge(1000, 0o40755, Rule::Shared, 0),
            Some(Problem::Owner {
                owner: 1000,
                agent: 0
            })
        );
    }

    #[test]
    fn problems_read_as_a_sentence_with_the_mode() {
        assert_eq!(
            Problem::Writable { mode: 0o777 }.to_string(),
            "is writable by group and others (mode 0777)"
        );
        assert_eq!(
            Problem::Writable { mode: 0o770 }.to_string(),
            "is writable by its group (mode 0770)"
        );
        assert_eq!(
            Problem::Owner {
                owner: 1000,
                agent: 0
            }
            .to_string(),
            "is owned by uid 1000, not by the agent's uid 0"
        );
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "limiter-trusted-dir-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn a_missing_state_directory_is_created_private() {
        let base = scratch("create");
        let dir = base.join("state");
        prepare(&dir, DirKind::State).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
            0o700
        );
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_world_writable_state_directory_is_refused_naming_it_and_its_mode() {
        let base = scratch("writable");
        let dir = base.join("state");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare(&dir, DirKind::State).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.contains(&format!("{} is writable", dir.display())),
            "{shown}"
        );
        assert!(shown.contains("mode 0777"), "{shown}");
        assert!(shown.contains("chmod go-w"), "{shown}");
        // The mode was not "fixed" behind the operator's back.
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
            0o777
        );
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_directory_under_a_world_writable_parent_is_refused() {
        let base = scratch("parent");
        let open = base.join("open");
        let dir = open.join("state");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let e = check(&dir, DirKind::Socket).unwrap_err();
        assert!(
            matches!(&e, TrustedDirError::Untrusted { path, .. } if *path == open),
            "{e}"
        );
        // With the sticky bit (as /tmp), others cannot move the directory away: accepted.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        check(&dir, DirKind::Socket).unwrap();
        fs::remove_dir_all(&base).unwrap();
    }
}
