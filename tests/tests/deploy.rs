//! deploy/: the Kubernetes manifests and the systemd units run the agent as it needs to be run.
//! The manifests are parsed and their facts asserted (the wiring a cluster would only reveal at
//! run time: host network, bpffs, capabilities, the flags, the config each node's init container
//! writes, the headless Service its peers resolve); the units go through `systemd-analyze
//! verify`. The files are compiled in, so the test binary also runs in `cargo xtask vm-test`.
//! Needs no root.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use limiter_tests::{
    agent::limiter_bin,
    command::{run_ok, run_with_timeout},
    fixture::{TempDir, in_ci},
};
use limiter_user::{
    api::auth::read_token, cluster::config::PeerAddr, config::Config, datapath::privileges::AGENT,
};
use serde::Deserialize as _;
use serde_yaml::Value;

/// deploy/kubernetes/*.yaml, in the order `kubectl apply -f deploy/kubernetes/` applies them.
const MANIFESTS: &[(&str, &str)] = &[
    (
        "00-namespace.yaml",
        include_str!("../../deploy/kubernetes/00-namespace.yaml"),
    ),
    (
        "10-config.yaml",
        include_str!("../../deploy/kubernetes/10-config.yaml"),
    ),
    (
        "20-service.yaml",
        include_str!("../../deploy/kubernetes/20-service.yaml"),
    ),
    (
        "30-daemonset.yaml",
        include_str!("../../deploy/kubernetes/30-daemonset.yaml"),
    ),
];
const UNIT: &str = include_str!("../../packaging/limiter@.service");
const CLUSTER_DROP_IN: &str = include_str!("../../deploy/systemd/limiter@.service.d/cluster.conf");
/// The Secret the README has the operator create, and its key.
const TOKEN_SECRET: (&str, &str) = ("limiter-cluster-token", "token");

/// Every object of the manifests, by kind (one of each).
fn objects() -> Result<BTreeMap<String, Value>> {
    let mut objects = BTreeMap::new();
    for (file, text) in MANIFESTS {
        for document in serde_yaml::Deserializer::from_str(text) {
            let object = Value::deserialize(document).with_context(|| format!("parsing {file}"))?;
            let kind = object["kind"]
                .as_str()
                .with_context(|| format!("{file}: an object without a kind"))?
                .to_owned();
            ensure!(
                objects.insert(kind.clone(), object).is_none(),
                "{file}: a second {kind}"
            );
        }
    }
    Ok(objects)
}

fn str_of<'a>(value: &'a Value, what: &str) -> Result<&'a str> {
    value
        .as_str()
        .with_context(|| format!("{what} is not a string: {value:?}"))
}

fn seq_of<'a>(value: &'a Value, what: &str) -> Result<&'a Vec<Value>> {
    value
        .as_sequence()
        .with_context(|| format!("{what} is not a list: {value:?}"))
}

/// The entry of `list` whose `name` is `name`.
fn named<'a>(list: &'a Value, name: &str) -> Result<&'a Value> {
    seq_of(list, "a list of named entries")?
        .iter()
        .find(|entry| entry["name"].as_str() == Some(name))
        .with_context(|| format!("no entry named {name}"))
}

fn strings(value: &Value, what: &str) -> Result<Vec<String>> {
    seq_of(value, what)?
        .iter()
        .map(|v| str_of(v, what).map(str::to_owned))
        .collect()
}

/// The value that follows `flag` in `args`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Result<&'a str> {
    let i = args
        .iter()
        .position(|a| a == flag)
        .with_context(|| format!("no {flag} in {args:?}"))?;
    args.get(i + 1)
        .map(String::as_str)
        .with_context(|| format!("{flag} without a value in {args:?}"))
}

/// The long options `limiter agent --help` lists.
fn agent_flags() -> Result<BTreeSet<String>> {
    let help = run_ok(Command::new(limiter_bin()).args(["agent", "--help"]))?;
    let flags: BTreeSet<String> = help
        .split_whitespace()
        .filter(|word| word.starts_with("--"))
        .map(|word| {
            word.trim_end_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .to_owned()
        })
        .collect();
    ensure!(
        flags.contains("--iface") && flags.contains("--config"),
        "`{} agent --help` lists no --iface or --config: {help}",
        limiter_bin().display()
    );
    Ok(flags)
}

/// Asserts that every option in `args` is one `limiter agent` has.
fn assert_agent_flags(args: &[String], what: &str) -> Result<()> {
    let flags = agent_flags()?;
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        let flag = arg.split('=').next().unwrap_or(arg);
        ensure!(
            flags.contains(flag),
            "{what} passes {flag}, which `limiter agent` does not have"
        );
    }
    Ok(())
}

/// The pod template's container (or init container, `init`) `name`.
fn container<'a>(daemonset: &'a Value, name: &str, init: bool) -> Result<&'a Value> {
    let list = if init { "initContainers" } else { "containers" };
    named(&daemonset["spec"]["template"]["spec"][list], name)
        .with_context(|| format!("the DaemonSet's {list}"))
}

/// The pod volume mounted at `mount_path` in `container`.
fn volume_at<'a>(daemonset: &'a Value, container: &Value, mount_path: &str) -> Result<&'a Value> {
    let mount = seq_of(&container["volumeMounts"], "volumeMounts")?
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(mount_path))
        .with_context(|| format!("nothing is mounted at {mount_path}"))?;
    named(
        &daemonset["spec"]["template"]["spec"]["volumes"],
        str_of(&mount["name"], "a mount's volume")?,
    )
}

#[test]
fn the_manifests_are_every_file_in_deploy_kubernetes() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    if !dir.is_dir() {
        // vm-test: the test binary runs without the source tree (the files are compiled in).
        eprintln!("skipped: no {} here", dir.display());
        return Ok(());
    }
    let mut on_disk: Vec<String> = fs::read_dir(&dir)?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    on_disk.retain(|name| name.ends_with(".yaml") || name.ends_with(".yml"));
    on_disk.sort();
    let tested: Vec<&str> = MANIFESTS.iter().map(|(name, _)| *name).collect();
    assert_eq!(on_disk, tested, "a manifest this test does not read");
    let kinds: Vec<String> = objects()?.into_keys().collect();
    assert_eq!(kinds, ["ConfigMap", "DaemonSet", "Namespace", "Service"]);
    Ok(())
}

#[test]
fn the_daemonset_runs_the_agent_on_the_host_network_with_only_its_capabilities() -> Result<()> {
    let objects = objects()?;
    let namespace = str_of(&objects["Namespace"]["metadata"]["name"], "the namespace")?;
    for (kind, object) in &objects {
        if kind != "Namespace" {
            assert_eq!(
                object["metadata"]["namespace"].as_str(),
                Some(namespace),
                "{kind}"
            );
        }
    }
    let daemonset = &objects["DaemonSet"];
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostNetwork"].as_bool(),
        Some(true),
        "XDP attaches to the node's interface"
    );
    assert_eq!(
        pod["dnsPolicy"].as_str(),
        Some("ClusterFirstWithHostNet"),
        "a hostNetwork pod resolves the peers' Service name only with it"
    );
    let agent = container(daemonset, "agent", false)?;
    let security = &agent["securityContext"];
    assert_ne!(security["privileged"].as_bool(), Some(true));
    assert_eq!(strings(&security["capabilities"]["drop"], "drop")?, ["ALL"]);
    let added: BTreeSet<String> = strings(&security["capabilities"]["add"], "add")?
        .into_iter()
        .collect();
    let needed: BTreeSet<String> = AGENT
        .iter()
        .map(|need| {
            need.capability
                .to_string()
                .trim_start_matches("CAP_")
                .to_owned()
        })
        .collect();
    assert_eq!(
        added, needed,
        "the capabilities the agent checks for at start, no more"
    );
    assert_eq!(
        security["seccompProfile"]["type"].as_str(),
        Some("Unconfined")
    );

    let mut args = strings(&agent["command"], "command")?;
    ensure!(
        args.first().is_some_and(|c| c.ends_with("/limiter")),
        "the agent container runs {args:?}"
    );
    args.extend(strings(&agent["args"], "args")?);
    assert_eq!(args[1], "agent");
    assert_agent_flags(&args, "the DaemonSet")?;
    // `$(VAR)` in args is expanded by the kubelet from the container's env; an unknown one is
    // passed on as it is written.
    for arg in &args {
        if let Some(var) = arg.strip_prefix("$(").and_then(|v| v.strip_suffix(')')) {
            named(&agent["env"], var).with_context(|| format!("{arg} is not in the env"))?;
        }
    }

    // The pins: the host's bpffs at the path the agent pins under.
    let bpffs = volume_at(daemonset, agent, "/sys/fs/bpf")?;
    assert_eq!(bpffs["hostPath"]["path"].as_str(), Some("/sys/fs/bpf"));
    let mount = seq_of(&agent["volumeMounts"], "volumeMounts")?
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/sys/fs/bpf"))
        .context("bpffs mount")?;
    assert_ne!(
        mount["readOnly"].as_bool(),
        Some(true),
        "the agent pins there"
    );
    // Mounts made on the host after the pod started (bpffs itself) reach the pod; Bidirectional
    // would need a privileged container.
    assert_eq!(mount["mountPropagation"].as_str(), Some("HostToContainer"));
    // The state directory and the socket's outlive the pod, on the node.
    let state = volume_at(daemonset, agent, flag_value(&args, "--state-dir")?)?;
    assert_eq!(state["hostPath"]["path"].as_str(), Some("/var/lib/limiter"));
    let run = volume_at(daemonset, agent, "/run/limiter")?;
    assert_eq!(run["hostPath"]["path"].as_str(), Some("/run/limiter"));
    Ok(())
}

#[test]
fn the_headless_service_lists_every_agent_ready_or_not() -> Result<()> {
    let objects = objects()?;
    let service = &objects["Service"];
    assert_eq!(service["spec"]["clusterIP"].as_str(), Some("None"));
    assert_eq!(
        service["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true)
    );
    let labels = &objects["DaemonSet"]["spec"]["template"]["metadata"]["labels"];
    let selector = service["spec"]["selector"]
        .as_mapping()
        .context("the Service has no selector")?;
    ensure!(!selector.is_empty(), "an empty selector");
    for (key, value) in selector {
        assert_eq!(
            &labels[key], value,
            "the Service selects the agents' pods by {key:?}"
        );
    }
    let port = named(&service["spec"]["ports"], "peer")?;
    let agent = container(&objects["DaemonSet"], "agent", false)?;
    assert_eq!(
        port["targetPort"],
        named(&agent["ports"], "peer")?["containerPort"],
        "the Service's peer port is the agent's"
    );
    Ok(())
}

/// Runs the init container's script as the kubelet would, each volume a directory of `root`
/// (the ConfigMap's items written in), with the downward API's `node_name` and `pod_ip`;
/// returns the config the agent container reads at its `--config`.
fn render_config(
    objects: &BTreeMap<String, Value>,
    root: &Path,
    node_name: &str,
    pod_ip: &str,
) -> Result<String> {
    let daemonset = &objects["DaemonSet"];
    let init = container(daemonset, "config", true)?;
    let env = &init["env"];
    assert_eq!(
        named(env, "NODE_NAME")?["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("spec.nodeName")
    );
    assert_eq!(
        named(env, "POD_IP")?["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("status.podIP")
    );
    let volumes = &daemonset["spec"]["template"]["spec"]["volumes"];
    // Each container sees a volume at its own mount path; here it is root/VOLUME.
    let local = |container: &Value, path: &str| -> Result<String> {
        let mut mounts: Vec<(&str, &str)> = seq_of(&container["volumeMounts"], "volumeMounts")?
            .iter()
            .map(|m| {
                Ok((
                    str_of(&m["mountPath"], "mountPath")?,
                    str_of(&m["name"], "name")?,
                ))
            })
            .collect::<Result<_>>()?;
        mounts.sort_by_key(|(mount, _)| std::cmp::Reverse(mount.len()));
        let mut path = path.to_owned();
        for (mount, volume) in mounts {
            path = path.replace(mount, &root.join(volume).to_string_lossy());
        }
        Ok(path)
    };
    for volume in seq_of(volumes, "volumes")? {
        let dir = root.join(str_of(&volume["name"], "a volume's name")?);
        fs::create_dir_all(&dir)?;
        if let Some(config_map) = volume.get("configMap") {
            let data = &objects["ConfigMap"];
            assert_eq!(config_map["name"], data["metadata"]["name"]);
            for item in seq_of(&config_map["items"], "items")? {
                let text = str_of(
                    &data["data"][str_of(&item["key"], "key")?],
                    "a ConfigMap key",
                )?;
                fs::write(dir.join(str_of(&item["path"], "path")?), text)?;
            }
        }
    }
    let mut command = strings(&init["command"], "command")?;
    command.extend(strings(&init["args"], "args")?);
    ensure!(
        command.len() == 3 && command[1] == "-c",
        "the init container runs {command:?}"
    );
    let script = local(init, &command[2])?;
    let out = run_with_timeout(
        Command::new(&command[0])
            .args(["-c", &script])
            .env("NODE_NAME", node_name)
            .env("POD_IP", pod_ip),
        Duration::from_secs(10),
    )?;
    ensure!(
        out.status.success(),
        "the init container's script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent = container(daemonset, "agent", false)?;
    let args = strings(&agent["args"], "args")?;
    let config = local(agent, flag_value(&args, "--config")?)?;
    fs::read_to_string(&config).with_context(|| format!("the agent's --config {config}"))
}

#[test]
fn each_node_gets_a_config_the_agent_accepts_naming_it_and_its_peers() -> Result<()> {
    let objects = objects()?;
    let service = &objects["Service"];
    let peers_name = format!(
        "{}.{}.svc.cluster.local",
        str_of(&service["metadata"]["name"], "the Service's name")?,
        str_of(&service["metadata"]["namespace"], "the Service's namespace")?
    );
    let port = named(&service["spec"]["ports"], "peer")?["port"]
        .as_u64()
        .context("the Service's peer port")? as u16;
    let daemonset = &objects["DaemonSet"];
    let agent = container(daemonset, "agent", false)?;
    for (node_name, pod_ip, listen) in [
        (
            "ip-10-0-1-23.eu-west-1.compute.internal",
            "10.0.1.23",
            "10.0.1.23",
        ),
        ("1234", "fd00:10::17", "[fd00:10::17]"),
    ] {
        let root = TempDir::new("deploy")?;
        let text = render_config(&objects, &root.0, node_name, pod_ip)?;
        let config = Config::parse(&text).map_err(|e| anyhow::anyhow!("{e}: {text}"))?;
        ensure!(
            config.warnings.is_empty(),
            "warnings: {:?}",
            config.warnings
        );
        let cluster = config
            .cluster
            .context("the config has no cluster: section")?;
        assert_eq!(cluster.node_id.as_str(), node_name);
        assert_eq!(cluster.listen, format!("{listen}:{port}").parse()?);
        assert_eq!(
            cluster.peers,
            [PeerAddr::Dns {
                name: peers_name.clone(),
                port
            }],
            "every agent, through the headless Service"
        );
        // The token: the Secret's key, at the path the config names, with the mode the
        // kubelet gives it, read as the agent reads it.
        let token_file = cluster.token_file.context("no token_file")?;
        let dir = token_file.parent().context("token_file")?.to_string_lossy();
        let secret = volume_at(daemonset, agent, &dir)?;
        assert_eq!(
            secret["secret"]["secretName"].as_str(),
            Some(TOKEN_SECRET.0)
        );
        assert_eq!(token_file.file_name(), Some(TOKEN_SECRET.1.as_ref()));
        let mode = secret["secret"]["defaultMode"]
            .as_u64()
            .context("defaultMode")? as u32;
        let token = root.write("token", "0123456789abcdef0123\n")?;
        fs::set_permissions(&token, fs::Permissions::from_mode(mode))?;
        assert_eq!(read_token(Path::new(&token))?, "0123456789abcdef0123");
    }
    Ok(())
}

#[test]
fn the_systemd_unit_verifies_with_and_without_the_cluster_drop_in() -> Result<()> {
    let exec_start = UNIT
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .context("the unit has no ExecStart")?;
    let args: Vec<String> = exec_start.split_whitespace().map(str::to_owned).collect();
    assert_eq!(args.get(1).map(String::as_str), Some("agent"));
    assert_agent_flags(&args, "packaging/limiter@.service")?;

    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        let emulated = std::env::var_os("LIMITER_EMULATED").is_some();
        assert!(
            emulated || !in_ci(),
            "systemd-analyze is missing: `cargo xtask setup` installs it (Debian's systemd)"
        );
        eprintln!("skipped: no systemd-analyze (Debian's systemd package)");
        return Ok(());
    };
    // The binary the unit runs must exist for `verify`: the one under test stands in for
    // /usr/local/bin/limiter.
    let unit = UNIT.replace(&args[0], &limiter_bin().to_string_lossy());
    for drop_in in [None, Some(CLUSTER_DROP_IN)] {
        let dir = TempDir::new("deploy-unit")?;
        dir.write("limiter@.service", &unit)?;
        if let Some(text) = drop_in {
            fs::create_dir(dir.join("limiter@.service.d"))?;
            dir.write("limiter@.service.d/cluster.conf", text)?;
        }
        // An instance: `verify` checks what %i and %I expand to, and reads the template's
        // drop-ins beside it.
        std::os::unix::fs::symlink("limiter@.service", dir.join("limiter@eth0.service"))?;
        let out = run_with_timeout(
            Command::new(analyze)
                .arg("verify")
                .arg(dir.join("limiter@eth0.service")),
            Duration::from_secs(60),
        )?;
        // Unknown keys and bad values are only warnings (exit 0): any output fails the test.
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() || !said.trim().is_empty() {
            bail!(
                "systemd-analyze verify limiter@eth0.service ({}): {said}",
                if drop_in.is_some() {
                    "with deploy/systemd's cluster drop-in"
                } else {
                    "alone"
                }
            );
        }
    }
    Ok(())
}
