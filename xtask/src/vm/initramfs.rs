//! The VM's root file system, `target/vm/initramfs.cpio` (newc, uncompressed): static busybox,
//! the host's `ip`, `nsenter` and `setpriv`, `limiter`, the test binaries, the shared libraries
//! `ldd` lists for them, the veth module and the /init script, with the marker lines /init prints
//! for the host to read.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, Result, ensure};

use super::artifacts::Artifact;
use super::kernel::module_bytes;
use crate::process;

/// Printed by /init once it has mounted everything, before the first test binary.
pub(super) const READY_MARKER: &str = "VMTEST-KERNEL ";
/// Printed by /init before (`NAME start`) and after (`NAME exit=N`) each test binary.
pub(super) const BINARY_MARKER: &str = "VMTEST-BINARY ";
/// Printed by /init after the last test binary, with 0 if all passed.
pub(super) const DONE_MARKER: &str = "VMTEST-DONE status=";
/// Printed by /init when its setup went wrong (e.g. veth could not be loaded).
pub(super) const WARNING_MARKER: &str = "VMTEST-WARNING ";

/// What goes into the initramfs besides the host's `ip`, `nsenter`, `setpriv` and shared
/// libraries.
pub(super) struct Payload<'a> {
    pub(super) busybox: &'a Path,
    pub(super) limiter: &'a Path,
    pub(super) tests: &'a [Artifact],
    pub(super) veth: Option<&'a Path>,
    pub(super) test_args: &'a [String],
}

/// Where the veth module goes in the VM.
const VETH_IN_VM: &str = "lib/modules/veth.ko";
/// Where the `limiter` binary goes in the VM (the tests find it through LIMITER_BIN).
const LIMITER_IN_VM: &str = "usr/bin/limiter";

/// Writes the initramfs to `path`.
pub(super) fn write(path: &Path, payload: &Payload<'_>) -> Result<()> {
    let programs = vm_programs(payload)?;
    let libraries = shared_libraries(programs.iter().map(|(_, host)| host.as_path()))?;
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut cpio = Cpio::new(BufWriter::new(file));
    for dir in ["dev", "proc", "sys", "run", "tmp", "root", "etc", "bin"] {
        cpio.dir(dir)?;
    }
    cpio.char_device("dev/console", 5, 1)?;
    add_file(&mut cpio, "bin/busybox", 0o755, payload.busybox)?;
    let scratch = path.with_extension("strip");
    for (in_vm, host) in &programs {
        add_stripped(&mut cpio, in_vm, host, &scratch)?;
    }
    let _ = fs::remove_file(&scratch);
    for library in &libraries {
        let in_vm = library.to_string_lossy();
        add_file(&mut cpio, in_vm.trim_start_matches('/'), 0o755, library)?;
    }
    if let Some(veth) = payload.veth {
        cpio.file(VETH_IN_VM, 0o644, &module_bytes(veth)?)?;
    }
    cpio.file("init", 0o755, init_script(payload).as_bytes())?;
    cpio.finish()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn add_file<W: Write>(cpio: &mut Cpio<W>, in_vm: &str, perm: u32, host: &Path) -> Result<()> {
    let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
    cpio.file(in_vm, perm, &data)
        .with_context(|| format!("adding {} as /{in_vm}", host.display()))
}

/// Adds a program without its debug info (`strip --strip-debug` into `scratch`): the debug
/// test binaries carry hundreds of MB of DWARF, which the VM's RAM-backed rootfs would have to
/// hold twice while unpacking (it ran out at 2 GiB with a 769 MB initramfs).
fn add_stripped<W: Write>(
    cpio: &mut Cpio<W>,
    in_vm: &str,
    host: &Path,
    scratch: &Path,
) -> Result<()> {
    let output = process::command("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(scratch)
        .arg(host)
        .stdin(Stdio::null())
        .output()
        .context("could not start `strip` (binutils)")?;
    ensure!(
        output.status.success(),
        "`strip --strip-debug {}` failed ({}): {}",
        host.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    add_file(cpio, in_vm, 0o755, scratch)
}

/// `(path in the VM, path on the host)` of every dynamically linked program the VM runs.
fn vm_programs(payload: &Payload<'_>) -> Result<Vec<(String, PathBuf)>> {
    let mut programs = vec![
        ("usr/bin/ip".to_owned(), host_tool("ip", "-V", "iproute2")?),
        (
            "usr/bin/nsenter".to_owned(),
            host_tool("nsenter", "--version", "util-linux")?,
        ),
        // The capabilities-only agent of tests/tests/hostile_files.rs runs under it.
        (
            "usr/bin/setpriv".to_owned(),
            host_tool("setpriv", "--version", "util-linux")?,
        ),
        (LIMITER_IN_VM.to_owned(), payload.limiter.to_path_buf()),
    ];
    for test in payload.tests {
        programs.push((format!("tests/{}", test.vm_name()), test.executable.clone()));
    }
    Ok(programs)
}

/// The host's `name` on PATH, checked to be the real tool (its `version_flag` output names
/// `package`), not a busybox applet.
fn host_tool(name: &str, version_flag: &str, package: &str) -> Result<PathBuf> {
    let path = process::find_executable(name)
        .with_context(|| format!("`{name}` ({package}) is not on PATH"))?;
    let version = process::stdout_of(process::command(&path).arg(version_flag))
        .with_context(|| format!("`{} {version_flag}` failed", path.display()))?;
    ensure!(
        version.contains(package),
        "`{} {version_flag}` does not name {package}: {}",
        path.display(),
        version.trim()
    );
    Ok(path)
}

/// Every shared library (and the dynamic loader) `ldd` lists for `programs`.
fn shared_libraries<'a>(programs: impl Iterator<Item = &'a Path>) -> Result<BTreeSet<PathBuf>> {
    let mut libraries = BTreeSet::new();
    for program in programs {
        let output = process::command("ldd")
            .arg(program)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("could not start `ldd {}`", program.display()))?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() && text.contains("not a dynamic executable") {
            continue;
        }
        ensure!(
            output.status.success(),
            "`ldd {}` failed ({})",
            program.display(),
            output.status
        );
        libraries.extend(parse_ldd(&text).with_context(|| format!("`ldd {}`", program.display()))?);
    }
    Ok(libraries)
}

/// The absolute paths in `ldd` output (`libc.so.6 => /lib/.../libc.so.6 (0x...)`,
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`); the vDSO has none.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in text.lines() {
        ensure!(
            !line.contains("not found"),
            "missing library: {}",
            line.trim()
        );
        if let Some(path) = line.split_whitespace().find(|word| word.starts_with('/')) {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// `'word'` for sh, with embedded quotes escaped.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The /init script: mounts, veth, lo, then every test binary in turn, then power off.
fn init_script(payload: &Payload<'_>) -> String {
    let args: Vec<String> = payload.test_args.iter().map(|a| shell_quote(a)).collect();
    let mut names: Vec<String> = payload.tests.iter().map(Artifact::vm_name).collect();
    names.sort();
    let load_veth = match payload.veth {
        Some(_) => format!("insmod /{VETH_IN_VM} || echo '{WARNING_MARKER}insmod veth.ko failed'"),
        None => format!(
            "[ -d /sys/module/veth ] || echo '{WARNING_MARKER}veth is neither built in nor shipped'"
        ),
    };
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1 LIMITER_BIN=/{LIMITER_IN_VM} LIMITER_EMULATED=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmpfs /run
mkdir -p /run/netns
mount -t tmpfs tmpfs /tmp
{load_veth}
ip link set lo up
echo "{READY_MARKER}$(uname -r)"
status=0
for name in {names}; do
    echo "{BINARY_MARKER}$name start"
    /tests/$name --test-threads=1 {args}
    rc=$?
    echo "{BINARY_MARKER}$name exit=$rc"
    [ $rc -eq 0 ] || status=1
done
echo "{DONE_MARKER}$status"
poweroff -f
"#,
        names = names.join(" "),
        args = args.join(" "),
    )
}

/// A writer of newc ("070701") cpio archives, the format the kernel unpacks as initramfs. It
/// adds each entry's missing parent directories first, so the kernel can create the entry.
struct Cpio<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Cpio {
            out,
            written: 0,
            next_inode: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn dir(&mut self, path: &str) -> io::Result<()> {
        if self.dirs.contains(path) {
            return Ok(());
        }
        self.parents(path)?;
        self.dirs.insert(path.to_owned());
        self.entry(path, 0o040_755, (0, 0), &[])
    }

    fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.parents(path)?;
        self.entry(path, 0o100_000 | perm, (0, 0), data)
    }

    fn char_device(&mut self, path: &str, major: u32, minor: u32) -> io::Result<()> {
        self.parents(path)?;
        self.entry(path, 0o020_600, (major, minor), &[])
    }

    /// Writes the trailer and flushes; returns the writer.
    fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        match path.rsplit_once('/') {
            Some((parent, _)) => self.dir(parent),
            None => Ok(()),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::other(format!("{name} is too large for cpio")))?;
        let inode = self.next_inode;
        self.next_inode += 1;
        let fields = [
            inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let header: String = fields.iter().map(|field| format!("{field:08x}")).collect();
        self.write(format!("070701{header}").as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - self.written % 4) % 4;
        self.write(&[0; 3][..padding as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn writes_newc_cpio() {
        let mut cpio = Cpio::new(Vec::new());
        cpio.file("a/b", 0o644, b"hello").unwrap();
        let archive = cpio.finish().unwrap();
        assert_eq!(archive.len() % 4, 0);
        let text = String::from_utf8_lossy(&archive);
        // The parent directory `a` comes before `a/b`, and the trailer last.
        let dir = text.find("a\0").unwrap();
        let file = text.find("a/b\0").unwrap();
        assert!(archive.starts_with(b"070701") && dir < file);
        assert!(text.contains("hello") && text.contains("TRAILER!!!\0"));
        // a/b: mode 0100644, size 5, name size 4.
        let header = &text[file - 110..file];
        assert_eq!(&header[14..22], "000081a4");
        assert_eq!(&header[54..62], "00000005");
        assert_eq!(&header[94..102], "00000004");
    }

    #[test]
    fn quotes_test_arguments() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        let tests = [Artifact {
            name: "agent".to_owned(),
            kind: "test".to_owned(),
            executable: PathBuf::from("/x"),
            test: true,
        }];
        let args = ["window".to_owned()];
        let payload = Payload {
            busybox: Path::new("/b"),
            limiter: Path::new("/l"),
            tests: &tests,
            veth: None,
            test_args: &args,
        };
        let script = init_script(&payload);
        assert!(script.contains("for name in test-agent; do"));
        assert!(script.contains("/tests/$name --test-threads=1 'window'"));
    }
}
