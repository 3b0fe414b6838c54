"""scripts/install-smoke, in parts: common (constants and helpers), manifests (what
runs), cluster (pods, their network, volumes and the fake API server), container
(one container's process and its probes)."""
