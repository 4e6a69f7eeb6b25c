//! The kernel side as seen from userspace: loading and attaching the XDP program, its pinned
//! maps, and writing a policy set into them.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    io,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, MapInfo, MapType,
        PerCpuArray, RingBuf, lpm_trie::Key,
    },
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use limiter_common::{
    AdaptSlot, AdaptiveStatus, ClientState, Config as MapConfig, GlobalStats, Policy,
    addr::{ClientKey, PolicyKey},
    maps::{
        ADAPT_BATCH, ADAPT_REFRESH, ADAPT_UNCHANGED, CONFIG_ADAPTIVE, FLAG_REPORTED, FLAG_STATIC,
        GENERATION_SWEEP, LAYOUT_VERSION, MODE_DRY_RUN, MODE_ENFORCE, generation_tag,
    },
};

use crate::policy::{Config, Mode};

/// Where each interface's maps are pinned: `/sys/fs/bpf/limiter/IFACE/`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/limiter";
/// The XDP entry point the agent attaches.
pub const PROGRAM: &str = "limiter";
/// Default capacity of the dynamic-client LRU map. Each client costs ~112 bytes of kernel memory
/// (48-byte value, 16-byte key, 48-byte `htab_elem`) plus its bucket, ~128 MiB at this size.
pub const DEFAULT_MAX_CLIENTS: u32 = 1 << 20;
/// Default capacity of the LRU map of API IDs that are not addresses (same cost per entry).
pub const DEFAULT_MAX_IDS: u32 = 1 << 20;

/// The maps the agent pins, with their kernel layout: a pinned map of another layout (an older
/// build, another `--max-clients`) is not adopted.
const PINNED: [(&str, MapType, usize, usize); 11] = [
    ("LAYOUT", MapType::Array, 4, 4),
    ("CLIENTS", MapType::LruHash, 16, size_of::<ClientState>()),
    (
        "STATIC_CLIENTS",
        MapType::Hash,
        16,
        size_of::<ClientState>(),
    ),
    ("NAMED", MapType::LruHash, 16, size_of::<ClientState>()),
    ("NAMED_STATIC", MapType::Hash, 16, size_of::<ClientState>()),
    (
        "POLICIES",
        MapType::LpmTrie,
        4 + size_of::<PolicyKey>(),
        size_of::<Policy>(),
    ),
    ("CONFIG", MapType::Array, 4, size_of::<MapConfig>()),
    ("STATS", MapType::PerCpuArray, 4, size_of::<GlobalStats>()),
    ("OVERFLOW", MapType::Array, 4, size_of::<ClientState>()),
    // A ring buffer has neither keys nor values.
    ("ACTIVE", MapType::RingBuf, 0, 0),
    ("ADAPTIVE", MapType::Array, 4, size_of::<AdaptiveStatus>()),
];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("limiter needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON): run it with sudo")]
    NotRoot,
    #[error("bpffs is not mounted at /sys/fs/bpf: run `mount -t bpf bpf /sys/fs/bpf`")]
    BpffsNotMounted,
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    #[error("interface {0:?} does not exist: check the name with `ip link`")]
    NoInterface(String),
    #[error(
        "the driver of {iface} does not support XDP in {mode} mode: use `--xdp-mode skb` (generic XDP) or `--xdp-mode auto`"
    )]
    ModeUnsupported { iface: String, mode: &'static str },
    #[error(
        "{iface} already has another XDP program attached: rerun with `--replace` to replace it, or remove it with `ip link set dev {iface} xdp off`"
    )]
    Busy { iface: String },
    #[error(
        "{iface}: the XDP program attached there is held by a bpf_link of another process; stop that process (or remove its pinned link) first"
    )]
    ForeignLink { iface: String },
    #[error(
        "no limiter maps are pinned for {iface} under {dir}: is `limiter agent --iface {iface}` running?"
    )]
    NotPinned { iface: String, dir: PathBuf },
    #[error("loading the XDP program: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program: {0}")]
    Program(#[from] ProgramError),
    #[error("map {name}: {error}")]
    Map { name: &'static str, error: MapError },
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        error: source,
    }
}

/// `/sys/fs/bpf/limiter/IFACE`.
pub fn pin_dir(iface: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(iface)
}

/// Fails with a message naming the fix when the process cannot use BPF at all.
pub fn check_environment() -> Result<(), DatapathError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DatapathError::NotRoot);
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
    crate::kernel::check()?;
    Ok(())
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
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            pin_dir: None,
            max_clients: DEFAULT_MAX_CLIENTS,
            max_ids: DEFAULT_MAX_IDS,
        }
    }
}

/// Loads the embedded object ([`crate::ebpf::OBJECT`]); see [`load_object`].
pub fn load(opts: &LoadOptions) -> Result<Ebpf, DatapathError> {
    load_object(crate::ebpf::OBJECT, opts)
}

/// Loads an object built from limiter-ebpf. With a pin directory, maps already pinned there with
/// the same layout are adopted (counters survive an agent restart); pins of another layout are
/// removed first, with a warning.
pub fn load_object(object: &[u8], opts: &LoadOptions) -> Result<Ebpf, DatapathError> {
    let mut loader = EbpfLoader::new();
    loader.map_max_entries("CLIENTS", opts.max_clients);
    loader.map_max_entries("NAMED", opts.max_ids);
    if let Some(dir) = &opts.pin_dir {
        // Discarding may remove the directory itself: create it afterwards.
        discard_incompatible_pins(dir, opts)?;
        std::fs::create_dir_all(dir).map_err(|source| DatapathError::Io {
            what: "creating the pin directory",
            path: dir.clone(),
            error: source,
        })?;
        for (name, ..) in PINNED {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    crate::kernel_log::set_level(&mut loader);
    let mut ebpf = loader.load(object)?;
    crate::kernel_log::forward(&mut ebpf);
    let mut layout: Array<&mut MapData, u32> =
        Array::try_from(ebpf.map_mut("LAYOUT").ok_or(DatapathError::Map {
            name: "LAYOUT",
            error: MapError::InvalidName {
                name: "LAYOUT".into(),
            },
        })?)
        .map_err(map_err("LAYOUT"))?;
    layout
        .set(0, LAYOUT_VERSION, 0)
        .map_err(map_err("LAYOUT"))?;
    Ok(ebpf)
}

/// The layout version stamped in an interface's pins, if any.
fn pinned_layout(dir: &Path) -> Option<u32> {
    let data = MapData::from_pin(dir.join("LAYOUT")).ok()?;
    let layout: Array<MapData, u32> = Array::try_from(Map::from_map_data(data).ok()?).ok()?;
    layout.get(&0, 0).ok()
}

fn discard_incompatible_pins(dir: &Path, opts: &LoadOptions) -> Result<(), DatapathError> {
    let any_pinned = PINNED.iter().any(|(name, ..)| dir.join(name).exists());
    if !any_pinned {
        return Ok(());
    }
    match pinned_layout(dir) {
        Some(LAYOUT_VERSION) => {}
        found => {
            // No earlier layout exists to migrate from yet; a future version adds its migration
            // here and starts fresh only for layouts it does not know.
            let found = found.map_or("no version stamp".to_string(), |v| format!("layout v{v}"));
            tracing::warn!(
                dir = %dir.display(),
                "pinned maps have {found}, this binary uses layout v{LAYOUT_VERSION} and has no migration from it: starting with fresh maps"
            );
            return remove_pins(dir);
        }
    }
    let mut mismatch = None;
    for (name, kind, key, value) in PINNED {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let ok = MapInfo::from_pin(&path).is_ok_and(|info| {
            info.map_type().is_ok_and(|t| t == kind)
                && info.key_size() as usize == key
                && info.value_size() as usize == value
                && (name != "CLIENTS" || info.max_entries() == opts.max_clients)
                && (name != "NAMED" || info.max_entries() == opts.max_ids)
        });
        if !ok {
            mismatch = Some(name);
            break;
        }
    }
    if let Some(name) = mismatch {
        tracing::warn!(
            dir = %dir.display(),
            map = name,
            "pinned maps have another layout or size; discarding them and starting with fresh counters"
        );
        remove_pins(dir)?;
    }
    Ok(())
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
        let fd = match crate::syscall::obj_get(&self.link_pin) {
            Ok(fd) => fd,
            // Someone (`limiter detach`) already removed it: nothing left to detach.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("opening the pinned XDP link", e)),
        };
        crate::syscall::link_detach(fd.as_fd()).map_err(|e| io("detaching the XDP link", e))?;
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
    program.load()?;
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
            crate::netlink::detach_xdp(index).map_err(|e| match e.raw_os_error() {
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

/// Typed handles on the maps, from a freshly loaded object or from the pins of a running agent.
pub struct Tables {
    pub clients: HashMap<MapData, ClientKey, ClientState>,
    pub static_clients: HashMap<MapData, ClientKey, ClientState>,
    /// API IDs that are not addresses, by `ClientName::key`.
    pub named: HashMap<MapData, ClientKey, ClientState>,
    /// IDs with an exact-ID policy; never evicted.
    pub named_static: HashMap<MapData, ClientKey, ClientState>,
    pub policies: LpmTrie<MapData, PolicyKey, Policy>,
    pub config: Array<MapData, MapConfig>,
    pub stats: PerCpuArray<MapData, GlobalStats>,
    /// The adaptive controller's status (written by the agent each period).
    pub adaptive: Array<MapData, AdaptiveStatus>,
    /// The `limiter_adapt` program, for the in-place refresh of every entry (see
    /// [`Tables::refresh_all`]).
    refresher: Option<OwnedFd>,
    /// The generation of the last complete refresh (`None`: none yet by these tables).
    last_refresh: Option<u32>,
}

/// What one `Tables::apply` changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub generation: u32,
    pub policies_written: usize,
    pub policies_removed: usize,
    pub statics_added: usize,
    pub statics_removed: usize,
    /// Entries refreshed in place, a refresh being due `GENERATION_SWEEP` generations after the
    /// last one or on adopted maps (`None`: none was due).
    pub refreshed: Option<usize>,
}

impl Tables {
    /// Takes the maps out of a loaded object (its programs keep their references).
    pub fn take(ebpf: &mut Ebpf) -> Result<Tables, DatapathError> {
        Tables::from_maps(|name| {
            ebpf.take_map(name).ok_or(DatapathError::Map {
                name,
                error: MapError::InvalidName { name: name.into() },
            })
        })
    }

    /// Opens the maps a running (or crashed) agent pinned for `iface`.
    pub fn open_pinned(iface: &str) -> Result<Tables, DatapathError> {
        let dir = pin_dir(iface);
        Tables::from_maps(|name| {
            let path = dir.join(name);
            if !path.exists() {
                return Err(DatapathError::NotPinned {
                    iface: iface.into(),
                    dir: dir.clone(),
                });
            }
            let data = MapData::from_pin(&path).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        })
    }

    /// Typed handles on the maps `get` provides by name.
    fn from_maps(
        mut get: impl FnMut(&'static str) -> Result<Map, DatapathError>,
    ) -> Result<Tables, DatapathError> {
        Ok(Tables {
            clients: HashMap::try_from(get("CLIENTS")?).map_err(map_err("CLIENTS"))?,
            static_clients: HashMap::try_from(get("STATIC_CLIENTS")?)
                .map_err(map_err("STATIC_CLIENTS"))?,
            named: HashMap::try_from(get("NAMED")?).map_err(map_err("NAMED"))?,
            named_static: HashMap::try_from(get("NAMED_STATIC")?)
                .map_err(map_err("NAMED_STATIC"))?,
            policies: LpmTrie::try_from(get("POLICIES")?).map_err(map_err("POLICIES"))?,
            config: Array::try_from(get("CONFIG")?).map_err(map_err("CONFIG"))?,
            stats: PerCpuArray::try_from(get("STATS")?).map_err(map_err("STATS"))?,
            adaptive: Array::try_from(get("ADAPTIVE")?).map_err(map_err("ADAPTIVE"))?,
            refresher: None,
            last_refresh: None,
        })
    }

    /// Gives these tables the `limiter_adapt` program (from [`load_adapt_program`]), with which
    /// `apply` refreshes every entry in place when one is due. The agent always does; without
    /// it (tests, benchmarks) nothing is refreshed and a client idle across 2^15 policy changes
    /// could keep a stale policy until its next change.
    pub fn set_refresher(&mut self, program: OwnedFd) {
        self.refresher = Some(program);
    }

    /// Brings the cached policy of every resident address client up to the current generation,
    /// in place (`ADAPT_REFRESH`, with the same atomics as the fast path, so no concurrent count
    /// is lost). Entries store only a 15-bit generation tag; `apply` runs this
    /// `GENERATION_SWEEP` (2^14) generations after the last refresh, so no resident entry's tag
    /// is ever 2^15 generations old, where it would alias the current one. Returns the entries
    /// refreshed (0 without a refresher; a busy entry that stays contended is left to its own
    /// packets): a million take 0.9 s (BENCHMARKS.md).
    pub fn refresh_all(&self) -> Result<usize, DatapathError> {
        let Some(program) = &self.refresher else {
            return Ok(0);
        };
        let mut frame = crate::tuner::AdaptFrame::default();
        let mut refreshed = 0;
        for (map, name) in [
            (&self.clients, "CLIENTS"),
            (&self.static_clients, "STATIC_CLIENTS"),
        ] {
            // A batched walk: its cursor is a bucket, so evictions during the walk (a flood of
            // new sources) cannot restart it, as they can a walk by `get_next_key`.
            let slots: Vec<AdaptSlot> =
                crate::syscall::lookup_all::<ClientKey, ClientState>(map.map().fd().as_fd())
                    .map_err(|error| DatapathError::Io {
                        what: "reading",
                        path: name.into(),
                        error,
                    })?
                    .into_iter()
                    .map(|(key, _)| AdaptSlot {
                        key,
                        flags: ADAPT_REFRESH,
                        ..AdaptSlot::default()
                    })
                    .collect();
            for chunk in slots.chunks(ADAPT_BATCH) {
                let io_err = |error| DatapathError::Io {
                    what: "refreshing the policies of",
                    path: name.into(),
                    error,
                };
                let (ret, results) = frame.run(program.as_fd(), chunk).map_err(io_err)?;
                if ret != crate::tuner::XDP_PASS {
                    return Err(io_err(io::Error::other(format!(
                        "{} returned {ret}",
                        crate::tuner::ADAPT_PROGRAM
                    ))));
                }
                refreshed += results.iter().filter(|&&r| r == ADAPT_UNCHANGED).count();
            }
        }
        Ok(refreshed)
    }

    /// Owned descriptors of the two client maps (dynamic, static), for a snapshot taken on
    /// another thread.
    pub fn client_fds(&self) -> io::Result<(OwnedFd, OwnedFd)> {
        Ok((
            self.clients.map().fd().as_fd().try_clone_to_owned()?,
            self.static_clients
                .map()
                .fd()
                .as_fd()
                .try_clone_to_owned()?,
        ))
    }

    /// Writes restored client entries into the dynamic map (a later `apply` moves the ones with
    /// exact-address policies into the static map, carrying their state).
    pub fn restore_clients(
        &mut self,
        entries: &[(ClientKey, ClientState)],
    ) -> Result<(), DatapathError> {
        let entries: Vec<(ClientKey, ClientState)> = entries
            .iter()
            .map(|(k, s)| {
                (*k, {
                    let mut s = *s;
                    s.set_flags(s.flags() & !FLAG_STATIC);
                    s
                })
            })
            .collect();
        crate::syscall::update_all(self.clients.map().fd().as_fd(), &entries).map_err(|source| {
            DatapathError::Io {
                what: "restoring clients into",
                path: "CLIENTS".into(),
                error: source,
            }
        })
    }

    /// The adaptive controller's status as last written.
    pub fn adaptive_status(&self) -> Result<AdaptiveStatus, DatapathError> {
        self.adaptive.get(&0, 0).map_err(map_err("ADAPTIVE"))
    }

    /// Writes the adaptive controller's status for `limiter stats`.
    pub fn set_adaptive_status(&mut self, status: AdaptiveStatus) -> Result<(), DatapathError> {
        self.adaptive.set(0, status, 0).map_err(map_err("ADAPTIVE"))
    }

    pub fn map_config(&self) -> Result<MapConfig, DatapathError> {
        self.config.get(&0, 0).map_err(map_err("CONFIG"))
    }

    /// Global counters summed over CPUs.
    pub fn global(&self) -> Result<GlobalStats, DatapathError> {
        let per_cpu = self.stats.get(&0, 0).map_err(map_err("STATS"))?;
        let mut sum = GlobalStats::default();
        for s in per_cpu.iter() {
            sum.add(s);
        }
        Ok(sum)
    }

    /// Every client entry, static ones flagged `FLAG_STATIC`, read in batches (a million
    /// clients in about 0.4 s). Entries added or evicted during the read may or may not appear.
    pub fn clients(&self) -> Result<Vec<(ClientKey, ClientState)>, DatapathError> {
        self.client_maps()?.addresses()
    }

    /// Writes a validated policy set into the maps and bumps the generation, which makes every
    /// client re-resolve its policy on its next packet. Counters are kept: a client whose policy
    /// window is unchanged keeps its window state; a changed window starts afresh.
    pub fn apply(&mut self, config: &Config) -> Result<ApplyReport, DatapathError> {
        let mut report = ApplyReport::default();
        let desired = config.lpm_entries();
        for ((prefix, addr), policy) in &desired {
            let key = Key::new(*prefix, *addr);
            if self.policies.get(&key, 0).ok().as_ref() != Some(policy) {
                self.policies
                    .insert(&key, policy, 0)
                    .map_err(map_err("POLICIES"))?;
                report.policies_written += 1;
            }
        }
        let stale: Vec<Key<PolicyKey>> = self
            .policies
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !desired.contains_key(&(k.prefix_len(), k.data())))
            .collect();
        for key in &stale {
            self.policies.remove(key).map_err(map_err("POLICIES"))?;
            report.policies_removed += 1;
        }
        self.sync_static_clients(&config.static_clients(), &mut report)?;
        let named: Vec<ClientKey> = config.named_policies().keys().map(|n| n.key()).collect();
        sync_static(
            &mut self.named,
            "NAMED",
            &mut self.named_static,
            "NAMED_STATIC",
            &named,
            &mut report,
        )?;

        let previous = self.map_config()?;
        let generation = next_generation(previous.generation);
        let mode = match config.mode {
            Mode::Enforce => MODE_ENFORCE,
            Mode::DryRun => MODE_DRY_RUN,
        };
        let flags = if config.adaptive.enabled {
            CONFIG_ADAPTIVE
        } else {
            0
        };
        let map_config = MapConfig {
            generation,
            mode,
            flags,
            _pad: 0,
        };
        self.config
            .set(0, map_config, 0)
            .map_err(map_err("CONFIG"))?;
        report.generation = generation;
        // A refresh is due every GENERATION_SWEEP generations after the last complete one,
        // and first thing on maps a previous agent left (generation not 0), which may have died
        // owing one. A failed refresh is due again at the next apply.
        let due = match self.last_refresh {
            Some(last) => generation.wrapping_sub(last) >= GENERATION_SWEEP,
            None => previous.generation != 0,
        };
        if self.refresher.is_some() && due {
            let refreshed = self.refresh_all()?;
            tracing::info!(
                generation,
                refreshed,
                "refreshed every client's policy in place (due every {GENERATION_SWEEP} changes)"
            );
            report.refreshed = Some(refreshed);
            self.last_refresh = Some(generation);
        } else if self.last_refresh.is_none() && previous.generation == 0 {
            // Fresh maps: nothing older than this generation.
            self.last_refresh = Some(generation);
        }
        Ok(report)
    }

    /// Moves clients between the LRU map and the never-evicted static map so that exactly the
    /// addresses with exact-address policies are static, carrying their counters across.
    fn sync_static_clients(
        &mut self,
        wanted: &[ClientKey],
        report: &mut ApplyReport,
    ) -> Result<(), DatapathError> {
        sync_static(
            &mut self.clients,
            "CLIENTS",
            &mut self.static_clients,
            "STATIC_CLIENTS",
            wanted,
            report,
        )
    }

    /// Resident entries of the address maps and of the ID maps, counted by a batched walk.
    pub fn resident(&self) -> Result<(u64, u64), DatapathError> {
        self.client_maps()?.resident()
    }

    /// Handles of their own on the address maps and the adaptive status, for the adaptive loop
    /// (which then runs without the guards of these `Tables`).
    pub fn adaptive_handles(&self) -> Result<AdaptiveHandles, DatapathError> {
        Ok(AdaptiveHandles {
            clients: HashMap::try_from(dup_map(self.clients.map(), "CLIENTS")?)
                .map_err(map_err("CLIENTS"))?,
            static_clients: HashMap::try_from(dup_map(
                self.static_clients.map(),
                "STATIC_CLIENTS",
            )?)
            .map_err(map_err("STATIC_CLIENTS"))?,
            status: Array::try_from(dup_map(self.adaptive.map(), "ADAPTIVE")?)
                .map_err(map_err("ADAPTIVE"))?,
        })
    }

    /// Owned descriptors of the four client maps, for walks that should not hold whatever
    /// guards these `Tables` (a walk of a million entries takes about 0.4 s).
    pub fn client_maps(&self) -> Result<ClientMaps, DatapathError> {
        let dup = |map: &HashMap<MapData, ClientKey, ClientState>, name| {
            dup_fd(map.map().fd().as_fd(), name)
        };
        Ok(ClientMaps {
            clients: dup(&self.clients, "CLIENTS")?,
            static_clients: dup(&self.static_clients, "STATIC_CLIENTS")?,
            named: dup(&self.named, "NAMED")?,
            named_static: dup(&self.named_static, "NAMED_STATIC")?,
        })
    }
}

/// The policy generation after `generation`: never one whose tag (its low 15 bits, which is all
/// an entry stores) is 0, since a tag of 0 marks an entry to re-resolve.
pub fn next_generation(generation: u32) -> u32 {
    let next = generation.wrapping_add(1);
    if generation_tag(next) == 0 {
        next.wrapping_add(1)
    } else {
        next
    }
}

/// A duplicate of a map's or program's descriptor; `name` says whose in the error.
fn dup_fd(fd: BorrowedFd<'_>, name: &'static str) -> Result<OwnedFd, DatapathError> {
    fd.try_clone_to_owned().map_err(|error| DatapathError::Io {
        what: "duplicating the descriptor of",
        path: name.into(),
        error,
    })
}

/// A second handle on a map, through a duplicated descriptor.
fn dup_map(map: &MapData, name: &'static str) -> Result<Map, DatapathError> {
    let fd = dup_fd(map.fd().as_fd(), name)?;
    Map::from_map_data(MapData::from_fd(fd).map_err(map_err(name))?).map_err(map_err(name))
}

/// What the adaptive loop reads and writes besides its ring and program (see
/// [`Tables::adaptive_handles`]).
pub struct AdaptiveHandles {
    clients: HashMap<MapData, ClientKey, ClientState>,
    static_clients: HashMap<MapData, ClientKey, ClientState>,
    status: Array<MapData, AdaptiveStatus>,
}

impl AdaptiveHandles {
    /// An address client's entry and whether it is in the static map; one lookup per map tried,
    /// the static one first when `static_hint`. `None` if it has none (evicted).
    pub fn address(
        &self,
        key: &ClientKey,
        static_hint: bool,
    ) -> Result<Option<(ClientState, bool)>, DatapathError> {
        let get = |map: &HashMap<MapData, ClientKey, ClientState>, name| match map.get(key, 0) {
            Ok(state) => Ok(Some(state)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(name)(e)),
        };
        let order = if static_hint {
            [
                (&self.static_clients, "STATIC_CLIENTS", true),
                (&self.clients, "CLIENTS", false),
            ]
        } else {
            [
                (&self.clients, "CLIENTS", false),
                (&self.static_clients, "STATIC_CLIENTS", true),
            ]
        };
        for (map, name, is_static) in order {
            if let Some(state) = get(map, name)? {
                return Ok(Some((state, is_static)));
            }
        }
        Ok(None)
    }

    /// Every resident address client flagged `FLAG_REPORTED`: the clients a previous agent
    /// tracked, which the fast path will not report again. One walk of both maps, at start.
    pub fn reported(&self) -> Result<Vec<(ClientKey, bool)>, DatapathError> {
        let mut out = Vec::new();
        for (map, name, is_static) in [
            (&self.clients, "CLIENTS", false),
            (&self.static_clients, "STATIC_CLIENTS", true),
        ] {
            let entries =
                crate::syscall::lookup_all::<ClientKey, ClientState>(map.map().fd().as_fd())
                    .map_err(|error| DatapathError::Io {
                        what: "reading",
                        path: name.into(),
                        error,
                    })?;
            out.extend(
                entries
                    .into_iter()
                    .filter(|(_, s)| s.flags() & FLAG_REPORTED != 0)
                    .map(|(k, _)| (k, is_static)),
            );
        }
        Ok(out)
    }

    pub fn set_status(&mut self, status: AdaptiveStatus) -> Result<(), DatapathError> {
        self.status.set(0, status, 0).map_err(map_err("ADAPTIVE"))
    }
}

/// The client maps by descriptor (see [`Tables::client_maps`]).
pub struct ClientMaps {
    clients: OwnedFd,
    static_clients: OwnedFd,
    named: OwnedFd,
    named_static: OwnedFd,
}

impl ClientMaps {
    fn read(
        fd: &OwnedFd,
        name: &'static str,
    ) -> Result<Vec<(ClientKey, ClientState)>, DatapathError> {
        crate::syscall::lookup_all::<ClientKey, ClientState>(fd.as_fd()).map_err(|error| {
            DatapathError::Io {
                what: "reading",
                path: name.into(),
                error,
            }
        })
    }

    /// Every entry of a map pair, those of the static map flagged `FLAG_STATIC`.
    fn pair(
        dynamic: (&OwnedFd, &'static str),
        statics: (&OwnedFd, &'static str),
    ) -> Result<Vec<(ClientKey, ClientState)>, DatapathError> {
        let mut entries = ClientMaps::read(dynamic.0, dynamic.1)?;
        entries.extend(
            ClientMaps::read(statics.0, statics.1)?
                .into_iter()
                .map(|(k, mut v)| {
                    v.set_flags(v.flags() | FLAG_STATIC);
                    (k, v)
                }),
        );
        Ok(entries)
    }

    /// Every address client.
    pub fn addresses(&self) -> Result<Vec<(ClientKey, ClientState)>, DatapathError> {
        ClientMaps::pair(
            (&self.clients, "CLIENTS"),
            (&self.static_clients, "STATIC_CLIENTS"),
        )
    }

    /// Every named (ID) client, by key.
    pub fn ids(&self) -> Result<Vec<(ClientKey, ClientState)>, DatapathError> {
        ClientMaps::pair((&self.named, "NAMED"), (&self.named_static, "NAMED_STATIC"))
    }

    /// Resident `(addresses, IDs)`.
    pub fn resident(&self) -> Result<(u64, u64), DatapathError> {
        Ok((self.addresses()?.len() as u64, self.ids()?.len() as u64))
    }
}

/// Moves entries between an LRU map and its never-evicted static map so that exactly the keys in
/// `wanted` are static, carrying their counters across; moved entries re-resolve their policy.
fn sync_static(
    dynamic: &mut HashMap<MapData, ClientKey, ClientState>,
    dynamic_name: &'static str,
    statics: &mut HashMap<MapData, ClientKey, ClientState>,
    static_name: &'static str,
    wanted: &[ClientKey],
    report: &mut ApplyReport,
) -> Result<(), DatapathError> {
    let wanted: HashSet<ClientKey> = wanted.iter().copied().collect();
    let current: HashSet<ClientKey> = statics.keys().filter_map(Result::ok).collect();
    // Removals first, so that replacing a full set of statics never needs room for both.
    for key in current.difference(&wanted) {
        if let Ok(mut state) = statics.get(key, 0) {
            state.set_generation_tag(0);
            state.set_flags(state.flags() & !FLAG_STATIC);
            dynamic
                .insert(key, state, 0)
                .map_err(map_err(dynamic_name))?;
        }
        statics.remove(key).map_err(map_err(static_name))?;
        report.statics_removed += 1;
    }
    for key in wanted.difference(&current) {
        let mut state = dynamic.get(key, 0).unwrap_or_default();
        state.set_generation_tag(0); // re-resolve on the next packet
        state.set_flags(state.flags() | FLAG_STATIC);
        statics
            .insert(key, state, 0)
            .map_err(map_err(static_name))?;
        let _ = dynamic.remove(key);
        report.statics_added += 1;
    }
    Ok(())
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
    load_test_run_program(ebpf, crate::tuner::ADAPT_PROGRAM)
}

/// Loads the `limiter_check` program (never attached; run with BPF_PROG_TEST_RUN) and returns
/// a descriptor of it for a [`crate::check::Checker`].
pub fn load_check_program(ebpf: &mut Ebpf) -> Result<OwnedFd, DatapathError> {
    load_test_run_program(ebpf, crate::check::CHECK_PROGRAM)
}

fn load_test_run_program(ebpf: &mut Ebpf, name: &'static str) -> Result<OwnedFd, DatapathError> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(ProgramError::NotLoaded)?
        .try_into()?;
    program.load()?;
    dup_fd(program.fd()?.as_fd(), name)
}

/// The policies in the trie, `(prefix, key) -> Policy` (stats names policies from these).
pub fn policy_entries(tables: &Tables) -> StdHashMap<(u32, PolicyKey), Policy> {
    tables
        .policies
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| ((k.prefix_len(), k.data()), v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_never_have_tag_zero() {
        assert_eq!(next_generation(1), 2);
        assert_eq!(next_generation(0x7ffe), 0x7fff);
        assert_eq!(next_generation(0x7fff), 0x8001);
        assert_eq!(next_generation(u32::MAX), 1);
        let mut g = 0;
        for _ in 0..100_000 {
            g = next_generation(g);
            assert_ne!(generation_tag(g), 0, "{g}");
        }
    }
}
