//! Builds the eBPF crate for the BPF target and leaves the object in OUT_DIR, where `src/ebpf.rs`
//! embeds it with `include_bytes_aligned!` (and, with the `bench` feature, a second object with
//! the benchmark programs); and generates the gRPC code for `proto/limiter.proto`
//! (compiled by protox, in pure Rust, so the build needs no `protoc`).
//!
//! Toolchain (installed by `cargo xtask setup`): Debian's rustc-web ships a prebuilt `core` for
//! bpfel-unknown-none, linked into rustup as the `system` toolchain, and bpf-linker links.

use std::path::PathBuf;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = PathBuf::from(manifest_dir).join("..").join("limiter-ebpf");
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("finding the eBPF crate at {}", ebpf_dir.display()))?;
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("the eBPF crate's path is not UTF-8")?;
    let common_dir = ebpf_dir.replace("limiter-ebpf", "limiter-common");
    compile_proto(&ebpf_dir.replace("limiter-ebpf", "proto"))?;
    println!("cargo:rerun-if-changed={common_dir}");

    // aya-ebpf needs two nightly features and limiter-ebpf (its bin crate is named `limiter`) needs
    // `core_intrinsics` (BPF atomics);
    // unlock them for these two crates alone. aya-build's spawned cargo inherits this.
    // SAFETY: the build script is single-threaded here.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf,limiter") };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR not set")?);
    // With our `bench` feature, first the object with limiter-ebpf's benchmark programs (aya-build
    // names its output after the binary, `limiter`: move it aside), then the production object,
    // which never has them.
    if std::env::var_os("CARGO_FEATURE_BENCH").is_some() {
        build_object(ebpf_dir, &["bench"])?;
        let (built, bench) = (out_dir.join("limiter"), out_dir.join("limiter-bench"));
        std::fs::rename(&built, &bench)
            .with_context(|| format!("moving {} to {}", built.display(), bench.display()))?;
    }
    build_object(ebpf_dir, &[])
}

/// Builds limiter-ebpf with `features` into OUT_DIR/limiter.
fn build_object(ebpf_dir: &str, features: &[&str]) -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [Package {
            name: "limiter-ebpf",
            root_dir: ebpf_dir,
            features,
            ..Default::default()
        }],
        Toolchain::Custom("system"),
    )
    .with_context(|| {
        format!(
            "building the eBPF program (limiter-ebpf, features {features:?}) failed; run `cargo \
             xtask setup` to install the system Rust toolchain for bpfel-unknown-none and \
             bpf-linker"
        )
    })
}

/// Generates the messages and the tonic clients and servers of `limiter.proto` into OUT_DIR, with
/// the encoded descriptor set that server reflection serves.
fn compile_proto(proto_dir: &str) -> anyhow::Result<()> {
    let proto = format!("{proto_dir}/limiter.proto");
    let cluster = format!("{proto_dir}/cluster.proto");
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed={cluster}");
    let descriptors = protox::compile([&proto, &cluster], [proto_dir])
        .with_context(|| format!("compiling {proto} and {cluster}"))?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR not set")?);
    // Reflection on the API serves the API's files only: the peer service is not on the API.
    let mut api_files = descriptors.clone();
    api_files.file.retain(|f| f.name() != "cluster.proto");
    std::fs::write(
        out_dir.join("limiter_descriptor.bin"),
        prost::Message::encode_to_vec(&api_files),
    )
    .context("writing limiter_descriptor.bin")?;
    // The peer service decodes with a codec of its own (`cluster::node::wire`), which refuses
    // a heartbeat of too many clients before prost allocates them.
    let (mut api, mut peer) = (descriptors.clone(), descriptors);
    api.file.retain(|f| f.name() != "cluster.proto");
    peer.file.retain(|f| f.name() == "cluster.proto");
    tonic_prost_build::configure()
        .compile_fds(api)
        .with_context(|| format!("generating Rust code for {proto}"))?;
    tonic_prost_build::configure()
        .codec_path("crate::cluster::node::wire::PeerCodec")
        .compile_fds(peer)
        .with_context(|| format!("generating Rust code for {cluster}"))
}
