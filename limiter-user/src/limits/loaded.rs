//! The policies an agent starts with: the config file's, with the policy overlay merged over it.

use std::path::{Path, PathBuf};

use crate::config::{
    Config,
    overlay::{self, Effective, MergeError, Overlay},
};

/// The policies an agent starts with: the config file's, with the overlay merged over it.
pub struct Loaded {
    pub file_text: String,
    pub file: Config,
    pub overlay_path: PathBuf,
    pub overlay: Overlay,
    /// Why the overlay is not in force, if it is not.
    pub overlay_error: Option<String>,
    pub effective: Effective,
}

impl Loaded {
    /// Merges the overlay at `overlay_path` over the config file's `text`. Only an invalid
    /// config file is an error: an overlay that cannot be used is logged, and the file's
    /// policies are in force.
    pub fn load(text: &str, overlay_path: &Path) -> Result<Loaded, MergeError> {
        let file = Config::parse(text).map_err(MergeError::File)?;
        let (mut overlay, mut overlay_error) = match Overlay::load(overlay_path) {
            Ok(overlay) => (overlay, None),
            Err(e) => (Overlay::default(), Some(crate::error_chain(&e))),
        };
        // Removals of policies the file dropped while the agent was down go, as on a reload.
        let stale = overlay.prune(&file);
        let shared: std::sync::Arc<str> = std::sync::Arc::from(text);
        let effective = match overlay::merge_parsed(shared.clone(), &file, &overlay) {
            Ok(effective) => effective,
            Err(MergeError::Effective(e)) => {
                // The file's policies alone are in force, and API changes are refused until a
                // SIGHUP finds an overlay that fits.
                overlay_error = Some(format!(
                    "the policy overlay {} does not fit over the config file: {}",
                    overlay_path.display(),
                    crate::error_chain(&e)
                ));
                overlay = Overlay::default();
                overlay::merge_parsed(shared, &file, &overlay)?
            }
            Err(e) => return Err(e),
        };
        if overlay_error.is_none() && !stale.is_empty() {
            store_pruned(&overlay, overlay_path);
        }
        if let Some(error) = &overlay_error {
            tracing::error!("{error}; the config file's policies are in force");
        } else if !overlay.is_empty() {
            tracing::info!(
                overlay = %overlay_path.display(),
                set = overlay.policies.len() + usize::from(overlay.default.is_some()),
                removed = overlay.removed.len(),
                "policy changes made through the API merged over the config file"
            );
        }
        Ok(Loaded {
            file_text: text.to_string(),
            file,
            overlay_path: overlay_path.to_path_buf(),
            overlay,
            overlay_error,
            effective,
        })
    }
}

/// Stores an overlay whose stale removals were pruned, best effort: a stale removal left on disk
/// is inert, and pruned again at the next start or reload.
pub(super) fn store_pruned(overlay: &Overlay, path: &Path) {
    if let Err(e) = overlay.store(path) {
        tracing::warn!("{}", crate::error_chain(&e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Match;

    /// A fresh directory for one test's overlay, removed when the test ends.
    fn scratch(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("limiter-limits-{name}-"))
            .tempdir()
            .unwrap()
    }

    const FILE: &str = "default: { limit: 10, window: 1s }\npolicies:\n  - { match: 10.0.0.0/8, limit: 1, window: 1s }\n";

    #[test]
    fn an_invalid_file_at_start_is_reported_once_by_its_own_message() {
        let dir = scratch("invalid");
        let e = Loaded::load(
            "default: { limit: -1 }\n",
            &dir.path().join("lo.overlay.yaml"),
        )
        .err()
        .unwrap();
        let shown = crate::error_chain(&e);
        let problem = Config::parse("default: { limit: -1 }\n")
            .unwrap_err()
            .to_string();
        assert_eq!(shown, format!("the config file is invalid: {problem}"));
    }

    #[test]
    fn a_corrupt_overlay_at_start_leaves_the_file_in_force_and_names_why() {
        let dir = scratch("corrupt");
        let path = dir.path().join("lo.overlay.yaml");
        std::fs::write(&path, "version: [\n").unwrap();
        let loaded = Loaded::load(FILE, &path).unwrap();
        assert_eq!(loaded.effective.config, config(FILE));
        assert!(loaded.overlay.is_empty());
        let error = loaded.overlay_error.unwrap();
        assert!(error.contains("is corrupt"), "{error}");
        // Nothing was written over it.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "version: [\n");
    }

    #[test]
    fn removals_of_policies_the_file_dropped_are_pruned_at_start() {
        let dir = scratch("prune");
        let path = dir.path().join("lo.overlay.yaml");
        let m: Match = "10.0.0.0/8".parse().unwrap();
        let mut overlay = Overlay::default();
        overlay.remove_policy(&m, &config(FILE)).unwrap();
        overlay.store(&path).unwrap();
        // While the agent was down, the file dropped the policy the API had removed.
        let file = "default: { limit: 10, window: 1s }\n";
        let loaded = Loaded::load(file, &path).unwrap();
        assert!(loaded.overlay.removed.is_empty());
        assert!(Overlay::load(&path).unwrap().removed.is_empty(), "stored");
        // So the policy, written back into the file later, is in force again.
        let again = Loaded::load(FILE, &path).unwrap();
        assert_eq!(again.effective.config, config(FILE));
    }

    fn config(yaml: &str) -> Config {
        Config::parse(yaml).expect("valid config")
    }
}
