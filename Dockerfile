# syntax=docker/dockerfile:1
#
# kube-nftpolicy agent image.
#
#   docker build -t kube-nftpolicy:0.1.0 .
#
# Two stages: a Rust builder, and a slim Debian runtime holding the binary and nft, which the
# agent runs for every write (`nft -f -`, one atomic transaction per sync).

# ---------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder

# rustables (the netlink read-back) runs bindgen over <linux/netfilter/nf_tables.h> at build
# time: bindgen needs libclang, and the header comes from the kernel UAPI headers. The build
# fails without them. Versions are not pinned (DL3008): bookworm's archive keeps only the
# current version of a package, so a pin would break at the next point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libclang-dev linux-libc-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# The whole source tree (see .dockerignore): Cargo.toml may name test, bench or example
# targets, and cargo checks that their files exist even when it does not build them.
COPY . .

# --locked: build exactly the versions in Cargo.lock. The cache mounts keep the registry and
# the target directory between builds; the binary is copied out of the cached target dir.
# The release profile keeps line tables (`debug = "line-tables-only"`), which makes the binary
# about 100 MB; the image strips them (about 20 MB; symbols stay, so backtraces still name
# functions). Build with `--build-arg STRIP_DEBUG=false` to keep them.
ARG STRIP_DEBUG=true
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/kube-nftpolicy /out/kube-nftpolicy \
    && if [ "$STRIP_DEBUG" = true ]; then strip --strip-debug /out/kube-nftpolicy; fi

# ---------------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------------
FROM debian:bookworm-slim

# nftables: the nft binary for writes. The agent needs nft >= 1.0.1; bookworm ships 1.0.6.
# netbase: /etc/protocols and /etc/services. Without them nft still loads our rules but
#   `nft list` prints `6 . 80` instead of `tcp . 80`, which makes the table harder to read.
# ca-certificates: for a kubeconfig that points at an API server with a public certificate
#   (in-cluster config uses the service account's own CA bundle).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables netbase ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /out/kube-nftpolicy /usr/local/bin/kube-nftpolicy
# The image ships GPL-3.0-or-later software (the agent and the rustables crate it links).
COPY LICENSE /usr/share/doc/kube-nftpolicy/LICENSE

# Fail the build early if the binary cannot start (missing shared library) or nft is absent.
RUN kube-nftpolicy --version && nft --version

LABEL org.opencontainers.image.title="kube-nftpolicy" \
      org.opencontainers.image.description="Kubernetes NetworkPolicy enforcement with one nftables table per node" \
      org.opencontainers.image.licenses="GPL-3.0-or-later"

# Root, on purpose. The agent programs nftables and binds an NFLOG group in the node's network
# namespace: every nfnetlink message, reads included, needs CAP_NET_ADMIN there. Kubernetes
# gives added capabilities to a non-root process only through file capabilities on the
# executable (it sets no ambient capabilities), and the agent execs a second binary (nft) that
# would need them too. So the container runs as UID 0 with every capability dropped except
# NET_ADMIN (see deploy/daemonset.yaml). NET_RAW is not needed: the agent opens no raw or
# packet sockets, only netlink (NETLINK_NETFILTER) and TCP for the API server and /metrics.
# hadolint ignore=DL3002
USER 0:0

# Exec form: the agent is PID 1 and gets the kubelet's SIGTERM itself (it then exits and leaves
# the rules in force). deploy/daemonset.yaml replaces CMD with `run` and its flags;
# tests/deploy.rs checks this stage and parses those arguments with the agent's own parser.
# The allocator settings of deploy/daemonset.yaml, for the image run by itself.
ENV MIMALLOC_PURGE_DELAY=0 MIMALLOC_ARENA_EAGER_COMMIT=0
ENTRYPOINT ["/usr/local/bin/kube-nftpolicy"]
CMD ["run"]
