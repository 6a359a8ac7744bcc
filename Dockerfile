# bonychat-relay container image: a release build on the Rust image, copied alone onto
# distroless (glibc, CA bundle, no shell, no package manager), run as the nonroot user.
#   docker build -t bonychat-relay .
# Verified with scripts/image-check (podman/buildah; see the README's "Deploying").

# Bookworm explicitly: the unsuffixed rust tags are Debian 13 now, whose glibc is newer
# than cc-debian12's, and a binary linked there may not start on the runtime image.
FROM docker.io/library/rust:1.95-slim-bookworm AS builder
WORKDIR /build
# Symbols are of no use in the image and are most of the binary's size.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never

# Dependencies first, against stub sources: this layer is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit. The registry lives in a cache mount so a
# changed lock file downloads only what changed.
COPY Cargo.toml Cargo.lock ./
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

COPY src ./src
COPY migrations ./migrations
# COPY keeps the context's modification times, which can be older than the stub build:
# touching makes cargo rebuild the crate itself.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/bonychat-relay /out/usr/local/bin/bonychat-relay \
    && mkdir -p /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG SOURCE=""
LABEL org.opencontainers.image.title="bonychat-relay" \
      org.opencontainers.image.description="Relays a BonyChat Custom Channel to a Facebook Page through JoinChat and the Messenger Platform" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

COPY --from=builder /out/usr/local/bin/bonychat-relay /usr/local/bin/bonychat-relay
# A named volume starts as a copy of the image's directory, owner included: created here
# as nonroot's, the relay can write its store there without running as root.
COPY --from=builder --chown=65532:65532 /out/data /data

# WORKDIR / rather than /data: example.env's relative sqlite://data/relay.db then lands in
# the volume too, on the same file as the absolute default below.
WORKDIR /
USER 65532:65532
# The metrics listener binds all interfaces inside the container, else nothing outside it
# could scrape; publish 9090 on the host's loopback only (docker-compose.yml does).
ENV RELAY_ADDR=0.0.0.0:8080 \
    RELAY_METRICS_ADDR=0.0.0.0:9090 \
    RELAY_DATABASE_URL=sqlite:///data/relay.db
VOLUME /data
EXPOSE 8080 9090

# No shell in the image: exec form. The subcommand probes /readyz on RELAY_ADDR's port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/bonychat-relay", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/bonychat-relay"]
CMD ["serve"]
