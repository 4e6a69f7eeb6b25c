//! The XDP program's lifecycle: checking the environment, loading the object (adopting or
//! discarding pinned maps), attaching (by a pinned bpf_link, or by netlink where links are not
//! supported) and detaching, and loading the never-attached test-run programs.

use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapError, MapInfo, RingBuf},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use limiter_common::maps::LAYOUT_VERSION;

use super::{
    DEFAULT_MAX_CLIENTS, DEFAULT_MAX_GLOBAL_CLIENTS, DEFAULT_MAX_IDS, DEFAULT_MAX_LIMITED,
    DatapathError, PIN_ROOT, PINNED, PROGRAM, map_err, tables::dup_fd,
};

/// `/sys/fs/bpf/limiter/IFACE`.
pub fn pin_dir(iface: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(iface)
}

/// Fails with a message naming the fix when the process cannot use BPF at all: a capability
/// the agent needs is missing ([`super::privileges`]; root or not does not matter), or bpffs is
/// not mounted.
pub fn check_environment() -> Result<(), DatapathError> {
    let effective = super::privileges::effective().map_err(DatapathError::Capabilities)?;
    let missing = super::privileges::missing(&super::privileges::AGENT, &effective);
    if !missing.is_empty() {
        return Err(DatapathError::MissingCapabilities(
            super::privileges::Missing(missing),
        ));
    }
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|source| DatapathError::Io {
        what: "reading",
        path: "/proc/mounts".into(),
        error: source,
    })?;
    if !mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.nth(1) == Some("/sys/fs/bpf") && f.next() == Some("bpf")
    }) {
        return Err(DatapathError::BpffsNotMounted);
    }
    Ok(())
}

/// Whether this process may create and remove entries in `dir` (by its effective ids and
/// capabilities, as the kernel will judge the pin and unlink calls).
fn writable(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a valid NUL-terminated string; faccessat only reads it.
    unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        ) == 0
    }
}

/// The interface's index, or a clear error.
pub fn if_index(iface: &str) -> Result<u32, DatapathError> {
    let name =
        std::ffi::CString::new(iface).map_err(|_| DatapathError::NoInterface(iface.into()))?;
    // SAFETY: `name` is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(DatapathError::NoInterface(iface.into())),
        i => Ok(i),
    }
}

/// How to load the object.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Pin (or adopt pinned) maps here; `None` loads private maps (tests, benchmarks).
    pub pin_dir: Option<PathBuf>,
    /// Capacity of the dynamic-client LRU map.
    pub max_clients: u32,
    /// Capacity of the LRU map of API IDs that are not addresses.
    pub max_ids: u32,
    /// Capacity of `LIMITED`, the never-evicted map of clients over their limit.
    pub max_limited: u32,
    /// Capacity of `GRANTS`, the cluster owners' grants for global clients.
    pub max_global_clients: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            pin_dir: None,
            max_clients: DEFAULT_MAX_CLIENTS,
            max_ids: DEFAULT_MAX_IDS,
            max_limited: DEFAULT_MAX_LIMITED,
            max_global_clients: DEFAULT_MAX_GLOBAL_CLIENTS,
        }
    }
}

/// Loads the embedded object ([`super::ebpf::OBJECT`]); see [`load_object`].
pub fn load(opts: &LoadOptions) -> Result<Ebpf, DatapathError> {
    load_object(super::ebpf::OBJECT, opts)
}

/// Whether [`load`] with `opts` will adopt pinned maps (it discards pins of another layout or
/// size, with a warning): asked before the load, and changing nothing. An empty or missing pin
/// directory adopts nothing.
pub fn adoptable_pins(opts: &LoadOptions) -> bool {
    let Some(dir) = &opts.pin_dir else {
        return false;
    };
    let layout = pinned_layout(dir);
    any_pinned(dir) && adopts_layout(layout) && mismatched_pin(dir, opts, layout).is_none()
}

fn any_pinned(dir: &Path) -> bool {
    PINNED.iter().any(|(name, ..)| dir.join(name).exists())
}

/// Whether pins stamped `layout` are adopted: this binary's layout, or one it migrates from
/// (4, 5 and 6; see `discard_incompatible_pins`). Unstamped or older pins are discarded.
fn adopts_layout(layout: Option<u32>) -> bool {
    matches!(layout, Some(v) if v == LAYOUT_VERSION || (4..=6).contains(&v))
}

/// Loads an object built from limiter-ebpf. With a pin directory, maps already pinned there with
/// the same layout are adopted (counters survive an agent restart); pins of another layout or
/// size are set aside first, with a warning (see [`put_back`]).
pub fn load_object(object: &[u8], opts: &LoadOptions) -> Result<Ebpf, DatapathError> {
    let mut loader = EbpfLoader::new();
    let mut found = Found::default();
    loader.map_max_entries("CLIENTS", opts.max_clients);
    loader.map_max_entries("NAMED", opts.max_ids);
    loader.map_max_entries("LIMITED", opts.max_limited);
    loader.map_max_entries("GRANTS", opts.max_global_clients);
    if let Some(dir) = &opts.pin_dir {
        let aside = set_aside_dir(dir);
        if aside.exists() {
            // Left by a start killed before it attached: what it held is lost, as before pins
            // were set aside (the snapshot still restores clients).
            tracing::warn!(dir = %aside.display(), "removing pins a killed start set aside");
            remove_pins(&aside)?;
        }
        // Discarding may remove the directory itself: create it afterwards.
        found = discard_incompatible_pins(dir, opts)?;
        if let Err(e) = create_pin_dir(dir) {
            if found.set_aside {
                put_back(dir);
            }
            return Err(e);
        }
        for (name, ..) in PINNED {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    super::kernel_log::set_level(&mut loader);
    let loaded = loader
        .load(object)
        .map_err(DatapathError::from)
        .and_then(|mut ebpf| {
            super::kernel_log::forward(&mut ebpf);
            // Pins of an older layout keep their stamp until the agent has swapped its program
            // in and cleaned them up (`complete_upgrade`): until the swap the old program still
            // runs on them, and a start that fails before it must find them still marked old.
            if found.layout.is_none_or(|v| v == LAYOUT_VERSION) {
                layout_map(ebpf.map_mut("LAYOUT"))?
                    .set(0, LAYOUT_VERSION, 0)
                    .map_err(map_err("LAYOUT"))?;
            }
            Ok(ebpf)
        });
    if loaded.is_err()
        && found.set_aside
        && let Some(dir) = &opts.pin_dir
    {
        // The maps this load created are released with it: their pins go, and the set-aside
        // ones come back.
        if let Err(e) = remove_pins(dir) {
            tracing::error!(
                "removing the pins of a failed load: {}",
                crate::error_chain(&e)
            );
        }
        put_back(dir);
    }
    loaded
}

/// The object's `LAYOUT` map (`ebpf.map_mut("LAYOUT")`).
fn layout_map(map: Option<&mut Map>) -> Result<Array<&mut MapData, u32>, DatapathError> {
    let map = map.ok_or(DatapathError::Map {
        name: "LAYOUT",
        error: MapError::InvalidName {
            name: "LAYOUT".into(),
        },
    })?;
    Array::try_from(map).map_err(map_err("LAYOUT"))
}

/// The layout version stamped in an interface's pins, if any.
fn pinned_layout(dir: &Path) -> Option<u32> {
    let data = MapData::from_pin(dir.join("LAYOUT")).ok()?;
    let layout: Array<MapData, u32> = Array::try_from(Map::from_map_data(data).ok()?).ok()?;
    layout.get(&0, 0).ok()
}

fn create_pin_dir(dir: &Path) -> Result<(), DatapathError> {
    std::fs::create_dir_all(dir).map_err(|source| match source.kind() {
        io::ErrorKind::PermissionDenied => DatapathError::PinDirDenied {
            dir: dir.to_path_buf(),
        },
        _ => DatapathError::Io {
            what: "creating the pin directory",
            path: dir.to_path_buf(),
            error: source,
        },
    })?;
    if !writable(dir) {
        return Err(DatapathError::PinDirDenied {
            dir: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Where the pins in `dir` that a start cannot adopt wait until it has attached (`discarded`
/// inside it: the agent may write there, where it may not beside it, and bpffs refuses names
/// with a dot): a start that fails before attaching puts them back ([`put_back`]), so a crashed
/// agent's state outlives a restart with the wrong sizes that then fails; one that attaches
/// removes them ([`drop_set_aside`]).
fn set_aside_dir(dir: &Path) -> PathBuf {
    dir.join("discarded")
}

/// The pinned maps, `LAYOUT` first: a set-aside moves the stamp first and a put-back moves it
/// last, so that a directory left half-way by a kill is never stamped (and is never adopted).
fn layout_first() -> impl DoubleEndedIterator<Item = &'static str> {
    let names = PINNED.iter().map(|(name, ..)| *name);
    std::iter::once("LAYOUT").chain(names.filter(|n| *n != "LAYOUT"))
}

/// Moves the pins of `dir` to [`set_aside_dir`] (the maps live on while a program uses them).
fn set_aside(dir: &Path) -> Result<(), DatapathError> {
    let aside = set_aside_dir(dir);
    create_pin_dir(&aside)?;
    for name in layout_first() {
        let (from, to) = (dir.join(name), aside.join(name));
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                put_back(dir);
                return Err(DatapathError::Io {
                    what: "setting aside pin",
                    path: from,
                    error: source,
                });
            }
        }
    }
    Ok(())
}

/// Puts the pins [`set_aside`] moved back into `dir`, all of them or none: if any map is pinned
/// in `dir` (a failed start could not remove its own), they stay set aside, to be removed by the
/// next load, and the error says so.
pub fn put_back(dir: &Path) {
    let aside = set_aside_dir(dir);
    if !aside.exists() {
        return;
    }
    if let Some(name) = PINNED
        .iter()
        .map(|(name, ..)| *name)
        .find(|n| dir.join(n).exists())
    {
        tracing::error!(
            "the pinned maps set aside in {} stay there (the next start removes them): {} is \
             pinned in {} again",
            aside.display(),
            name,
            dir.display()
        );
        return;
    }
    for name in layout_first().rev() {
        let (from, to) = (aside.join(name), dir.join(name));
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(
                    "putting back the pin {} after a failed start: {e}; the maps set aside \
                     stay in {} (the next start removes them)",
                    from.display(),
                    aside.display()
                );
                return;
            }
        }
    }
    let _ = std::fs::remove_dir(&aside);
    tracing::info!(
        dir = %dir.display(),
        "the start failed: the pinned maps it would have discarded are back in place"
    );
}

/// Removes the pins [`set_aside`] moved, once the start that set them aside has attached.
pub fn drop_set_aside(dir: &Path) -> Result<(), DatapathError> {
    remove_pins(&set_aside_dir(dir))
}

/// What [`discard_incompatible_pins`] found: the layout of the pins the load will adopt, and
/// whether it set pins aside.
#[derive(Debug, Default, Clone, Copy)]
struct Found {
    layout: Option<u32>,
    set_aside: bool,
}

impl Found {
    /// The pins were set aside: fresh maps.
    const SET_ASIDE: Found = Found {
        layout: None,
        set_aside: true,
    };
}

/// Sets aside pins this binary cannot adopt.
fn discard_incompatible_pins(dir: &Path, opts: &LoadOptions) -> Result<Found, DatapathError> {
    if !any_pinned(dir) {
        return Ok(Found::default());
    }
    let layout = pinned_layout(dir);
    if !adopts_layout(layout) {
        // Layouts before 4 have no migration: start fresh (the snapshot restores clients).
        let found = layout.map_or("no version stamp".to_string(), |v| format!("layout v{v}"));
        tracing::warn!(
            dir = %dir.display(),
            "pinned maps have {found}, this binary uses layout v{LAYOUT_VERSION} and has no migration from it: starting with fresh maps"
        );
        set_aside(dir)?;
        return Ok(Found::SET_ASIDE);
    }
    match layout {
        Some(6) => {
            // Layout 7 added `GRANTS` and `HOT` (created and pinned by the load) and the
            // `CONFIG_CLUSTER` flag, which layout 6 never set; every other map is the same.
            tracing::info!(
                dir = %dir.display(),
                "pinned maps have layout v6: adopting them as v{LAYOUT_VERSION} (clients keep their state)"
            );
        }
        Some(5) => {
            // Layout 6 gave meaning to two padding fields (`Policy::group`, `MapConfig::
            // fast_group`), zero in layout 5, which means per address; the agent rewrites both
            // when it applies its config. Keys in ff00::/8, multicast sources then, read as
            // groups now: `complete_upgrade` drops them once the program is swapped in.
            tracing::info!(
                dir = %dir.display(),
                "pinned maps have layout v5: adopting them as v{LAYOUT_VERSION} (clients keep their state)"
            );
        }
        Some(4) => {
            // Layout 5 added `LIMITED` (created and pinned by the load) and two counters to
            // `STATS`; every other map is the same. Adopt them, so clients keep their windows
            // and counters; only the global counters start again.
            tracing::info!(
                dir = %dir.display(),
                "pinned maps have layout v4: adopting them as v{LAYOUT_VERSION} (clients keep their state; the global counters start from zero)"
            );
            let stats = dir.join("STATS");
            match std::fs::remove_file(&stats) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(DatapathError::Io {
                        what: "removing pin",
                        path: stats,
                        error: source,
                    });
                }
            }
        }
        // This binary's layout: nothing to migrate.
        _ => {}
    }
    if let Some(name) = mismatched_pin(dir, opts, layout) {
        tracing::warn!(
            dir = %dir.display(),
            map = name,
            "pinned maps have another layout or size; discarding them and starting with fresh counters"
        );
        set_aside(dir)?;
        return Ok(Found::SET_ASIDE);
    }
    Ok(Found {
        layout,
        set_aside: false,
    })
}

/// The first pinned map whose type, key, value or size differs from what this binary loads with
/// `opts` (such pins cannot be adopted). Layout 4's `STATS` is not compared: the load removes it
/// (two counters were added since).
fn mismatched_pin(dir: &Path, opts: &LoadOptions, layout: Option<u32>) -> Option<&'static str> {
    for (name, kind, key, value) in PINNED {
        let path = dir.join(name);
        if !path.exists() || (layout == Some(4) && name == "STATS") {
            continue;
        }
        let ok = MapInfo::from_pin(&path).is_ok_and(|info| {
            info.map_type().is_ok_and(|t| t == kind)
                && info.key_size() as usize == key
                && info.value_size() as usize == value
                && (name != "CLIENTS" || info.max_entries() == opts.max_clients)
                && (name != "NAMED" || info.max_entries() == opts.max_ids)
                && (name != "LIMITED" || info.max_entries() == opts.max_limited)
                && (name != "GRANTS" || info.max_entries() == opts.max_global_clients)
        });
        if !ok {
            return Some(name);
        }
    }
    None
}

/// Removes the pinned maps of one interface (the maps live on while a program uses them).
pub fn remove_pins(dir: &Path) -> Result<(), DatapathError> {
    for name in PINNED.iter().map(|(name, ..)| *name) {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DatapathError::Io {
                    what: "removing pin",
                    path,
                    error: source,
                });
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// `--xdp-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AttachMode {
    /// Native if the driver supports it, generic otherwise (the kernel decides).
    #[default]
    Auto,
    /// Native (driver) XDP only.
    Native,
    /// Generic (skb) XDP: works on any interface, slower.
    Skb,
}

impl AttachMode {
    fn name(self) -> &'static str {
        match self {
            AttachMode::Auto => "auto",
            AttachMode::Native => "native",
            AttachMode::Skb => "skb",
        }
    }
}

/// Name of the pinned XDP link beside the maps: while it is pinned the program stays attached,
/// so enforcement continues when the agent dies.
pub const LINK_PIN: &str = "link";

/// The attached program. Dropping it changes nothing in the kernel: a pinned link keeps the
/// program attached; [`Attachment::detach`] removes it.
pub struct Attachment {
    link_pin: PathBuf,
    pinned: bool,
}

impl Attachment {
    /// Whether the link is pinned (enforcement survives the agent).
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// Detaches the program now (whoever else holds the link) and removes the link pin; a link
    /// pin already removed by someone else counts as detached.
    pub fn detach(self) -> Result<(), DatapathError> {
        if !self.pinned {
            return Ok(());
        }
        let io = |what, source| DatapathError::Io {
            what,
            path: self.link_pin.clone(),
            error: source,
        };
        let fd = match super::syscall::obj_get(&self.link_pin) {
            Ok(fd) => fd,
            // Someone (`limiter detach`) already removed it: nothing left to detach.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("opening the pinned XDP link", e)),
        };
        super::syscall::link_detach(fd.as_fd()).map_err(|e| io("detaching the XDP link", e))?;
        std::fs::remove_file(&self.link_pin).map_err(|e| io("removing the XDP link pin", e))?;
        Ok(())
    }
}

/// Loads the `limiter` program into the kernel and attaches it to `iface` through a pinned link
/// at `pins/link`. If a link pinned by an earlier agent is there, the new program replaces the
/// old one in it atomically (no packet sees no program); otherwise a new link is created and
/// pinned. Without `pins` the link is not pinned.
pub fn attach(
    ebpf: &mut Ebpf,
    iface: &str,
    mode: AttachMode,
    pins: Option<&Path>,
    replace_foreign: bool,
) -> Result<Attachment, DatapathError> {
    let index = if_index(iface)?;
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM)
        .ok_or(ProgramError::NotLoaded)?
        .try_into()?;
    load_once(program)?;
    let link_pin = pins.map(|d| d.join(LINK_PIN)).unwrap_or_default();
    if pins.is_some() && link_pin.exists() {
        match adopt_link(program, &link_pin) {
            Ok(()) => {
                tracing::info!(link = %link_pin.display(), "replaced the program in the pinned XDP link");
                return Ok(Attachment {
                    link_pin,
                    pinned: true,
                });
            }
            Err(e) => {
                tracing::warn!(link = %link_pin.display(), "pinned XDP link unusable ({e}); attaching afresh");
                let _ = std::fs::remove_file(&link_pin);
            }
        }
    }
    let flags = match mode {
        AttachMode::Auto => XdpMode::Default,
        AttachMode::Native => XdpMode::Driver,
        AttachMode::Skb => XdpMode::Skb,
    };
    let id = match program
        .attach(iface, flags)
        .map_err(|e| classify_attach_error(e, iface, mode))
    {
        Err(DatapathError::Busy { .. }) if replace_foreign => {
            tracing::warn!(
                iface,
                "--replace: detaching the XDP program already attached"
            );
            super::netlink::detach_xdp(index).map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => DatapathError::ForeignLink {
                    iface: iface.into(),
                },
                _ => DatapathError::Io {
                    what: "detaching the other XDP program from",
                    path: iface.into(),
                    error: e,
                },
            })?;
            program
                .attach(iface, flags)
                .map_err(|e| classify_attach_error(e, iface, mode))?
        }
        other => other?,
    };
    if pins.is_none() {
        return Ok(Attachment {
            link_pin,
            pinned: false,
        });
    }
    let link = program.take_link(id)?;
    match FdLink::try_from(link) {
        Ok(fd_link) => {
            // The pin holds the link; the handle pin() returns may go.
            let _pinned = fd_link.pin(&link_pin).map_err(|e| DatapathError::Io {
                what: "pinning the XDP link",
                path: link_pin.clone(),
                error: io::Error::other(e),
            })?;
            Ok(Attachment {
                link_pin,
                pinned: true,
            })
        }
        Err(_) => {
            // Netlink attachment (kernels without XDP bpf_link): works, but ends with the agent.
            tracing::warn!(
                "XDP attached through netlink, not a bpf link: enforcement stops if the agent dies"
            );
            Ok(Attachment {
                link_pin,
                pinned: false,
            })
        }
    }
}

fn adopt_link(program: &mut Xdp, link_pin: &Path) -> Result<(), DatapathError> {
    let io_err = |e: String| DatapathError::Io {
        what: "opening the pinned XDP link",
        path: link_pin.to_path_buf(),
        error: io::Error::other(e),
    };
    let pinned = PinnedLink::from_pin(link_pin).map_err(|e| io_err(e.to_string()))?;
    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| io_err(e.to_string()))?;
    // The program keeps this handle; the pin keeps the link after the agent is gone.
    program.attach_to_link(link)?;
    Ok(())
}

/// `limiter detach`: detaches the program pinned for `iface` (even while an agent holds it) and
/// removes the link and map pins. Returns whether anything was there.
pub fn detach_pinned(iface: &str) -> Result<bool, DatapathError> {
    let dir = pin_dir(iface);
    let link_pin = dir.join(LINK_PIN);
    let mut found = false;
    if link_pin.exists() {
        found = true;
        Attachment {
            link_pin,
            pinned: true,
        }
        .detach()?;
    }
    let aside = set_aside_dir(&dir);
    if aside.exists() {
        found = true;
        remove_pins(&aside)?;
    }
    if dir.exists() {
        found = true;
        remove_pins(&dir)?;
    }
    Ok(found)
}

fn classify_attach_error(e: ProgramError, iface: &str, mode: AttachMode) -> DatapathError {
    let text = format!("{e:?}");
    let errno = |code: i32| {
        text.contains(&format!("code: {code},")) || text.contains(&format!("os error {code}"))
    };
    if errno(libc::EBUSY) || errno(libc::EEXIST) {
        DatapathError::Busy {
            iface: iface.into(),
        }
    } else if errno(libc::EOPNOTSUPP) || (mode == AttachMode::Native && errno(libc::EINVAL)) {
        DatapathError::ModeUnsupported {
            iface: iface.into(),
            mode: mode.name(),
        }
    } else {
        DatapathError::Program(e)
    }
}

/// Takes the `ACTIVE` ring buffer (newly active clients, for the adaptive controller) out of a
/// loaded object.
pub fn take_active(ebpf: &mut Ebpf) -> Result<RingBuf<MapData>, DatapathError> {
    let map = ebpf.take_map("ACTIVE").ok_or(DatapathError::Map {
        name: "ACTIVE",
        error: MapError::InvalidName {
            name: "ACTIVE".into(),
        },
    })?;
    RingBuf::try_from(map).map_err(map_err("ACTIVE"))
}

/// Loads the `limiter_adapt` program (never attached; run with BPF_PROG_TEST_RUN) and returns a
/// descriptor of it for the adaptive loop.
pub fn load_adapt_program(ebpf: &mut Ebpf) -> Result<OwnedFd, DatapathError> {
    load_test_run_program(ebpf, super::ADAPT_PROGRAM)
}

/// Loads the `limiter_check` program (never attached; run with BPF_PROG_TEST_RUN) and returns
/// a descriptor of it for a [`crate::check::Checker`].
pub fn load_check_program(ebpf: &mut Ebpf) -> Result<OwnedFd, DatapathError> {
    load_test_run_program(ebpf, super::CHECK_PROGRAM)
}

fn load_test_run_program(ebpf: &mut Ebpf, name: &'static str) -> Result<OwnedFd, DatapathError> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(ProgramError::NotLoaded)?
        .try_into()?;
    load_once(program)?;
    dup_fd(program.fd()?.as_fd(), name)
}

/// Loads `program` into the kernel unless [`load_programs_while`] already has.
fn load_once(program: &mut Xdp) -> Result<(), ProgramError> {
    if program.fd().is_ok() {
        return Ok(());
    }
    program.load()
}

/// The programs the agent loads: the one it attaches, and the two it runs with
/// BPF_PROG_TEST_RUN.
pub const AGENT_PROGRAMS: [&str; 3] = [PROGRAM, super::ADAPT_PROGRAM, super::CHECK_PROGRAM];

/// Loads the programs `names` of `ebpf` into the kernel, each on a thread of its own, while
/// `meanwhile` runs on this one; returns what `meanwhile` returned once every load is done.
/// The kernel's verifier takes most of an agent's start (hundreds of milliseconds per program),
/// one CPU per load: side by side, and beside the writes of a large policy set, they take the
/// time of the longest instead of the sum. [`attach`], [`load_adapt_program`] and
/// [`load_check_program`] then use the programs loaded here. The first load error (in `names`
/// order) is returned, after `meanwhile` has run.
pub fn load_programs_while<R>(
    ebpf: &mut Ebpf,
    names: &[&str],
    meanwhile: impl FnOnce() -> R,
) -> Result<R, DatapathError> {
    std::thread::scope(|scope| {
        let loads: Vec<_> = ebpf
            .programs_mut()
            .filter(|(name, _)| names.contains(name))
            .map(|(name, program)| {
                let position = names.iter().position(|n| *n == name);
                let load = scope.spawn(move || -> Result<(), DatapathError> {
                    let program: &mut Xdp = program.try_into()?;
                    Ok(load_once(program)?)
                });
                (position, load)
            })
            .collect();
        let out = meanwhile();
        let mut results: Vec<_> = loads
            .into_iter()
            .map(|(position, load)| {
                let result = load
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (position, result)
            })
            .collect();
        results.sort_by_key(|(position, _)| *position);
        for (_, result) in results {
            result?;
        }
        Ok(out)
    })
}

/// Finishes adopting pins of an older layout, once the agent's program is attached: drops the
/// entries keyed in ff00::/8 from the client maps (multicast sources then, which the old parser
/// did not refuse; group keys now, so a sender could have chosen its source to put its counts on
/// another prefix's group), then stamps the layout. Before the swap the old program could still
/// add such entries; a start that fails before this finds the pins still marked old next time.
/// A no-op on maps of this layout.
pub fn complete_upgrade(ebpf: &mut Ebpf, tables: &mut super::Tables) -> Result<(), DatapathError> {
    let mut layout = layout_map(ebpf.map_mut("LAYOUT"))?;
    if layout.get(&0, 0).map_err(map_err("LAYOUT"))? == LAYOUT_VERSION {
        return Ok(());
    }
    let purged = tables.remove_group_marked_keys()?;
    if purged > 0 {
        tracing::info!(
            purged,
            "dropped entries of multicast sources from the adopted maps"
        );
    }
    layout.set(0, LAYOUT_VERSION, 0).map_err(map_err("LAYOUT"))
}
