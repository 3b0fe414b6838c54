//! The telemetry listener: probes and Prometheus on an address of their own (the
//! pod IP in Kubernetes), while everything that reveals the proxy's state stays on
//! the loopback admin listener.

mod support;

use support::{get, start_with, TempDir};

const POLICY: &str = "apiVersion: sluice.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: t}\nspec:\n  hosts: [t]\n  backends: [{address: \"127.0.0.1:9\"}]\n";

#[tokio::test]
async fn the_telemetry_listener_serves_health_and_metrics_and_nothing_else() {
    let dir = TempDir::new();
    let proxy = start_with(&dir, POLICY, &["--telemetry", "127.0.0.1:0"]).await;
    let telemetry = proxy.addr("telemetry");
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
