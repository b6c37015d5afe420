//! Network access for runners of environments with `networkAccess: true`.
//!
//! Each such runner gets a veth pair: `eth0` inside, the other end on this instance's bridge.
//! One nftables table (`inet trident`, shared by every trident instance on the host) does the
//! rest: masquerade to the outside world; drop whatever a runner sends to the host itself,
//! to other runners, to loopback, private, shared, link-local (cloud metadata) and multicast
//! ranges, and to the host's own networks; let DNS through to the configured resolvers only;
//! and map exposed ports (a host port → runner address and port, in an nftables map).
//!
//! Why `ip` and `nft` rather than netlink crates: a few idempotent commands, readable in a
//! log and reproducible by an operator by hand, run once per runner at creation time.

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

/// The nftables table every instance shares.
const TABLE: &str = "trident";
/// Host-side interfaces and bridges all start with this, so one rule covers every instance.
pub const IF_PREFIX: &str = "tr-";

/// Ranges a runner may never reach (besides the host, which the input hook covers).
const BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// The `network:` section of the config file, as an operator writes it: everything optional,
/// the rest found on the host by [`NetworkSettings::resolve`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSettings {
    /// false: environments with network access are refused.
    pub enabled: bool,
    /// The /16 runners of this instance get addresses from (default: 10.x.0.0 with x
    /// derived from the instance id).
    pub subnet: Option<Ipv4Addr>,
    /// Resolvers for runners (default: the host's non-loopback IPv4 nameservers).
    pub dns: Option<Vec<Ipv4Addr>>,
    /// The address in `mappedPorts[].hostAddress` (default: the host's first non-loopback
    /// IPv4 address).
    pub advertise_address: Option<String>,
    /// Host ports for exposed ports, e.g. `30000-39999`.
    pub host_ports: String,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        NetworkSettings {
            enabled: true,
            subnet: None,
            dns: None,
            advertise_address: None,
            host_ports: "30000-39999".into(),
        }
    }
}

impl NetworkSettings {
    /// The host ports as a range, or why they are not one.
    pub fn host_port_range(&self) -> Result<(u16, u16), String> {
        let range = &self.host_ports;
        range
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
            .filter(|(a, b): &(u16, u16)| a <= b && *a > 0)
            .ok_or_else(|| format!("network.host_ports must look like 30000-39999, not {range:?}"))
    }

    /// The settings of the instance whose id is `instance` (see `native::instance_id`), with
    /// what the operator left out taken from the host; None when network access is off.
    pub fn resolve(&self, instance: &str) -> Result<Option<NetworkConfig>, String> {
        if !self.enabled {
            return Ok(None);
        }
        // Instances on one host get different subnets unless told otherwise.
        let x = 200 + u8::from_str_radix(instance.get(..2).unwrap_or("00"), 16).unwrap_or(0) % 50;
        let subnet = self.subnet.unwrap_or(Ipv4Addr::new(10, x, 0, 0));
        let dns = self.dns.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/resolv.conf")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.strip_prefix("nameserver"))
                .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
                .filter(|a| !a.is_loopback())
                .collect()
        });
        let advertise = match &self.advertise_address {
            Some(address) => address.clone(),
            None => primary_ipv4().unwrap_or_else(|| "127.0.0.1".into()),
        };
        Ok(Some(NetworkConfig {
            bridge: format!("{IF_PREFIX}{}", &instance[..12.min(instance.len())]),
            subnet,
            dns,
            advertise,
            ports: self.host_port_range()?,
        }))
    }
}

/// The source address of the host's default route.
fn primary_ipv4() -> Option<String> {
    let output = Command::new("ip")
        .args(["-o", "-4", "route", "get", "192.0.2.255"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "src")?;
    words.next().map(String::from)
}

/// Network settings of one trident instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// This instance's bridge, e.g. `tr-1a2b3c4d`.
    pub bridge: String,
    /// The bridge's /16; runners get addresses from it (slot n → base + 2 + n).
    pub subnet: Ipv4Addr,
    /// Resolvers written to runners' /etc/resolv.conf and let through the firewall.
    pub dns: Vec<Ipv4Addr>,
    /// The host address clients reach exposed ports on (`mappedPorts[].hostAddress`).
    pub advertise: String,
    /// Host ports handed out for exposed ports.
    pub ports: (u16, u16),
}

impl NetworkConfig {
    pub fn gateway(&self) -> Ipv4Addr {
        offset(self.subnet, 1)
    }

    pub fn address(&self, slot: u32) -> Option<Ipv4Addr> {
        (slot < 65_000).then(|| offset(self.subnet, 2 + slot))
    }
}

fn offset(base: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n)
}

/// What one runner's network looks like (in its spec, so that it survives restarts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerNetwork {
    pub bridge: String,
    /// The host end of the veth pair.
    pub host_if: String,
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    /// (exposed port inside, host port)
    pub ports: Vec<(u16, u16)>,
}

fn run(program: &str, args: &[&str]) -> io::Result<()> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::other(format!("{program}: {e}")))?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

fn nft(script: &str) -> io::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::other(format!("nft (is the nftables package installed?): {e}")))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "nft: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// The host's own IPv4 networks (they are as private to a runner as RFC 1918 ones).
fn host_networks() -> Vec<String> {
    let Ok(output) = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| {
            !l.split_whitespace()
                .nth(1)
                .unwrap_or("")
                .starts_with(IF_PREFIX)
        })
        .filter_map(|l| {
            let cidr = l.split_whitespace().nth(3)?;
            let (addr, prefix) = cidr.split_once('/')?;
            let addr: Ipv4Addr = addr.parse().ok()?;
            let prefix: u32 = prefix.parse().ok()?;
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            Some(format!(
                "{}/{prefix}",
                Ipv4Addr::from(u32::from(addr) & mask)
            ))
        })
        .collect()
}

/// A name for the host's network namespace (`/run/netns/trident-host`), so that runner-init,
/// already inside a runner's namespace, can hand the host end of a veth pair back to it.
const HOST_NETNS: &str = "trident-host";

fn name_host_netns() -> io::Result<()> {
    let works = Command::new("ip")
        .args(["-n", HOST_NETNS, "link", "show", "lo"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if works {
        return Ok(());
    }
    let path = std::path::Path::new("/run/netns").join(HOST_NETNS);
    std::fs::create_dir_all("/run/netns")?;
    std::fs::write(&path, b"")?;
    nix::mount::mount(
        Some("/proc/self/ns/net"),
        &path,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| io::Error::other(format!("naming the host's network namespace: {e}")))
}

/// Prepares the host once per server start: forwarding, the shared firewall table (made if
/// missing, never torn down: other instances may use it), this instance's bridge.
pub fn setup_host(config: &NetworkConfig) -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
    name_host_netns()?;
    let exists = Command::new("nft")
        .args(["list", "table", "inet", TABLE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .map_err(|e| io::Error::other(format!("nft (is the nftables package installed?): {e}")))?;
    if !exists {
        let blocked = BLOCKED.join(", ");
        nft(&format!(
            r#"table inet {TABLE} {{
    set blocked {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {blocked} }} }}
    set dns {{ type ifname . ipv4_addr; }}
    map ports {{ type inet_service : ipv4_addr . inet_service; }}
    chain prerouting {{
        type nat hook prerouting priority -100;
        fib daddr type local dnat ip to tcp dport map @ports
    }}
    chain output {{
        type nat hook output priority -100;
        fib daddr type local dnat ip to tcp dport map @ports
    }}
    chain postrouting {{
        type nat hook postrouting priority 100;
        iifname "{IF_PREFIX}*" oifname != "{IF_PREFIX}*" masquerade
        oifname "{IF_PREFIX}*" ct status dnat masquerade
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        ct status dnat accept
        iifname "{IF_PREFIX}*" oifname "{IF_PREFIX}*" drop
        iifname "{IF_PREFIX}*" meta nfproto ipv6 drop
        {DNS_RULE}
        iifname "{IF_PREFIX}*" ip daddr @blocked drop
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{IF_PREFIX}*" ct state established,related accept
        iifname "{IF_PREFIX}*" drop
    }}
}}
"#
        ))?;
    }
    // The host's own networks as they are now (interfaces come and go), replacing what an
    // earlier start put there.
    let mut blocked: Vec<String> = BLOCKED.iter().map(|b| b.to_string()).collect();
    blocked.extend(
        host_networks()
            .into_iter()
            .filter(|n| !n.starts_with("127.")),
    );
    let script = format!(
        "flush set inet {TABLE} blocked\nadd element inet {TABLE} blocked {{ {} }}\n",
        blocked.join(", ")
    );
    nft(&script)?;
    migrate_dns_set()?;
    // Resolvers are keyed by this instance's bridge: a runner reaches its own instance's
    // resolvers only. What an earlier life of this instance added goes first.
    remove_resolvers(&config.bridge)?;
    if !config.dns.is_empty() {
        let elements: Vec<String> = config
            .dns
            .iter()
            .map(|dns| format!("\"{}\" . {dns}", config.bridge))
            .collect();
        nft(&format!(
            "add element inet {TABLE} dns {{ {} }}\n",
            elements.join(", ")
        ))?;
    }
    remove_stale_bridges(config)?;
    let bridge_exists = std::path::Path::new("/sys/class/net")
        .join(&config.bridge)
        .exists();
    if !bridge_exists {
        run("ip", &["link", "add", &config.bridge, "type", "bridge"])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/16", config.gateway()),
                "dev",
                &config.bridge,
            ],
        )?;
    }
    // Exposed ports may be advertised on a loopback address: let packets the host sends from
    // it be routed to the bridge (masquerading then gives them the bridge's address).
    std::fs::write(
        format!("/proc/sys/net/ipv4/conf/{}/route_localnet", config.bridge),
        "1",
    )?;
    run("ip", &["link", "set", &config.bridge, "up"])
}

/// Whether a bridge has no runner attached.
fn bridge_is_empty(bridge: &str) -> bool {
    std::fs::read_dir(
        std::path::Path::new("/sys/class/net")
            .join(bridge)
            .join("brif"),
    )
    .map(|mut ports| ports.next().is_none())
    .unwrap_or(true)
}

/// Bridges of earlier trident instances that still hold this instance's subnet would steal
/// its routes: removed when no runner uses them any more, refused otherwise.
fn remove_stale_bridges(config: &NetworkConfig) -> io::Result<()> {
    let output = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()?;
    let gateway = format!("{}/16", config.gateway());
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let mut words = line.split_whitespace();
        let Some(name) = words.nth(1) else { continue };
        if !name.starts_with(IF_PREFIX) || name == config.bridge {
            continue;
        }
        if words.nth(1) != Some(gateway.as_str()) {
            continue;
        }
        if !bridge_is_empty(name) {
            return Err(io::Error::other(format!(
                "the subnet {}/16 is in use by bridge {name} of another trident instance: set network.subnet",
                config.subnet
            )));
        }
        run("ip", &["link", "del", name])?;
    }
    Ok(())
}

/// The rule that lets a runner's DNS through to its own instance's resolvers.
const DNS_RULE: &str = "iifname . ip daddr @dns meta l4proto { tcp, udp } th dport 53 accept";

/// Tables made by trident before resolvers were keyed by bridge had one flat set that every
/// runner of every instance could reach, and that kept resolvers of instances long gone:
/// replaced by the keyed one, in place (the other rules stay).
fn migrate_dns_set() -> io::Result<()> {
    let set = Command::new("nft")
        .args(["list", "set", "inet", TABLE, "dns"])
        .output()?;
    let text = String::from_utf8_lossy(&set.stdout);
    if !set.status.success() || text.contains("ifname") {
        return Ok(());
    }
    let chain = Command::new("nft")
        .args(["-a", "list", "chain", "inet", TABLE, "forward"])
        .output()?;
    let chain = String::from_utf8_lossy(&chain.stdout).into_owned();
    let handle = |needle: &str| -> Option<String> {
        chain
            .lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.rsplit("# handle ").next())
            .map(|h| h.trim().to_string())
    };
    let (Some(old_rule), Some(blocked_rule)) = (handle("@dns"), handle("@blocked drop")) else {
        return Err(io::Error::other(
            "the nftables table inet trident has an unexpected shape: delete it (nft delete table inet trident) and restart trident",
        ));
    };
    nft(&format!(
        "delete rule inet {TABLE} forward handle {old_rule}\n\
         delete set inet {TABLE} dns\n\
         add set inet {TABLE} dns {{ type ifname . ipv4_addr; }}\n\
         insert rule inet {TABLE} forward position {blocked_rule} {DNS_RULE}\n"
    ))
}

/// Removes the resolvers of `bridge` from the shared set.
fn remove_resolvers(bridge: &str) -> io::Result<()> {
    let set = Command::new("nft")
        .args(["list", "set", "inet", TABLE, "dns"])
        .output()?;
    let text = String::from_utf8_lossy(&set.stdout);
    let Some(elements) = text.split_once("elements = {").map(|(_, rest)| rest) else {
        return Ok(());
    };
    let elements = elements.split('}').next().unwrap_or_default();
    let mine: Vec<&str> = elements
        .split(',')
        .map(str::trim)
        .filter(|e| e.starts_with(&format!("\"{bridge}\"")))
        .collect();
    if mine.is_empty() {
        return Ok(());
    }
    nft(&format!(
        "delete element inet {TABLE} dns {{ {} }}\n",
        mine.join(", ")
    ))
}

/// Gives back what this instance added to the host (on a shutdown that destroyed the
/// runners): its resolvers in the shared set, and its bridge, once the runners' ends of it
/// are gone (network namespaces die a moment after their last process).
pub fn teardown_host(config: &NetworkConfig) {
    if let Err(e) = remove_resolvers(&config.bridge) {
        tracing::warn!(error = %e, "removing this instance's resolvers from the firewall");
    }
    let bridge = std::path::Path::new("/sys/class/net").join(&config.bridge);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while bridge.exists()
        && !bridge_is_empty(&config.bridge)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if bridge.exists() {
        if let Err(e) = run("ip", &["link", "del", &config.bridge]) {
            tracing::warn!(error = %e, bridge = %config.bridge, "removing this instance's bridge");
        }
    }
}

/// Removes the host end of a destroyed runner's veth pair at once (the kernel would, when
/// the runner's network namespace is freed, a moment later).
pub fn disconnect_runner(network: &RunnerNetwork) {
    let exists = std::path::Path::new("/sys/class/net")
        .join(&network.host_if)
        .exists();
    if exists {
        let _ = run("ip", &["link", "del", &network.host_if]);
    }
}

/// Runs in runner-init before its root file system (root on the host, already in the
/// runner's fresh network namespace): makes the veth pair, hands one end to the host's bridge, addresses the other.
pub fn connect_runner(network: &RunnerNetwork) -> io::Result<()> {
    run(
        "ip",
        &[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            &network.host_if,
        ],
    )?;
    run(
        "ip",
        &["link", "set", &network.host_if, "netns", HOST_NETNS],
    )?;
    // Isolated bridge ports reach the bridge (the way out) but never each other: runners
    // cannot talk to runners, even at layer 2.
    run(
        "ip",
        &[
            "-n",
            HOST_NETNS,
            "link",
            "set",
            &network.host_if,
            "master",
            &network.bridge,
        ],
    )?;
    run(
        "ip",
        &[
            "-n",
            HOST_NETNS,
            "link",
            "set",
            &network.host_if,
            "type",
            "bridge_slave",
            "isolated",
            "on",
        ],
    )?;
    run(
        "ip",
        &["-n", HOST_NETNS, "link", "set", &network.host_if, "up"],
    )?;
    run(
        "ip",
        &[
            "addr",
            "add",
            &format!("{}/16", network.address),
            "dev",
            "eth0",
        ],
    )?;
    run("ip", &["link", "set", "eth0", "up"])?;
    run(
        "ip",
        &[
            "route",
            "add",
            "default",
            "via",
            &network.gateway.to_string(),
        ],
    )
}

/// Publishes a runner's exposed ports on the host.
pub fn map_ports(network: &RunnerNetwork) -> io::Result<()> {
    if network.ports.is_empty() {
        return Ok(());
    }
    let elements: Vec<String> = network
        .ports
        .iter()
        .map(|(inside, host)| format!("{host} : {} . {inside}", network.address))
        .collect();
    nft(&format!(
        "add element inet {TABLE} ports {{ {} }}\n",
        elements.join(", ")
    ))
}

/// Withdraws a runner's exposed ports and its end of the bridge.
pub fn unmap_ports(network: &RunnerNetwork) {
    disconnect_runner(network);
    for (_, host) in &network.ports {
        let _ = nft(&format!("delete element inet {TABLE} ports {{ {host} }}\n"));
    }
}

/// Whether a host port is free: nothing listens on it here.
pub fn host_port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}
