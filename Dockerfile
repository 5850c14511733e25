# syntax=docker/dockerfile:1
#
# taler-paywall container image.
#
#   docker build -t taler-paywall .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/gateway.toml:/etc/taler-paywall/gateway.toml:ro" \
#     -e TALER_PAYWALL_MERCHANT_TOKEN -e TALER_PAYWALL_SESSION_SECRET \
#     taler-paywall
#
# The image runs `taler-paywall serve` with the config at /etc/taler-paywall/gateway.toml
# (TALER_PAYWALL_CONFIG); mount yours there, read-only. In a container, [server] listen must be
# "0.0.0.0:8080" (or "[::]:8080") to be reachable through the published port. See
# docs/deploy.md.

# ---- build ------------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the crates.io downloads and the build directory between builds; the
# binary is copied out of the cached target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/taler-paywall /out/taler-paywall

# ---- run --------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: the system trust store for https origins and merchant backends (the public
# web roots are also built in). Versions are not pinned: the security updates of the stable
# release are what this image should get.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin taler-paywall
COPY --from=build /out/taler-paywall /usr/local/bin/taler-paywall
COPY gateway.toml.example /etc/taler-paywall/gateway.toml.example
ENV TALER_PAYWALL_CONFIG=/etc/taler-paywall/gateway.toml \
    TALER_PAYWALL_HEALTHCHECK_URL=http://127.0.0.1:9090/healthz
USER 10001:10001
EXPOSE 8080
# GET /healthz on the admin listener ([admin] listen = "127.0.0.1:9090" in the config; set
# TALER_PAYWALL_HEALTHCHECK_URL for another address). `taler-paywall healthcheck` exits 0 on a
# 200 and 1 otherwise, so the image needs no curl or shell; without an [admin] table the
# container is reported unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/taler-paywall", "healthcheck", "--timeout", "4s"]
ENTRYPOINT ["/usr/local/bin/taler-paywall"]
CMD ["serve"]
