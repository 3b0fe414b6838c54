//! The telemetry listener: probes and Prometheus on an address of their own (the
//! pod IP in Kubernetes), while everything that reveals the proxy's state stays on
//! the loopback admin listener.

mod support;

use std::net::SocketAddr;

use support::{free_port, get, start_with, TempDir};

const POLICY: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  hosts: [t]\n  backends: [{address: \"127.0.0.1:9\"}]\n";

#[tokio::test]
async fn the_telemetry_listener_serves_health_and_metrics_and_nothing_else() {
    let dir = TempDir::new();
    let telemetry = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = start_with(&dir, POLICY, &["--telemetry", &telemetry.to_string()]).await;
    for path in ["/live", "/ready", "/metrics"] {
        let response = get(telemetry, "127.0.0.1", path).await.expect("answer");
        assert_eq!(response.status, 200, "{path}");
    }
    let metrics = get(telemetry, "127.0.0.1", "/metrics")
        .await
        .expect("metrics");
    assert!(String::from_utf8_lossy(&metrics.body).contains("sluice_policy_info"));
    let dump = get(telemetry, "127.0.0.1", "/config_dump")
        .await
        .expect("answer");
    assert_eq!(dump.status, 404);
    assert!(String::from_utf8_lossy(&dump.body).contains("admin listener"));
    // The admin listener still has it.
    let dump = get(proxy.admin_addr(), "127.0.0.1", "/config_dump")
        .await
        .expect("dump");
    assert_eq!(dump.status, 200);
}
