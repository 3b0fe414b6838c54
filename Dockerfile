# syntax=docker/dockerfile:1
# One image for the mesh: sluice-proxy (the sidecar, and its init-iptables step),
# sluice-cp (control plane, webhook, CLI) and the demo programs.
#   docker build -t ghcr.io/sluice/sluice:0.1.0 .

# --- build ------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
# pingora builds zlib-ng with cmake; protoc for the control plane's gRPC API.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake make g++ pkg-config protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice-proxy -p sluice-control-plane -p sluice-demo \
 && mkdir -p /out \
 && cp target/release/sluice-proxy target/release/sluice-cp \
       target/release/sluice-demo-upstream target/release/sluice-demo-load /out/

# --- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim
# iptables for `sluice-proxy init-iptables` (the injected init container runs it as
# root with NET_ADMIN/NET_RAW only); ca-certificates for TLS upstreams.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 1337 sluice \
 && useradd --system --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin sluice
COPY --from=build /out/ /usr/local/bin/
# The proxy's uid: the iptables rules exempt it, so its own connections are not
# redirected back into it. Everything but the init step runs as this user.
USER 1337:1337
EXPOSE 15000 15001 15006 15010 9443
ENTRYPOINT ["sluice-proxy"]
