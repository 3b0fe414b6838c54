//! Transparent interception: the `nat` rules that send a pod's TCP through the proxy.
//!
//! `sluice-proxy init-iptables` runs these once, as the pod's first init container,
//! before the proxy and the application start. The chains follow Istio's layout:
//!
//! ```text
//! PREROUTING -p tcp -> SLUICE_INBOUND   (inbound: everything but skipped ports)
//!                        -> SLUICE_IN_REDIRECT -> REDIRECT --to-ports <inbound>
//! OUTPUT     -p tcp -> SLUICE_OUTBOUND  (outbound: not the proxy, not loopback,
//!                                        not skipped ports/CIDRs)
//!                        -> SLUICE_REDIRECT    -> REDIRECT --to-ports <outbound>
//! ```
//!
//! Invariants, each with a test below:
//! - traffic of the proxy's own uid is never redirected (its upstream connections and
//!   its deliveries to the app on 127.0.0.1 would otherwise loop back into it);
//! - loopback traffic is never redirected (the app talking to itself, the proxy
//!   delivering inbound traffic);
//! - the admin port is never intercepted, so kubelet probes and Prometheus reach it;
//! - only TCP is touched: DNS over UDP goes out as it is;
//! - [`apply`] is idempotent: it creates or flushes its own chains and adds each jump
//!   from a built-in chain only when it is not there yet, so a restarted init
//!   container leaves exactly one copy of every rule.
//!
//! The init container's flags map one to one onto [`InterceptConfig`]:
//! `--outbound-port 15001 --inbound-port 15006 --proxy-uid 1337 --admin-port 15000
//! [--skip-outbound-ports 5432,6379] [--skip-inbound-ports 9100]
//! [--skip-outbound-cidrs 10.0.0.0/8,169.254.169.254/32]`.

use std::process::Command;

/// Chain that decides which inbound connections the proxy takes.
pub const INBOUND_CHAIN: &str = "SLUICE_INBOUND";
/// Chain that redirects inbound connections to the inbound listener.
pub const IN_REDIRECT_CHAIN: &str = "SLUICE_IN_REDIRECT";
/// Chain that decides which outbound connections the proxy takes.
pub const OUTBOUND_CHAIN: &str = "SLUICE_OUTBOUND";
/// Chain that redirects outbound connections to the outbound listener.
pub const REDIRECT_CHAIN: &str = "SLUICE_REDIRECT";

/// The chains [`rules`] creates, in creation order.
pub const CHAINS: [&str; 4] = [
    REDIRECT_CHAIN,
    IN_REDIRECT_CHAIN,
    INBOUND_CHAIN,
    OUTBOUND_CHAIN,
];

/// `iptables -m multiport` takes at most 15 ports per rule.
const MULTIPORT_MAX: usize = 15;

/// What to intercept and what to leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptConfig {
    /// Where outbound connections are redirected (the outbound listener).
    pub outbound_port: u16,
    /// Where inbound connections are redirected (the inbound listener).
    pub inbound_port: u16,
    /// The proxy's uid: its own connections are never redirected.
    pub proxy_uid: u32,
    /// The admin port: never intercepted inbound.
    pub admin_port: u16,
    /// Destination ports whose outbound connections bypass the proxy.
    pub skip_outbound_ports: Vec<u16>,
    /// Destination ports whose inbound connections bypass the proxy.
    pub skip_inbound_ports: Vec<u16>,
    /// Destination CIDRs (`10.0.0.0/8`, IPv4) whose outbound connections bypass the proxy.
    pub skip_outbound_cidrs: Vec<String>,
}

impl Default for InterceptConfig {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_uid: 1337,
            admin_port: 15000,
            skip_outbound_ports: Vec::new(),
            skip_inbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
        }
    }
}

/// Why the rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("cannot run {bin}: {source}")]
    Spawn { bin: String, source: std::io::Error },
    #[error("`{bin} {args}` failed ({status}): {stderr}")]
    Failed {
        bin: String,
        args: String,
        status: String,
        stderr: String,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl InterceptConfig {
    /// Refuses a configuration whose rules would be wrong rather than merely useless.
    pub fn check(&self) -> Result<(), IptablesError> {
        let ports = [
            ("outbound port", self.outbound_port),
            ("inbound port", self.inbound_port),
            ("admin port", self.admin_port),
        ];
        if let Some((name, _)) = ports.iter().find(|(_, p)| *p == 0) {
            return Err(IptablesError::Config(format!("the {name} must not be 0")));
        }
        if self.outbound_port == self.inbound_port {
            return Err(IptablesError::Config(format!(
                "the outbound and inbound ports must differ (both {})",
                self.outbound_port
            )));
        }
        if self.proxy_uid == 0 {
            return Err(IptablesError::Config(
                "the proxy must not run as root (uid 0): root's traffic would bypass it".into(),
            ));
        }
        if let Some(bad) = self.skip_outbound_cidrs.iter().find(|c| !is_ipv4_cidr(c)) {
            return Err(IptablesError::Config(format!(
                "`{bad}` is not an IPv4 CIDR such as 10.0.0.0/8"
            )));
        }
        let zero_port = |ports: &[u16]| ports.contains(&0);
        if zero_port(&self.skip_inbound_ports) || zero_port(&self.skip_outbound_ports) {
            return Err(IptablesError::Config("a skipped port must not be 0".into()));
        }
        Ok(())
    }
}

fn is_ipv4_cidr(s: &str) -> bool {
    let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
    addr.parse::<std::net::Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
}

fn nat(args: &[&str]) -> Vec<String> {
    ["-t", "nat"]
        .iter()
        .chain(args)
        .map(|s| (*s).to_owned())
        .collect()
}

/// `-m multiport --dports a,b,c` rules, split in groups of 15 (the module's limit).
fn skip_ports(chain: &str, ports: &[u16]) -> Vec<Vec<String>> {
    ports
        .chunks(MULTIPORT_MAX)
        .map(|group| {
            let list = group
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",");
            nat(&[
                "-A",
                chain,
                "-p",
                "tcp",
                "-m",
                "multiport",
                "--dports",
                &list,
                "-j",
                "RETURN",
            ])
        })
        .collect()
}

/// The iptables invocations (arguments after the program name) that set up
/// interception on a fresh `nat` table: create the chains, fill them, then jump to
/// them from `PREROUTING` and `OUTPUT`. [`apply`] runs them idempotently.
pub fn rules(cfg: &InterceptConfig) -> Vec<Vec<String>> {
    let outbound = cfg.outbound_port.to_string();
    let inbound = cfg.inbound_port.to_string();
    let admin = cfg.admin_port.to_string();
    let uid = cfg.proxy_uid.to_string();
    let mut r: Vec<Vec<String>> = CHAINS.iter().map(|c| nat(&["-N", c])).collect();

    r.push(nat(&[
        "-A",
        REDIRECT_CHAIN,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &outbound,
    ]));
    r.push(nat(&[
        "-A",
        IN_REDIRECT_CHAIN,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &inbound,
    ]));

    // Inbound: every TCP connection to the pod but the admin port and skipped ports.
    r.push(nat(&[
        "-A",
        INBOUND_CHAIN,
        "-p",
        "tcp",
        "--dport",
        &admin,
        "-j",
        "RETURN",
    ]));
    r.extend(skip_ports(INBOUND_CHAIN, &cfg.skip_inbound_ports));
    r.push(nat(&[
        "-A",
        INBOUND_CHAIN,
        "-p",
        "tcp",
        "-j",
        IN_REDIRECT_CHAIN,
    ]));

    // Outbound: not the proxy itself, not loopback, not skipped destinations.
    r.push(nat(&[
        "-A",
        OUTBOUND_CHAIN,
        "-m",
        "owner",
        "--uid-owner",
        &uid,
        "-j",
        "RETURN",
    ]));
    r.push(nat(&["-A", OUTBOUND_CHAIN, "-o", "lo", "-j", "RETURN"]));
    r.push(nat(&[
        "-A",
        OUTBOUND_CHAIN,
        "-d",
        "127.0.0.0/8",
        "-j",
        "RETURN",
    ]));
    for cidr in &cfg.skip_outbound_cidrs {
        r.push(nat(&["-A", OUTBOUND_CHAIN, "-d", cidr, "-j", "RETURN"]));
    }
    r.extend(skip_ports(OUTBOUND_CHAIN, &cfg.skip_outbound_ports));
    r.push(nat(&[
        "-A",
        OUTBOUND_CHAIN,
        "-p",
        "tcp",
        "-j",
        REDIRECT_CHAIN,
    ]));

    // The jumps from the built-in chains come last, once the chains are complete, so
    // no connection is redirected by a half-built rule set.
    r.push(nat(&["-A", "PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]));
    r.push(nat(&["-A", "OUTPUT", "-p", "tcp", "-j", OUTBOUND_CHAIN]));
    r
}

/// Installs [`rules`] with the given iptables program (`iptables`, or
/// `iptables-legacy` on nodes that still use the legacy backend), idempotently.
pub fn apply(cfg: &InterceptConfig, iptables_bin: &str) -> Result<(), IptablesError> {
    cfg.check()?;
    for args in rules(cfg) {
        match args.get(2).map(String::as_str) {
            // Create our chain, or empty it if a previous run left it behind.
            Some("-N") => {
                if run(iptables_bin, &args).is_err() {
                    let mut flush = args.clone();
                    flush[2] = "-F".to_owned();
                    run(iptables_bin, &flush)?;
                }
            }
            // A jump from a built-in chain: add it only if `-C` does not find it.
            Some("-A")
                if matches!(
                    args.get(3).map(String::as_str),
                    Some("PREROUTING" | "OUTPUT")
                ) =>
            {
                let mut check = args.clone();
                check[2] = "-C".to_owned();
                if run(iptables_bin, &check).is_err() {
                    run(iptables_bin, &args)?;
                }
            }
            _ => run(iptables_bin, &args)?,
        }
    }
    Ok(())
}

/// Runs one iptables command; `-w` waits for the xtables lock instead of failing
/// when another program holds it.
fn run(bin: &str, args: &[String]) -> Result<(), IptablesError> {
    let out = Command::new(bin)
        .arg("-w")
        .args(args)
        .output()
        .map_err(|source| IptablesError::Spawn {
            bin: bin.to_owned(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(IptablesError::Failed {
            bin: bin.to_owned(),
            args: args.join(" "),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(args: &[String]) -> String {
        args.join(" ")
    }

    fn lines(cfg: &InterceptConfig) -> Vec<String> {
        rules(cfg).iter().map(|a| line(a)).collect()
    }

    fn position(lines: &[String], rule: &str) -> usize {
        lines
            .iter()
            .position(|l| l == rule)
            .unwrap_or_else(|| panic!("missing `{rule}` in\n{}", lines.join("\n")))
    }

    #[test]
    fn default_rules_read_like_istios() {
        let expected = [
            "-t nat -N SLUICE_REDIRECT",
            "-t nat -N SLUICE_IN_REDIRECT",
            "-t nat -N SLUICE_INBOUND",
            "-t nat -N SLUICE_OUTBOUND",
            "-t nat -A SLUICE_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-t nat -A SLUICE_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-t nat -A SLUICE_INBOUND -p tcp --dport 15000 -j RETURN",
            "-t nat -A SLUICE_INBOUND -p tcp -j SLUICE_IN_REDIRECT",
            "-t nat -A SLUICE_OUTBOUND -m owner --uid-owner 1337 -j RETURN",
            "-t nat -A SLUICE_OUTBOUND -o lo -j RETURN",
            "-t nat -A SLUICE_OUTBOUND -d 127.0.0.0/8 -j RETURN",
            "-t nat -A SLUICE_OUTBOUND -p tcp -j SLUICE_REDIRECT",
            "-t nat -A PREROUTING -p tcp -j SLUICE_INBOUND",
            "-t nat -A OUTPUT -p tcp -j SLUICE_OUTBOUND",
        ];
        assert_eq!(lines(&InterceptConfig::default()), expected);
    }

    #[test]
    fn the_proxy_uid_and_loopback_return_before_the_outbound_redirect() {
        let cfg = InterceptConfig {
            proxy_uid: 4242,
            ..Default::default()
        };
        let l = lines(&cfg);
        let redirect = position(&l, "-t nat -A SLUICE_OUTBOUND -p tcp -j SLUICE_REDIRECT");
        assert!(
            position(
                &l,
                "-t nat -A SLUICE_OUTBOUND -m owner --uid-owner 4242 -j RETURN"
            ) < redirect
        );
        assert!(position(&l, "-t nat -A SLUICE_OUTBOUND -o lo -j RETURN") < redirect);
    }

    #[test]
    fn skipped_ports_and_cidrs_return_before_the_redirects() {
        let cfg = InterceptConfig {
            admin_port: 9901,
            skip_outbound_ports: vec![5432, 6379],
            skip_inbound_ports: vec![9100],
            skip_outbound_cidrs: vec!["169.254.169.254/32".into(), "10.96.0.0/12".into()],
            ..Default::default()
        };
        let l = lines(&cfg);
        let out_redirect = position(&l, "-t nat -A SLUICE_OUTBOUND -p tcp -j SLUICE_REDIRECT");
        let in_redirect = position(&l, "-t nat -A SLUICE_INBOUND -p tcp -j SLUICE_IN_REDIRECT");
        for rule in [
            "-t nat -A SLUICE_OUTBOUND -p tcp -m multiport --dports 5432,6379 -j RETURN",
            "-t nat -A SLUICE_OUTBOUND -d 169.254.169.254/32 -j RETURN",
            "-t nat -A SLUICE_OUTBOUND -d 10.96.0.0/12 -j RETURN",
        ] {
            assert!(position(&l, rule) < out_redirect, "{rule}");
        }
        for rule in [
            "-t nat -A SLUICE_INBOUND -p tcp -m multiport --dports 9100 -j RETURN",
            "-t nat -A SLUICE_INBOUND -p tcp --dport 9901 -j RETURN",
        ] {
            assert!(position(&l, rule) < in_redirect, "{rule}");
        }
    }

    #[test]
    fn splits_long_port_lists_at_the_multiport_limit() {
        let cfg = InterceptConfig {
            skip_outbound_ports: (1..=20).collect(),
            ..Default::default()
        };
        let multiport: Vec<String> = lines(&cfg)
            .into_iter()
            .filter(|l| l.contains("multiport"))
            .collect();
        assert_eq!(
            multiport,
            [
                "-t nat -A SLUICE_OUTBOUND -p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j RETURN",
                "-t nat -A SLUICE_OUTBOUND -p tcp -m multiport --dports 16,17,18,19,20 -j RETURN",
            ]
        );
    }

    #[test]
    fn only_tcp_is_redirected_and_only_the_nat_table_is_touched() {
        for args in rules(&InterceptConfig::default()) {
            let rule = line(&args);
            assert!(rule.starts_with("-t nat "), "{rule}");
            let jumps_in = rule.contains("-A PREROUTING") || rule.contains("-A OUTPUT");
            if rule.contains("REDIRECT --to-ports") || jumps_in {
                assert!(rule.contains("-p tcp"), "{rule}");
            }
        }
    }

    #[test]
    fn built_in_chains_jump_only_after_our_chains_are_complete() {
        let l = lines(&InterceptConfig::default());
        let first_jump = position(&l, "-t nat -A PREROUTING -p tcp -j SLUICE_INBOUND");
        assert_eq!(first_jump, l.len() - 2);
    }

    #[test]
    fn refuses_configurations_that_would_loop_or_misroute() {
        let bad = [
            InterceptConfig {
                proxy_uid: 0,
                ..Default::default()
            },
            InterceptConfig {
                inbound_port: 15001,
                ..Default::default()
            },
            InterceptConfig {
                admin_port: 0,
                ..Default::default()
            },
            InterceptConfig {
                skip_outbound_cidrs: vec!["fd00::/8".into()],
                ..Default::default()
            },
            InterceptConfig {
                skip_inbound_ports: vec![0],
                ..Default::default()
            },
        ];
        for cfg in bad {
            assert!(cfg.check().is_err(), "{cfg:?}");
        }
        assert!(InterceptConfig::default().check().is_ok());
    }

    /// `apply` twice against a fake iptables that keeps state as a real one does
    /// (`-N` fails for an existing chain, `-C` succeeds for an existing rule): the
    /// second run flushes instead of creating, and adds no second jump.
    #[test]
    fn apply_is_idempotent() {
        let dir = std::env::temp_dir().join(format!("sluice-iptables-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let log = dir.join("calls");
        let fake = dir.join("iptables");
        let script = r#"#!/bin/sh
echo "$*" >> "$D/calls"
key=$(echo "$*" | sed 's/ -[ACN] / X /' | tr ' /' '__')
case "$*" in
  *" -N "*) [ -e "$D/$key" ] && exit 1; touch "$D/$key"; exit 0;;
  *" -C "*) [ -e "$D/$key" ] && exit 0; exit 1;;
  *" -A PREROUTING "*|*" -A OUTPUT "*) touch "$D/$key"; exit 0;;
esac
exit 0
"#;
        let script = script.replace("$D", &dir.display().to_string());
        std::fs::write(&fake, script).expect("write fake");
        let chmod = Command::new("chmod").arg("+x").arg(&fake).status();
        assert!(chmod.is_ok_and(|s| s.success()));
        let fake = fake.to_str().expect("utf-8 path");

        let calls = || std::fs::read_to_string(&log).expect("log");
        let count =
            |calls: &str, needle: &str| calls.lines().filter(|l| l.contains(needle)).count();
        apply(&InterceptConfig::default(), fake).expect("first apply");
        let first = calls();
        assert!(
            first.lines().all(|c| c.starts_with("-w -t nat ")),
            "{first}"
        );
        assert_eq!(count(&first, " -N "), 4);
        assert_eq!(count(&first, " -F "), 0);
        assert_eq!(
            count(&first, "-A PREROUTING") + count(&first, "-A OUTPUT"),
            2
        );

        std::fs::remove_file(&log).expect("reset log");
        apply(&InterceptConfig::default(), fake).expect("second apply");
        let second = calls();
        assert_eq!(count(&second, " -F "), 4, "{second}");
        assert_eq!(count(&second, " -C "), 2, "{second}");
        assert_eq!(
            count(&second, "-A PREROUTING") + count(&second, "-A OUTPUT"),
            0,
            "{second}"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn apply_reports_the_failing_command() {
        let err = apply(&InterceptConfig::default(), "/nonexistent/iptables").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot run /nonexistent/iptables"),
            "{err}"
        );
        let err = apply(&InterceptConfig::default(), "false").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("`false -t nat -F SLUICE_REDIRECT` failed"),
            "{err}"
        );
    }
}
